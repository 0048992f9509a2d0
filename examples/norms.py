"""The normalisation layers the example networks can be built with, and how checkpoints record them.

``"batchnorm"`` is the usual baseline. ``"affine"`` is what remains of BatchNorm without its statistics (a
learnable per-channel scale and bias, :class:`lightning_msr.nn.affine.ChannelAffine`): what
``MeanShiftRejection(batchnorm="affine")`` puts in place of every BatchNorm at fit setup. ``"agc"`` is Deep
Control's :class:`lightning_msr.nn.AutomaticGainControl`. ``"fold"`` and ``"agc_fold"`` are the same two with
the per-channel scale (gain) folded into the conv before it, what ``MeanShiftRejection(batchnorm="replace")`` and
``DeepControl()`` do (see :func:`lightning_msr.replace_batchnorm`); :func:`fold_norms_` builds them. ``"none"``
leaves nothing.

Because that surgery happens during ``fit``, a checkpoint saved afterwards holds the new layers while the
model's ``norm`` hyper-parameter still says ``"batchnorm"``. :func:`record_norm` writes the layer type the
network really has into the checkpoint's hyper-parameters, so ``Model.load_from_checkpoint(path)`` and
``main.py test --ckpt_path=path`` rebuild the network as it was saved.

Example::

    >>> from torch import nn
    >>> from examples.norms import detect_norm, make_norm
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), make_norm("affine", 4))
    >>> detect_norm(net)
    'affine'
    >>> detect_norm(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
    'none'
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from torch import nn

from lightning_msr import replace_batchnorm
from lightning_msr.nn import AutomaticGainControl
from lightning_msr.nn.affine import ChannelAffine
from lightning_msr.nn.scaled_conv import is_scaled_conv

__all__ = ["NORMS", "Norm", "detect_norm", "fold_norms_", "make_norm", "record_norm"]

Norm = Literal["batchnorm", "affine", "agc", "fold", "agc_fold", "none"]
NORMS = ("batchnorm", "affine", "agc", "fold", "agc_fold", "none")
_FOLDED = ("fold", "agc_fold")
_TYPES = (("batchnorm", nn.modules.batchnorm._BatchNorm), ("affine", ChannelAffine), ("agc", AutomaticGainControl))


def make_norm(norm: str, channels: int) -> nn.Module:
    """The layer that follows a conv with ``channels`` outputs, for ``norm`` in :data:`NORMS`.

    Raises:
        ValueError: for an unknown ``norm``.
    """
    if norm == "batchnorm" or norm in _FOLDED:  # folded by fold_norms_ once the network is built
        return nn.BatchNorm2d(channels)
    if norm == "affine":
        return ChannelAffine(channels)
    if norm == "agc":
        return AutomaticGainControl(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"Expected `norm` to be one of {NORMS}, but got {norm!r}.")


def fold_norms_(module: nn.Module, norm: str) -> nn.Module:
    """For ``norm="fold"``/``"agc_fold"``, fold the network's BatchNorm layers into its convs (in place)."""
    if norm in _FOLDED:
        replace_batchnorm(module, norm)
    return module


def detect_norm(module: nn.Module) -> str:
    """Which of :data:`NORMS` ``module`` contains now (the first kind found; ``"none"`` if there is none)."""
    if any(is_scaled_conv(m) for m in module.modules()):
        return "agc_fold" if any(isinstance(m, AutomaticGainControl) for m in module.modules()) else "fold"
    for name, kind in _TYPES:
        if any(isinstance(m, kind) for m in module.modules()):
            return name
    return "none"


def record_norm(module: nn.Module, checkpoint: dict[str, Any], key: str = "norm") -> None:
    """Write :func:`detect_norm` of ``module`` into ``checkpoint["hyper_parameters"][key]``.

    Call it from ``LightningModule.on_save_checkpoint``. The model's own hyper-parameters are left untouched
    (the checkpoint gets a copy).
    """
    hparams = checkpoint.get("hyper_parameters")
    if not hparams or key not in hparams:
        return
    actual = detect_norm(module)
    if hparams[key] != actual:
        hparams = copy.copy(hparams)
        hparams[key] = actual
        checkpoint["hyper_parameters"] = hparams
