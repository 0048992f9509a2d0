"""Convolutions with a learnable per-filter scale: BatchNorm's scale folded into the conv that feeds it.

Mean Shift Rejection (Ruff, Beck, Bach, arXiv:1911.13173) pairs every zero-mean, unit-magnitude conv kernel
with a learnable per-filter scale and a per-map bias. As a separate layer after the conv
(:class:`~lightning_msr.nn.affine.ChannelAffine`) that scale needs the conv *output* for its own gradient,
so it keeps one activation-sized tensor per conv alive for backward -- as much as the BatchNorm it replaced.
:class:`ScaledConv2d` (and its 1-D/3-D siblings) computes the same function inside the convolution::

    y[:, o] = conv(x, scale[o] * weight[o]) + bias[o] = scale[o] * conv(x, weight[o]) + bias[o]

The scale multiplies the small weight tensor, not the activation, so autograd saves only what the conv saves
anyway (its input and the scaled weight): nothing activation-sized is left between the conv and the next
activation. ``weight`` is the filter *direction*, the tensor Mean Shift Rejection keeps zero-mean (and at a
fixed norm with ``keep_magnitude``); ``scale`` is its own parameter and is never centred.

:func:`~lightning_msr.replace_batchnorm` with ``replacement="fold"`` builds these layers from conv ->
BatchNorm pairs, and :func:`~lightning_msr.merge_scaled_convs` turns them back into plain convolutions
(``weight = scale * weight``) for inference and export.

Example::

    >>> import torch
    >>> from lightning_msr.nn import ScaledConv2d
    >>> conv = ScaledConv2d(3, 4, 3)
    >>> with torch.no_grad():
    ...     _ = conv.scale.fill_(2.0)
    >>> x = torch.randn(1, 3, 8, 8)
    >>> plain = torch.nn.functional.conv2d(x, conv.weight, None)
    >>> torch.allclose(conv(x), 2.0 * plain + conv.bias.view(1, -1, 1, 1), atol=1e-6)
    True
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_msr.exceptions import MSRConfigurationError
from lightning_msr.nn._broadcast import per_channel

__all__ = [
    "ScaledConv",
    "ScaledConv1d",
    "ScaledConv2d",
    "ScaledConv3d",
    "is_scaled_conv",
    "merge_scale_",
    "scale_conv_",
    "scaled_conv",
    "scaled_weight",
]

_PlainConv = Union[nn.Conv1d, nn.Conv2d, nn.Conv3d]


def scaled_weight(weight: Tensor, scale: Tensor) -> Tensor:
    """``scale[o] * weight[o]`` for a conv weight of shape ``(out, in / groups, *kernel)`` and ``scale`` of ``(out,)``.

    The result has ``weight``'s memory format (a ``channels_last`` weight stays ``channels_last``).

    Args:
        weight: a conv weight (the filter directions).
        scale: one factor per output filter.

    Returns:
        A new tensor of ``weight``'s shape.

    Example::

        >>> import torch
        >>> from lightning_msr.nn.scaled_conv import scaled_weight
        >>> scaled_weight(torch.ones(2, 1, 1, 1), torch.tensor([2.0, -1.0])).flatten()
        tensor([ 2., -1.])
    """
    return weight * scale.view(-1, *([1] * (weight.dim() - 1)))


_CONVS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def _output_is_smaller(
    x: Tensor, weight: Tensor, stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...]
) -> bool:
    """Whether scaling the conv's output costs less memory traffic than scaling its weight.

    Scaling the weight takes two weight-sized passes in forward (``scale * weight``) and two in backward (the same
    product, recomputed); scaling the output takes up to four output-sized passes in forward (the product and the
    bias) and two in backward (``scale * grad``). Late layers of a network at small images (ResNet-18's last stage at
    64x64: 2.4 M weights per conv, 65 k outputs at batch 32) have far more weights than outputs.
    """
    out = x.shape[0] * weight.shape[0]
    for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation):
        out *= max((size + 2 * p - d * (k - 1) - 1) // s + 1, 0)
    return 3 * out < 2 * weight.numel()


class _ScaledConvFunction(torch.autograd.Function):
    """``conv(x, scale * weight) + bias`` that saves ``x``, ``weight`` and ``scale`` -- not ``scale * weight``.

    Through autograd, the conv would keep the scaled weight (a new weight-sized tensor per layer, as much as
    the model's parameters) alive until backward; here it is recomputed there, which costs one elementwise
    product per layer. ``dL/dweight = scale * dL/dW_eff`` and ``dL/dscale = sum(dL/dW_eff * weight)`` per
    output filter. Where the output is smaller than the weight, the scale multiplies the output instead
    (``scale * conv(x, weight) + bias``, and ``scale * grad`` for the input's gradient), so no weight-sized
    temporary is made: the same function, with less memory traffic. Under autocast the conv runs in the
    autocast dtype, in forward and in backward alike.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        scale: Tensor,
        bias: Optional[Tensor],
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
    ) -> Tensor:
        conv = _CONVS[weight.dim()]
        ctx.scale_output = _output_is_smaller(x, weight, stride, padding, dilation)
        if ctx.scale_output:  # a fresh tensor of ours: scaled (and shifted) in place
            out = conv(x, weight, None, stride, padding, dilation, groups)
            out.mul_(per_channel(scale, out))
            if bias is not None:
                out.add_(per_channel(bias, out))
        else:
            out = conv(x, scaled_weight(weight, scale), bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight, scale)
        ctx.options = (list(stride), list(padding), list(dilation), groups)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight, scale = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.options
        needs_x, needs_weight, needs_scale, needs_bias = ctx.needs_input_grad[:4]
        needs_bias = needs_bias and ctx.bias_dtype is not None
        x_, bias_sizes = x.to(grad.dtype), None if ctx.bias_dtype is None else [weight.shape[0]]  # the conv's dtype
        options = (stride, padding, dilation, False, [0] * len(stride), groups)
        grad_x = None
        if ctx.scale_output:
            # y = scale * conv(x, weight) + bias: the input's gradient is the conv's for `scale * grad`, the filters'
            # (unscaled) and the bias's are the conv's for `grad`
            weight_ = weight.to(grad.dtype)
            if needs_x:
                scaled_grad = grad * per_channel(scale, grad)
                grad_x = torch.ops.aten.convolution_backward(
                    scaled_grad, x_, weight_, None, *options, [True, False, False]
                )[0]
            grad_effective = grad_bias = None
            if needs_weight or needs_scale or needs_bias:
                _, grad_effective, grad_bias = torch.ops.aten.convolution_backward(
                    grad, x_, weight_, bias_sizes, *options, [False, needs_weight or needs_scale, needs_bias]
                )
        else:
            grad_x, grad_effective, grad_bias = torch.ops.aten.convolution_backward(
                grad,
                x_,
                # the weight's gradient does not depend on the weight: the effective one only for the input's
                (scaled_weight(weight, scale) if needs_x else weight).to(grad.dtype),
                bias_sizes,
                *options,
                [needs_x, needs_weight or needs_scale, needs_bias],
            )
        # either way `grad_effective` is now the gradient of `scale * weight` (the effective weight)
        grad_weight = grad_scale = None
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        if grad_effective is not None:
            grad_effective = grad_effective.to(weight.dtype)
            if needs_scale:  # one dot product per filter: a weight-sized product and a row sum (a batched matrix
                # product of 1 x k by k x 1 per filter measured 6x slower on the CPU: 18 ms a step on resnet18)
                rows = grad_effective.reshape(weight.shape[0], -1)
                grad_scale = (rows * weight.reshape(weight.shape[0], -1)).sum(dim=1).to(scale.dtype)
            if needs_weight:  # a fresh tensor of ours: scale it in place
                grad_weight = grad_effective.mul_(scale.to(grad_effective.dtype).view(-1, *[1] * (weight.dim() - 1)))
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_scale, grad_bias, None, None, None, None


def _conv_options(conv: Any) -> dict[str, Any]:
    return {
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "padding_mode": conv.padding_mode,
    }


def scaled_conv(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    bias: Optional[Tensor] = None,
    stride: Union[int, tuple[int, ...]] = 1,
    padding: Union[int, str, tuple[int, ...]] = 0,
    dilation: Union[int, tuple[int, ...]] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> Tensor:
    """``conv(x, scale[o] * weight[o]) + bias[o]``: the functional form of :class:`ScaledConv2d` (and 1-D/3-D).

    The dimensionality follows ``weight`` (3-D: ``conv1d``, 4-D: ``conv2d``, 5-D: ``conv3d``). Autograd keeps
    ``x`` and the parameters for backward, not the scaled weight (it is recomputed in backward), except with a
    string ``padding`` (``"same"``/``"valid"``), which goes through the plain conv.

    Args:
        x: input of shape ``(N, C_in, *spatial)``.
        weight: conv weight ``(out, in / groups, *kernel)``, the filter directions.
        scale: per-filter scale ``(out,)``.
        bias: per-filter bias ``(out,)`` or ``None``.
        stride: as in ``torch.nn.functional.conv2d``.
        padding: as in ``torch.nn.functional.conv2d`` (int, tuple, ``"same"`` or ``"valid"``).
        dilation: as in ``torch.nn.functional.conv2d``.
        groups: as in ``torch.nn.functional.conv2d``.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``, as in ``nn.Conv2d``.

    Returns:
        The conv output.

    Example::

        >>> import torch
        >>> from lightning_msr.nn.scaled_conv import scaled_conv
        >>> x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
        >>> scale = torch.tensor([1.0, 2.0, -1.0])
        >>> out = scaled_conv(x, w, scale, padding=1)
        >>> torch.allclose(out, torch.nn.functional.conv2d(x, w, padding=1) * scale.view(-1, 1, 1), atol=1e-5)
        True
    """
    dims = weight.dim() - 2
    if isinstance(padding, str):
        if padding_mode != "zeros":
            raise MSRConfigurationError(
                f"Expected `padding_mode='zeros'` with a string `padding`, but got padding={padding!r} and "
                f"padding_mode={padding_mode!r}; pass the padding as numbers."
            )
        return _CONVS[weight.dim()](x, scaled_weight(weight, scale), bias, stride, padding, dilation, groups)
    as_tuple = lambda value: tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims  # noqa: E731
    padding = as_tuple(padding)
    if padding_mode != "zeros":
        pad = [p for p in reversed(padding) for _ in range(2)]
        x = F.pad(x, pad, mode=padding_mode)
        padding = (0,) * dims
    return _ScaledConvFunction.apply(x, weight, scale, bias, as_tuple(stride), padding, as_tuple(dilation), groups)


class _ScaledConv:
    """What the 1-D, 2-D and 3-D scaled convolutions share; mixed in before ``nn.ConvNd``."""

    scale: nn.Parameter
    weight: nn.Parameter
    bias: Optional[nn.Parameter]
    out_channels: int

    def __init__(self, *args: Any, device: Any = None, dtype: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, device=device, dtype=dtype, **kwargs)  # type: ignore[call-arg]  # nn.ConvNd's
        self.scale = nn.Parameter(torch.ones(self.out_channels, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """Reset ``weight`` and ``bias`` as the plain conv does, and ``scale`` to 1."""
        super().reset_parameters()  # type: ignore[misc]
        if "scale" in self._parameters:  # type: ignore[attr-defined]  # not yet during nn.ConvNd.__init__
            with torch.no_grad():
                self.scale.fill_(1.0)

    def forward(self, input: Tensor) -> Tensor:
        """The convolution of ``input`` with ``scale * weight``, plus ``bias``."""
        if isinstance(self.padding, str):  # "same"/"valid": nn.ConvNd works out the (maybe uneven) padding
            return self._conv_forward(input, scaled_weight(self.weight, self.scale), self.bias)  # type: ignore[attr-defined]
        return scaled_conv(input, self.weight, self.scale, self.bias, **_conv_options(self))


class ScaledConv2d(_ScaledConv, nn.Conv2d):
    """An ``nn.Conv2d`` whose output filters have a learnable scale: ``conv(x, scale[o] * weight[o]) + bias[o]``.

    BatchNorm's per-channel scale folded into the convolution (see :mod:`lightning_msr.nn.scaled_conv`): the
    same function as ``Conv2d`` followed by a :class:`~lightning_msr.nn.affine.ChannelAffine`, without the
    activation-sized tensor that layer saves for backward. It *is* an ``nn.Conv2d`` (``isinstance`` holds),
    so Mean Shift Rejection acts on its ``weight`` -- the filter direction: zero-mean init, gradient
    projection, re-centring, ``keep_magnitude`` -- and never on ``scale``.

    Parameters: ``weight`` (as ``nn.Conv2d``), ``scale`` of shape ``(out_channels,)`` initialised to 1, and
    ``bias`` of shape ``(out_channels,)`` (initialised as ``nn.Conv2d``'s, or absent with ``bias=False``), so
    that ``output[:, o] = scale[o] * conv2d(x, weight)[:, o] + bias[o]``.

    Args:
        *args: those of ``nn.Conv2d`` (``in_channels``, ``out_channels``, ``kernel_size``, ...).
        device: device of the parameters.
        dtype: dtype of the parameters.
        **kwargs: those of ``nn.Conv2d`` (``stride``, ``padding``, ``groups``, ``bias``, ...).

    Example::

        >>> import torch
        >>> from lightning_msr.nn import ScaledConv2d
        >>> conv = ScaledConv2d(4, 6, 3, bias=False)
        >>> conv.scale.shape, isinstance(conv, torch.nn.Conv2d)
        (torch.Size([6]), True)
        >>> _ = torch.nn.init.uniform_(conv.scale, 0.5, 2.0)
        >>> x = torch.randn(2, 4, 9, 9)
        >>> expected = torch.nn.functional.conv2d(x, conv.weight) * conv.scale.view(-1, 1, 1)
        >>> torch.allclose(conv(x), expected, atol=1e-6)
        True
    """


class ScaledConv1d(_ScaledConv, nn.Conv1d):
    """An ``nn.Conv1d`` with a learnable per-filter scale: :class:`ScaledConv2d` for 1-D inputs.

    Args:
        *args: those of ``nn.Conv1d``.
        device: device of the parameters.
        dtype: dtype of the parameters.
        **kwargs: those of ``nn.Conv1d``.

    Example::

        >>> import torch
        >>> from lightning_msr.nn import ScaledConv1d
        >>> conv = ScaledConv1d(2, 3, 3)
        >>> conv(torch.randn(4, 2, 10)).shape, conv.scale.shape
        (torch.Size([4, 3, 8]), torch.Size([3]))
    """


class ScaledConv3d(_ScaledConv, nn.Conv3d):
    """An ``nn.Conv3d`` with a learnable per-filter scale: :class:`ScaledConv2d` for 3-D inputs.

    Args:
        *args: those of ``nn.Conv3d``.
        device: device of the parameters.
        dtype: dtype of the parameters.
        **kwargs: those of ``nn.Conv3d``.

    Example::

        >>> import torch
        >>> from lightning_msr.nn import ScaledConv3d
        >>> conv = ScaledConv3d(2, 3, 3)
        >>> conv(torch.randn(1, 2, 5, 5, 5)).shape, conv.scale.shape
        (torch.Size([1, 3, 3, 3, 3]), torch.Size([3]))
    """


_PLAIN_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SCALED_TYPES = {nn.Conv1d: ScaledConv1d, nn.Conv2d: ScaledConv2d, nn.Conv3d: ScaledConv3d}
ScaledConv = Union[ScaledConv1d, ScaledConv2d, ScaledConv3d]


def is_scaled_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a :class:`ScaledConv1d`, :class:`ScaledConv2d` or :class:`ScaledConv3d`.

    Example::

        >>> from torch import nn
        >>> from lightning_msr.nn.scaled_conv import ScaledConv2d, is_scaled_conv
        >>> is_scaled_conv(ScaledConv2d(1, 2, 3)), is_scaled_conv(nn.Conv2d(1, 2, 3))
        (True, False)
    """
    return isinstance(module, _ScaledConv)


def _as_parameter(value: Tensor, like: Tensor) -> nn.Parameter:
    """A new parameter with ``value``'s values and ``requires_grad``, on ``like``'s device and dtype."""
    data = value.detach().to(device=like.device, dtype=like.dtype).clone()
    return nn.Parameter(data, requires_grad=value.requires_grad)


def scale_conv_(conv: _PlainConv, scale: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> ScaledConv:
    """Turn a plain ``nn.Conv1d/2d/3d`` into the matching scaled conv, in place (the module object is kept).

    The module becomes a :class:`ScaledConv1d`/:class:`ScaledConv2d`/:class:`ScaledConv3d` (as
    ``torch.nn.utils.parametrize`` does, by changing its class): ``weight`` stays the same ``Parameter``, and
    every reference to the module, its hooks and its name in the model keep working. It then computes
    ``scale[o] * conv(x, weight)[:, o] + bias[o]``.

    Args:
        conv: an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` (exactly: a subclass may compute its weight or
            output differently).
        scale: the per-filter scale, shape ``(out_channels,)``; its values and ``requires_grad`` are copied
            into the new ``scale`` parameter. ``None`` for 1, learnable.
        bias: the bias, shape ``(out_channels,)``. ``None`` keeps ``conv``'s bias (or none). Otherwise its
            values go into ``conv.bias`` (the same ``Parameter``) if there is one, or into a new parameter
            with ``bias``'s ``requires_grad``.

    Returns:
        ``conv``, now a scaled conv.

    Raises:
        MSRConfigurationError: if ``conv`` is not a plain ``nn.Conv1d/2d/3d``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_msr.nn.scaled_conv import scale_conv_
        >>> conv = nn.Conv2d(3, 4, 3, bias=False)
        >>> x = torch.randn(1, 3, 6, 6)
        >>> before = conv(x)
        >>> weight = conv.weight
        >>> scaled = scale_conv_(conv, scale=torch.full((4,), 0.5), bias=torch.zeros(4))
        >>> scaled is conv, type(conv).__name__, conv.weight is weight
        (True, 'ScaledConv2d', True)
        >>> torch.allclose(conv(x), 0.5 * before)
        True
    """
    cls = _SCALED_TYPES.get(type(conv))
    if cls is None:
        raise MSRConfigurationError(
            f"Expected a plain nn.Conv1d, nn.Conv2d or nn.Conv3d, but got {type(conv).__name__}: a subclass may "
            "compute its weight or output differently, which a scaled conv cannot reproduce."
        )
    weight = conv.weight
    if scale is None:
        scale = torch.ones(conv.out_channels, requires_grad=True)
    new_scale = _as_parameter(scale, weight)
    new_bias = None
    if bias is not None and conv.bias is None:
        new_bias = _as_parameter(bias, weight)
    elif bias is not None:
        with torch.no_grad():
            conv.bias.copy_(bias)
    conv.__class__ = cls
    conv.register_parameter("scale", new_scale)
    if new_bias is not None:
        conv.register_parameter("bias", new_bias)
    return conv  # type: ignore[return-value]


def merge_scale_(conv: ScaledConv) -> _PlainConv:
    """Turn a scaled conv back into a plain ``nn.ConvNd`` computing the same function, in place.

    ``weight`` becomes a new parameter holding ``scale * weight``; ``bias`` is kept and ``scale`` removed, so
    the module (same object, hooks kept) is a plain ``nn.Conv1d/2d/3d`` again, for inference and export. The
    new weight keeps the old one's ``requires_grad`` and memory format.

    Args:
        conv: a :class:`ScaledConv1d`, :class:`ScaledConv2d` or :class:`ScaledConv3d`.

    Returns:
        ``conv``, now a plain conv.

    Raises:
        MSRConfigurationError: if ``conv`` is not a scaled conv.

    Example::

        >>> import torch
        >>> from lightning_msr.nn.scaled_conv import ScaledConv2d, merge_scale_
        >>> conv = ScaledConv2d(3, 4, 3)
        >>> _ = torch.nn.init.uniform_(conv.scale, 0.5, 2.0)
        >>> x = torch.randn(1, 3, 6, 6)
        >>> before = conv(x)
        >>> merged = merge_scale_(conv)
        >>> type(merged).__name__, hasattr(merged, "scale")
        ('Conv2d', False)
        >>> torch.allclose(merged(x), before, atol=1e-6)
        True
    """
    if not is_scaled_conv(conv):
        raise MSRConfigurationError(
            f"Expected a ScaledConv1d, ScaledConv2d or ScaledConv3d, but got {type(conv).__name__}."
        )
    with torch.no_grad():
        merged = scaled_weight(conv.weight, conv.scale).detach()
    requires_grad = conv.weight.requires_grad
    conv.__class__ = next(c for c in type(conv).__mro__ if c in _PLAIN_TYPES)
    del conv._parameters["scale"]
    conv.weight = nn.Parameter(merged, requires_grad=requires_grad)
    return conv
