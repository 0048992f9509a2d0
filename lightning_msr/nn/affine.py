"""Per-channel scale and bias: what is left of a BatchNorm once its batch statistics are taken out.

Mean Shift Rejection (Ruff, Beck, Bach, arXiv:1911.13173) pairs every zero-mean, unit-magnitude conv
kernel with a learnable per-filter scale and a per-map bias -- exactly the affine part of a BatchNorm.
:class:`ChannelAffine` is that layer, and :func:`channel_affine` its functional form:
``y[n, c] = weight[c] * x[n, c] + bias[c]``, per sample, identical in training and evaluation.

It is computed with PyTorch's fused BatchNorm *inference* kernel (running mean 0, running variance 1,
``eps = 0``), which is exact (``1 / sqrt(1 + 0) == 1``), keeps ``channels_last`` inputs in
``channels_last``, supports float16/bfloat16 inputs with float32 parameters like BatchNorm does, and is
faster than composing ``x * weight + bias`` from elementwise ops (one pass forward, one fused pass
backward).

Example::

    >>> import torch
    >>> from lightning_msr.nn.affine import ChannelAffine
    >>> layer = ChannelAffine(3)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
    >>> layer(torch.ones(1, 3, 2, 2))[0, :, 0, 0]
    tensor([1., 2., 3.], grad_fn=<SelectBackward0>)
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_msr._checks import _check_bool, _integer
from lightning_msr.exceptions import MSRConfigurationError

__all__ = ["ChannelAffine", "channel_affine"]


def _check_num_features(value: Any) -> int:
    number = _integer(value)
    if number is None or number < 1:
        raise MSRConfigurationError(f"Expected `num_features` to be a positive integer, but got {value!r}.")
    return number


def _check_input(x: Tensor, num_channels: Optional[int], min_dims: int, layer: str) -> None:
    """Name the expected layout in the error instead of failing deep inside a kernel."""
    if x.dim() < min_dims:
        layout = "(N, C, *spatial) with at least one spatial dim" if min_dims > 2 else "(N, C, *spatial)"
        raise MSRConfigurationError(f"Expected {layer} input of shape {layout}, but got shape {tuple(x.shape)}.")
    if num_channels is not None and x.shape[1] != num_channels:
        raise MSRConfigurationError(
            f"Expected {layer} input with {num_channels} channels in dim 1, but got shape {tuple(x.shape)}."
        )


def _numel(*tensors: Optional[Tensor]) -> Optional[int]:
    for tensor in tensors:
        if tensor is not None:
            return tensor.numel()
    return None


def _factory_of(batchnorm: nn.Module) -> dict:
    """``device`` and ``dtype`` of a BatchNorm's parameters (or buffers), for building its replacement."""
    reference = batchnorm.weight if batchnorm.weight is not None else batchnorm.running_mean
    return {"device": reference.device, "dtype": reference.dtype} if reference is not None else {}


def _copy_affine_(batchnorm: nn.Module, weight: Optional[Tensor], bias: Optional[Tensor]) -> None:
    """Start a replacement from BatchNorm's affine parameters (values and ``requires_grad``)."""
    with torch.no_grad():
        if batchnorm.weight is not None and weight is not None:
            weight.copy_(batchnorm.weight)
            weight.requires_grad_(batchnorm.weight.requires_grad)
        if batchnorm.bias is not None and bias is not None:
            bias.copy_(batchnorm.bias)
            bias.requires_grad_(batchnorm.bias.requires_grad)


def channel_affine(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """``y[n, c] = weight[c] * x[n, c] + bias[c]`` for an ``(N, C, *spatial)`` input.

    ``weight`` and ``bias`` are 1-D tensors of ``C`` elements (either may be ``None``: scale 1, bias 0).
    The dtype rules are BatchNorm's: parameters of the input's dtype, or float32 parameters with a
    float16/bfloat16 input; the output has the input's dtype and memory format.

    Args:
        x: input of shape ``(N, C)`` or ``(N, C, *spatial)``.
        weight: per-channel scale of shape ``(C,)``, or ``None``.
        bias: per-channel bias of shape ``(C,)``, or ``None``.

    Returns:
        A new tensor (``x`` itself when both ``weight`` and ``bias`` are ``None``).

    Raises:
        MSRConfigurationError: if ``x`` has fewer than 2 dims or its channel count does not match.

    Example::

        >>> import torch
        >>> from lightning_msr.nn.affine import channel_affine
        >>> channel_affine(torch.ones(2, 2), torch.tensor([2.0, 3.0]), torch.tensor([0.0, -1.0]))
        tensor([[2., 2.],
                [2., 2.]])
    """
    _check_input(x, _numel(weight, bias), 2, "a channel-affine")
    reference = weight if weight is not None else bias
    if reference is None:
        return x
    num_channels = x.shape[1]
    # BatchNorm's inference kernel with mean 0, variance 1 and eps 0 is exactly x * weight + bias.
    zeros = torch.zeros(num_channels, device=reference.device, dtype=reference.dtype)
    ones = torch.ones(num_channels, device=reference.device, dtype=reference.dtype)
    return F.batch_norm(x, zeros, ones, weight, bias, training=False, momentum=0.0, eps=0.0)


class ChannelAffine(nn.Module):
    r"""A learnable per-channel scale and bias, ``y[n, c] = weight[c] * x[n, c] + bias[c]``.

    The layer :func:`~lightning_msr.replace_batchnorm` puts in place of a BatchNorm for
    ``replacement="affine"``: BatchNorm's affine part without its (batch or running) statistics, so it is
    the same for every batch size, 1 included, and in training and evaluation. Works on ``(N, C)`` and
    ``(N, C, *spatial)`` inputs, in any memory format. The parameters are named ``weight`` and ``bias``
    like BatchNorm's, so optimizer parameter-group rules keyed on those names keep working.

    Args:
        num_features: the number of channels ``C``.
        bias: learn a per-channel bias (initialised to 0).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Raises:
        MSRConfigurationError: if ``num_features`` is not a positive integer, or (in ``forward``) the input
            does not have ``num_features`` channels in dim 1.

    Example::

        >>> import torch
        >>> from lightning_msr.nn.affine import ChannelAffine
        >>> layer = ChannelAffine(8)
        >>> layer
        ChannelAffine(8, bias=True)
        >>> x = torch.randn(4, 8, 5, 5)
        >>> torch.equal(layer(x), x)  # weight 1 and bias 0 at initialisation
        True
    """

    def __init__(
        self,
        num_features: int,
        bias: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.num_features = _check_num_features(num_features)
        _check_bool("bias", bias)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set ``weight`` to 1 and ``bias`` to 0 (the identity)."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Scale and shift every channel of ``x`` (shape ``(N, C)`` or ``(N, C, *spatial)``)."""
        _check_input(x, self.num_features, 2, f"{type(self).__name__}({self.num_features})")
        return channel_affine(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, bias={self.bias is not None}"

    @classmethod
    def from_batchnorm(
        cls, batchnorm: nn.modules.batchnorm._BatchNorm, fold_running_stats: bool = False
    ) -> ChannelAffine:
        """Build the layer that replaces ``batchnorm``: its affine parameters, device, dtype and mode.

        ``weight`` and ``bias`` are copied from BatchNorm's (their ``requires_grad`` too). A BatchNorm
        without affine parameters (``affine=False``) gives weight 1 and bias 0, *learnable*: without the
        normalisation the scale of every channel must be controllable, which is the learnable per-filter
        scale the MSR paper pairs with each zero-mean kernel.

        Args:
            batchnorm: the BatchNorm (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) to replace.
            fold_running_stats: fold BatchNorm's running statistics into the scale and bias
                (``weight / sqrt(running_var + eps)``, ``bias - running_mean * scale``) so the new layer
                computes what the BatchNorm computes in evaluation mode -- for a *trained* (e.g.
                pretrained) BatchNorm. Without running statistics this changes nothing.

        Returns:
            A new :class:`ChannelAffine` on the BatchNorm's device, with its dtype and training mode.

        Example::

            >>> import torch
            >>> from torch import nn
            >>> from lightning_msr.nn.affine import ChannelAffine
            >>> bn = nn.BatchNorm2d(4).eval()
            >>> _ = bn.running_mean.fill_(0.5), bn.running_var.fill_(4.0)  # as if trained
            >>> affine = ChannelAffine.from_batchnorm(bn, fold_running_stats=True)
            >>> x = torch.randn(2, 4, 3, 3)
            >>> torch.allclose(affine(x), bn(x), atol=1e-6)
            True
        """
        layer = cls(int(batchnorm.num_features), bias=True, **_factory_of(batchnorm))
        _copy_affine_(batchnorm, layer.weight, layer.bias)
        with torch.no_grad():
            if fold_running_stats and batchnorm.running_mean is not None and batchnorm.running_var is not None:
                scale = layer.weight.double() / (batchnorm.running_var.double() + batchnorm.eps).sqrt()
                layer.bias.copy_(layer.bias.double() - batchnorm.running_mean.double() * scale)
                layer.weight.copy_(scale)
        return layer.train(batchnorm.training)
