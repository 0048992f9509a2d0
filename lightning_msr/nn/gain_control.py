"""Deep Control: an automatic gain control inside every conv neuron.

Ruff, "Deep Control -- an automatic gain control for deep neural networks" (arXiv:1706.03907). Instead of
normalising with minibatch statistics, each conv output map is corrected *per sample*: a learnable
fraction ``beta`` of its own spatial mean (its common-mode, "mean shift") is subtracted, and the result is
scaled by a learnable ``gain`` and shifted by a learnable ``bias``::

    y[n, c] = gain[c] * (x[n, c] - beta[c] * mean_spatial(x[n, c])) + bias[c]

No statistic crosses the batch, so a batch of one works, every sample's output is independent of the
others, and the layer computes the same thing in training and in evaluation.

The mean is taken over all dims after the channel dim, so the layer needs at least one of them: a
``(N, C)`` input has no map to take a mean over (a "mean over no spatial dims" would either be the value
itself -- cancelling the signal completely at ``beta = 1`` -- or undefined), and is refused with an error.
For BatchNorm1d layers on plain features use ``replace_batchnorm(..., "affine")`` or leave them out with
``exclude=``.

Example::

    >>> import torch
    >>> from lightning_msr.nn import AutomaticGainControl
    >>> agc = AutomaticGainControl(4)
    >>> x = torch.randn(2, 4, 8, 8) + 3.0
    >>> y = agc(x)
    >>> bool(y.mean(dim=(2, 3)).abs().max() < 1e-5)  # beta = 1 removes each map's mean
    True
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_msr._checks import _check_beta_init, _check_bool, _check_finite
from lightning_msr.exceptions import MSRConfigurationError, MSRWarning
from lightning_msr.nn.affine import (
    _check_input,
    _check_num_features,
    _copy_affine_,
    _factory_of,
    channel_affine,
)

__all__ = ["AutomaticGainControl", "automatic_gain_control"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def automatic_gain_control(
    x: Tensor, gain: Optional[Tensor], beta: Tensor, bias: Optional[Tensor] = None
) -> Tensor:
    """Deep Control's gain control, ``gain * (x - beta * mean_spatial(x)) + bias``, per sample and channel.

    The spatial mean of every ``(n, c)`` map is accumulated in float32 for float16/bfloat16 inputs. The
    output has the input's dtype and memory format (``channels_last`` stays ``channels_last``). It is
    computed as ``gain * x + bias`` (one fused pass, see :func:`~lightning_msr.nn.affine.channel_affine`)
    minus the small ``(N, C, 1, ...)`` tensor ``gain * beta * mean``, so besides the input only the means
    are kept for the backward pass.

    Args:
        x: input of shape ``(N, C, *spatial)`` with at least one spatial dim.
        gain: per-channel gain of shape ``(C,)``, or ``None`` for 1.
        beta: per-channel fraction of the map mean to subtract, shape ``(C,)``.
        bias: per-channel bias of shape ``(C,)``, or ``None`` for 0.

    Returns:
        A new tensor of the shape of ``x``.

    Raises:
        MSRConfigurationError: if ``x`` has no spatial dim or its channel count does not match ``beta``.

    Example::

        >>> import torch
        >>> from lightning_msr.nn.gain_control import automatic_gain_control
        >>> x = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])  # (N=1, C=1, L=4), mean 3
        >>> automatic_gain_control(x, gain=torch.tensor([2.0]), beta=torch.tensor([1.0]))
        tensor([[[-4., -2.,  0.,  6.]]])
        >>> automatic_gain_control(x, gain=None, beta=torch.tensor([0.5]), bias=torch.tensor([1.0]))
        tensor([[[0.5000, 1.5000, 2.5000, 5.5000]]])
    """
    _check_input(x, beta.numel(), 3, "an automatic-gain-control")
    for name, tensor in (("gain", gain), ("bias", bias)):
        if tensor is not None and tensor.numel() != beta.numel():
            raise MSRConfigurationError(
                f"Expected `{name}` to have {beta.numel()} elements like `beta`, but got {tensor.numel()}."
            )
    spatial = tuple(range(2, x.dim()))
    accumulate = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
    mean = x.mean(dim=spatial, keepdim=True, dtype=accumulate)  # (N, C, 1, ...)
    scale = beta if gain is None else gain * beta
    shift = (mean * scale.to(accumulate).view(-1, *([1] * len(spatial)))).to(x.dtype)
    out = channel_affine(x, gain, bias)  # gain * x + bias, one fused pass
    # channel_affine returns a fresh tensor unless it is the identity; subtracting the small per-map shift in
    # place is safe for autograd (the affine's backward needs its input, not its output) and saves a copy.
    return out - shift if out is x else out.sub_(shift)


class AutomaticGainControl(nn.Module):
    r"""The Deep Control layer: ``y[n, c] = gain[c] * (x[n, c] - beta[c] * mean_spatial(x[n, c])) + bias[c]``.

    Ruff, arXiv:1706.03907. ``gain``, ``beta`` and ``bias`` are learnable per-channel parameters. There are
    no batch statistics and no buffers: the output of a sample never depends on the rest of the batch,
    batch size 1 works, and training and evaluation compute the same function.

    Input: ``(N, C, *spatial)`` with at least one spatial dim (``Conv1d/2d/3d`` outputs), any memory
    format. See the module docstring for why ``(N, C)`` is refused. On maps of a single element (e.g. the
    last stage of a ResNet on 32x32 images) the mean is the element itself and only ``(1 - beta)`` of the
    signal passes; the layer warns once when that happens.

    Args:
        num_features: the number of channels ``C``.
        beta_init: initial value of every ``beta``, in ``[0, 1]`` (1 subtracts the whole map mean; 0 starts
            as a plain per-channel affine layer). ``beta`` itself is learnt freely.
        gain_init: initial value of every ``gain``.
        bias: learn a per-channel bias (initialised to 0).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Raises:
        MSRConfigurationError: if ``num_features`` is not a positive integer, ``beta_init`` is not in
            ``[0, 1]``, ``gain_init`` is not a finite number, or (in ``forward``) the input has no spatial dim or not
            ``num_features`` channels.

    Example::

        >>> import torch
        >>> from lightning_msr.nn import AutomaticGainControl
        >>> agc = AutomaticGainControl(16, beta_init=0.5)
        >>> agc
        AutomaticGainControl(16, beta_init=0.5, gain_init=1.0, bias=True)
        >>> x = torch.randn(8, 16, 4, 4)
        >>> torch.allclose(agc(x)[:1], agc(x[:1]))  # per sample: the batch does not matter
        True
        >>> torch.equal(agc.train()(x), agc.eval()(x))  # no train/eval difference
        True
    """

    def __init__(
        self,
        num_features: int,
        beta_init: float = 1.0,
        gain_init: float = 1.0,
        bias: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.num_features = _check_num_features(num_features)
        self.beta_init = _check_beta_init(beta_init)
        self.gain_init = _check_finite("gain_init", gain_init)
        _check_bool("bias", bias)
        factory = {"device": device, "dtype": dtype}
        self.gain = nn.Parameter(torch.empty(num_features, **factory))
        self.beta = nn.Parameter(torch.empty(num_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        self._warned_single_element = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set ``gain`` to ``gain_init``, ``beta`` to ``beta_init`` and ``bias`` to 0."""
        with torch.no_grad():
            self.gain.fill_(self.gain_init)
            self.beta.fill_(self.beta_init)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Apply the gain control to ``x`` of shape ``(N, C, *spatial)``."""
        _check_input(x, self.num_features, 3, f"{type(self).__name__}({self.num_features})")
        if not self._warned_single_element and math.prod(x.shape[2:]) == 1:
            self._warned_single_element = True
            rank_zero_warn(
                f"{type(self).__name__}({self.num_features}) got maps of a single element (input shape "
                f"{tuple(x.shape)}): such a map's mean is the element itself, so only (1 - beta) of the signal "
                "passes, none at beta = 1. Use larger inputs, a smaller `beta_init`, or leave this layer out.",
                category=MSRWarning,
            )
        return automatic_gain_control(x, self.gain, self.beta, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, beta_init={self.beta_init}, gain_init={self.gain_init}, "
            f"bias={self.bias is not None}"
        )

    @classmethod
    def from_batchnorm(
        cls, batchnorm: nn.modules.batchnorm._BatchNorm, beta_init: float = 1.0
    ) -> AutomaticGainControl:
        """Build the layer that replaces ``batchnorm``: ``gain``/``bias`` from its affine parameters.

        ``gain`` and ``bias`` are copied from BatchNorm's ``weight`` and ``bias`` (their ``requires_grad``
        too); ``beta`` starts at ``beta_init``. A BatchNorm without affine parameters gives ``gain = 1``
        and ``bias = 0``, learnable. Device, dtype and training mode follow the BatchNorm.

        Args:
            batchnorm: the BatchNorm (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) to replace.
            beta_init: initial value of every ``beta``.

        Returns:
            A new :class:`AutomaticGainControl`.

        Example::

            >>> from torch import nn
            >>> from lightning_msr.nn import AutomaticGainControl
            >>> AutomaticGainControl.from_batchnorm(nn.BatchNorm2d(32), beta_init=0.9)
            AutomaticGainControl(32, beta_init=0.9, gain_init=1.0, bias=True)
        """
        layer = cls(int(batchnorm.num_features), beta_init=beta_init, bias=True, **_factory_of(batchnorm))
        _copy_affine_(batchnorm, layer.gain, layer.bias)
        return layer.train(batchnorm.training)
