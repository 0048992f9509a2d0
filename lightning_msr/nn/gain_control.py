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
from typing import Any, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_msr._checks import _check_beta_init, _check_bool, _check_finite
from lightning_msr.exceptions import MSRConfigurationError, MSRWarning
from lightning_msr.nn._broadcast import per_channel
from lightning_msr.nn.affine import (
    _check_input,
    _check_num_features,
    _copy_affine_,
    _factory_of,
    channel_affine,
)

__all__ = ["AutomaticGainControl", "automatic_gain_control"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _spatial_mean(x: Tensor) -> Tensor:
    """The ``(N, C, 1, ...)`` mean of every map, accumulated in float32 for float16/bfloat16 inputs."""
    accumulate = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True, dtype=accumulate)


class _GainControlFunction(torch.autograd.Function):
    """``gain * x - gain * beta * mean + bias`` for a given ``(N, C, 1, ...)`` map mean, with a lean backward.

    The layer is linear in ``x`` and in ``mean``: for the output gradient ``g``, ``dL/dx = gain * g``,
    ``dL/dmean = -gain * beta * sum_spatial(g)``, ``dL/dbeta = -sum_n gain * mean * sum_spatial(g)`` and
    ``dL/dbias = sum g``. Only ``dL/dgain = sum g * x - beta * sum_n mean * sum_spatial(g)`` needs ``x``, so
    ``x`` is saved only when ``gain`` requires a gradient; without a gain (folded into the preceding conv)
    autograd keeps the means and nothing activation-sized. The mean is taken outside, by autograd (its
    backward saves nothing), so the function stays differentiable twice.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, mean: Tensor, gain: Optional[Tensor], beta: Tensor, bias: Optional[Tensor]
    ) -> Tensor:
        scale = beta if gain is None else gain * beta
        shift = (mean * per_channel(scale, mean)).to(x.dtype)
        out = channel_affine(x, gain, bias)  # gain * x + bias, one fused pass
        out = out - shift if out is x else out.sub_(shift)
        needs_x = gain is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(x if needs_x else None, mean, gain, beta)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, mean, gain, beta = ctx.saved_tensors
        spatial = tuple(range(2, grad.dim()))
        dims = (0, *spatial)
        grad_sum = grad.sum(dim=spatial, keepdim=True, dtype=mean.dtype)  # (N, C, 1, ...)
        grad_x = grad_mean = grad_gain = grad_beta = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = channel_affine(grad, gain, None)  # gain * grad
        if ctx.needs_input_grad[1]:
            scale = beta if gain is None else gain * beta
            grad_mean = -grad_sum * per_channel(scale, grad_sum)
        mean_times_grad = (mean * grad_sum).sum(dim=dims)  # sum_n mean * sum_spatial(grad), shape (C,)
        if ctx.needs_input_grad[3]:
            grad_beta = -(mean_times_grad if gain is None else gain.to(mean.dtype) * mean_times_grad)
            grad_beta = grad_beta.to(beta.dtype)
        if x is not None and ctx.needs_input_grad[2]:
            accumulate = mean.dtype
            grad_gain = (grad.to(accumulate) * x.to(accumulate)).sum(dim=dims) - beta.to(accumulate) * mean_times_grad
            grad_gain = grad_gain.to(gain.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
            grad_bias = grad_sum.sum(dim=dims).to(ctx.bias_dtype)
        return grad_x, grad_mean, grad_gain, grad_beta, grad_bias


def automatic_gain_control(
    x: Tensor, gain: Optional[Tensor], beta: Tensor, bias: Optional[Tensor] = None
) -> Tensor:
    """Deep Control's gain control, ``gain * (x - beta * mean_spatial(x)) + bias``, per sample and channel.

    The spatial mean of every ``(n, c)`` map is accumulated in float32 for float16/bfloat16 inputs. The
    output has the input's dtype and memory format (``channels_last`` stays ``channels_last``). The layer is
    linear in ``x``, and its backward pass is written out (a ``torch.autograd.Function``) so that autograd
    keeps only the ``(N, C, 1, ...)`` map means -- plus ``x`` itself when ``gain`` requires a gradient, which
    ``dL/dgain = sum(grad * (x - beta * mean))`` needs. Fold the gain into the preceding conv
    (``replace_batchnorm(..., "agc_fold")``, ``gain=None`` here) and nothing activation-sized is saved.

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
    return _GainControlFunction.apply(x, _spatial_mean(x), gain, beta, bias)


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
        gain: learn a per-channel gain. ``False`` leaves it out (``gain = 1``, ``gain_init`` unused): for a
            gain folded into the preceding conv (``replace_batchnorm(..., "agc_fold")``), where the layer then
            saves nothing activation-sized for backward.

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
        gain: bool = True,
    ) -> None:
        super().__init__()
        self.num_features = _check_num_features(num_features)
        self.beta_init = _check_beta_init(beta_init)
        self.gain_init = _check_finite("gain_init", gain_init)
        _check_bool("bias", bias)
        _check_bool("gain", gain)
        factory = {"device": device, "dtype": dtype}
        if gain:
            self.gain = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("gain", None)
        self.beta = nn.Parameter(torch.empty(num_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        self._warned_single_element = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set ``gain`` (if any) to ``gain_init``, ``beta`` to ``beta_init`` and ``bias`` to 0."""
        with torch.no_grad():
            if self.gain is not None:
                self.gain.fill_(self.gain_init)
            self.beta.fill_(self.beta_init)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Apply the gain control to ``x`` of shape ``(N, C, *spatial)``."""
        _check_input(x, self.num_features, 3, f"{type(self).__name__}({self.num_features})")
        if not self._warned_single_element and math.prod(x.shape[2:]) == 1:
            self._warned_single_element = True  # looked at once, so later steps make no host sync for it
            if bool((self.beta != 0).any()):  # beta = 0 (set by calibration on such maps) passes everything
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
            f"bias={self.bias is not None}" + ("" if self.gain is not None else ", gain=False")
        )

    @classmethod
    def from_batchnorm(
        cls, batchnorm: nn.modules.batchnorm._BatchNorm, beta_init: float = 1.0, gain: bool = True
    ) -> AutomaticGainControl:
        """Build the layer that replaces ``batchnorm``: ``gain``/``bias`` from its affine parameters.

        ``gain`` and ``bias`` are copied from BatchNorm's ``weight`` and ``bias`` (their ``requires_grad``
        too); ``beta`` starts at ``beta_init``. A BatchNorm without affine parameters gives ``gain = 1``
        and ``bias = 0``, learnable. Device, dtype and training mode follow the BatchNorm.

        Args:
            batchnorm: the BatchNorm (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) to replace.
            beta_init: initial value of every ``beta``.
            gain: give the layer a ``gain``; ``False`` when BatchNorm's ``weight`` goes into the preceding
                conv's scale instead (see :func:`~lightning_msr.replace_batchnorm`, ``"agc_fold"``).

        Returns:
            A new :class:`AutomaticGainControl`.

        Example::

            >>> from torch import nn
            >>> from lightning_msr.nn import AutomaticGainControl
            >>> AutomaticGainControl.from_batchnorm(nn.BatchNorm2d(32), beta_init=0.9)
            AutomaticGainControl(32, beta_init=0.9, gain_init=1.0, bias=True)
        """
        layer = cls(
            int(batchnorm.num_features), beta_init=beta_init, bias=True, gain=gain, **_factory_of(batchnorm)
        )
        _copy_affine_(batchnorm, layer.gain, layer.bias)
        return layer.train(batchnorm.training)
