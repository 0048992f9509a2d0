"""What is left of a BatchNorm that carries its activation: the replacement norm, then the drop path and activation.

timm builds most of its convolutional networks (EfficientNets, MobileNets, RegNets, NF-free ResNets, ...) with
``BatchNormAct2d``: a ``BatchNorm2d`` subclass whose ``forward`` normalises, then applies its ``drop`` (a drop path
or dropout, often ``nn.Identity``) and its ``act`` (the activation). :func:`~lightning_msr.replace_batchnorm`
replaces such a layer by a :class:`NormAct` holding the new per-channel layer as ``norm`` and the *same* ``drop``
and ``act`` modules, so only the statistics go: the function is ``act(drop(norm(x)))`` exactly as before.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["NormAct", "is_norm_act"]


def is_norm_act(module: nn.Module) -> bool:
    """Whether ``module`` is one of timm's BatchNorm layers that apply a drop path and an activation after
    normalising (``BatchNormAct2d``, ``SyncBatchNormAct``): a BatchNorm subclass defined in timm whose only
    submodules are ``drop`` and ``act``. Another class with its own ``forward`` could do anything after (or before)
    normalising, so it is not taken to be one.

    Example::

        >>> from torch import nn
        >>> from lightning_msr.nn.norm_act import is_norm_act
        >>> is_norm_act(nn.BatchNorm2d(4)), is_norm_act(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()))
        (False, False)
    """
    return (
        isinstance(module, _BatchNorm)
        and type(module).__module__.split(".")[0] == "timm"
        and set(module._modules) == {"drop", "act"}
    )


class NormAct(nn.Module):
    """``act(drop(norm(x)))``: a per-channel layer that replaced a BatchNorm, followed by the drop path and activation
    that BatchNorm carried (timm's ``BatchNormAct2d``).

    Args:
        norm: the layer in BatchNorm's place (``ChannelAffine``, ``AutomaticGainControl``, or ``nn.Identity``
            when BatchNorm's scale was folded into the conv before it).
        drop: the drop path or dropout applied after the norm (``nn.Identity`` for none).
        act: the activation (``nn.Identity`` for none).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_msr.nn import ChannelAffine, NormAct
        >>> layer = NormAct(ChannelAffine(4), nn.Identity(), nn.ReLU())
        >>> layer
        NormAct(
          (norm): ChannelAffine(4, bias=True)
          (drop): Identity()
          (act): ReLU()
        )
        >>> bool((layer(torch.randn(2, 4, 3, 3)) >= 0).all())
        True
    """

    def __init__(self, norm: nn.Module, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(self.norm(x)))
