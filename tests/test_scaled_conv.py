"""ScaledConv1d/2d/3d: BatchNorm's scale inside the conv, the same function with less saved for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_msr import MSRConfigurationError
from lightning_msr.functional import eligible_weights
from lightning_msr.nn import ScaledConv1d, ScaledConv2d, ScaledConv3d
from lightning_msr.nn.affine import ChannelAffine
from lightning_msr.nn.scaled_conv import is_scaled_conv, merge_scale_, scale_conv_, scaled_conv


def saved_tensors(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


# a scaled conv of each dimensionality, its plain conv and an input shape
EACH_DIMENSION = pytest.mark.parametrize(
    ("cls", "plain", "shape"),
    [
        (ScaledConv1d, nn.Conv1d, (2, 4, 9)),
        (ScaledConv2d, nn.Conv2d, (2, 4, 7, 6)),
        (ScaledConv3d, nn.Conv3d, (1, 4, 4, 5, 3)),
    ],
    ids=["1d", "2d", "3d"],
)


@EACH_DIMENSION
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_equals_the_plain_conv_followed_by_a_channel_affine(cls, plain, shape, padding_mode):
    torch.manual_seed(0)
    scaled = cls(4, 6, 3, stride=2, padding=1, groups=2, padding_mode=padding_mode).double()
    with torch.no_grad():
        scaled.scale.uniform_(-2.0, 2.0)
        scaled.bias.normal_()
    conv = plain(4, 6, 3, stride=2, padding=1, groups=2, padding_mode=padding_mode, bias=False).double()
    conv.weight = scaled.weight
    affine = ChannelAffine(6, dtype=torch.float64)
    affine.weight, affine.bias = scaled.scale, scaled.bias
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(scaled(x), affine(conv(x)))
    assert torch.autograd.gradcheck(scaled, (x,))
    # the parameter gradients too (weight, scale, bias)
    grads = torch.autograd.grad(scaled(x).square().sum(), (x, scaled.weight, scaled.scale, scaled.bias))
    expected = torch.autograd.grad(affine(conv(x)).square().sum(), (x, scaled.weight, scaled.scale, scaled.bias))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


def _scale_then_shift(y, scale, bias):
    """``scale[c] * y[:, c] + bias[c]`` by plain autograd (the reference for the scaled convs)."""
    view = (1, -1) + (1,) * (y.dim() - 2)
    return y * scale.view(view) + (0 if bias is None else bias.view(view))


@pytest.mark.parametrize("scale_output", [True, False], ids=["output-scaled", "weight-scaled"])
@EACH_DIMENSION
def test_both_ways_of_applying_the_scale_give_the_same_function_and_gradients(
    monkeypatch, scale_output, cls, plain, shape
):
    """The scale multiplies the weight, or (where the output is smaller) the output and the incoming gradient: the
    same values and gradients either way, with and without a bias, and with an input that needs no gradient."""
    from lightning_msr.nn import scaled_conv as module

    monkeypatch.setattr(module, "_output_is_smaller", lambda *args: scale_output)
    torch.manual_seed(0)
    for bias in (True, False):
        scaled = cls(4, 6, 3, stride=2, padding=1, groups=2, bias=bias).double()
        with torch.no_grad():
            scaled.scale.uniform_(-2.0, 2.0)
            scaled.scale[0] = 0.0  # a scale of 0 has a gradient too
        conv = plain(4, 6, 3, stride=2, padding=1, groups=2, bias=False).double()
        conv.weight = scaled.weight
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        torch.testing.assert_close(scaled(x), _scale_then_shift(conv(x), scaled.scale, scaled.bias))
        assert torch.autograd.gradcheck(scaled, (x,))
        params = [p for p in (scaled.weight, scaled.scale, scaled.bias) if p is not None]
        for inputs in ((x, *params), params):  # the stem's case: no gradient for the input
            grads = torch.autograd.grad(scaled(x).square().sum(), inputs)
            expected = torch.autograd.grad(_scale_then_shift(conv(x), scaled.scale, scaled.bias).square().sum(), inputs)
            for a, b in zip(grads, expected):
                torch.testing.assert_close(a, b)
        for p in params:  # a frozen conv: only the input's gradient
            p.requires_grad_(False)
        (grad_x,) = torch.autograd.grad(scaled(x).square().sum(), (x,))
        torch.testing.assert_close(
            grad_x, torch.autograd.grad(_scale_then_shift(conv(x), scaled.scale, scaled.bias).square().sum(), (x,))[0]
        )


@pytest.mark.parametrize("scale_output", [True, False], ids=["output-scaled", "weight-scaled"])
def test_both_ways_under_bf16_autocast_run_the_conv_in_bf16_and_keep_float32_gradients(monkeypatch, scale_output):
    from lightning_msr.nn import scaled_conv as module

    monkeypatch.setattr(module, "_output_is_smaller", lambda *args: scale_output)
    torch.manual_seed(0)
    conv = ScaledConv2d(4, 6, 3)
    with torch.no_grad():
        conv.scale.uniform_(0.5, 2.0)
    reference = copy.deepcopy(conv)
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
        expected = nn.functional.conv2d(x, reference.weight * reference.scale.view(-1, 1, 1, 1), reference.bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    expected.float().sum().backward()
    for name in ("weight", "scale", "bias"):
        grad, want = getattr(conv, name).grad, getattr(reference, name).grad
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, want, rtol=2e-2, atol=2e-2)


def test_the_scale_goes_where_the_tensor_is_smaller():
    from lightning_msr.nn.scaled_conv import _output_is_smaller

    weight = torch.empty(512, 512, 3, 3)  # ResNet-18's last stage at 64x64: a 2x2 output map
    assert _output_is_smaller(torch.empty(32, 512, 2, 2), weight, (1, 1), (1, 1), (1, 1))
    assert not _output_is_smaller(torch.empty(32, 512, 56, 56), weight, (1, 1), (1, 1), (1, 1))
    depthwise = torch.empty(96, 1, 3, 3)  # MobileNetV2: nine weights a channel
    assert not _output_is_smaller(torch.empty(32, 96, 16, 16), depthwise, (2, 2), (1, 1), (1, 1))


def test_functional_gradcheck_without_bias_and_with_string_padding():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    s = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, s: scaled_conv(x, w, s, dilation=2, padding=2), (x, w, s))
    assert torch.autograd.gradcheck(lambda x, w, s: scaled_conv(x, w, s, padding="same"), (x, w, s))
    with pytest.raises(MSRConfigurationError, match="Expected `padding_mode='zeros'` with a string `padding`"):
        scaled_conv(x, w, s, padding="same", padding_mode="reflect")
    same = ScaledConv2d(3, 4, 4, padding="same", padding_mode="reflect").double()  # the module handles it
    assert same(x).shape == (2, 4, 5, 5)


def test_saves_its_input_and_parameters_only():
    conv = ScaledConv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 10, 10)
    out, saved = saved_tensors(lambda: conv(x))
    params = {p.data_ptr() for p in conv.parameters()}
    others = [t for t in saved if t.data_ptr() not in params]
    assert [t.data_ptr() for t in others] == [x.data_ptr()]  # no scaled copy of the weight, no output
    # so an in-place activation on the output is safe
    torch.relu_(out).sum().backward()
    assert conv.scale.grad is not None and conv.weight.grad is not None


def test_channels_last():
    conv = ScaledConv2d(4, 6, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    out = conv(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.sum().backward()
    assert conv.weight.grad.shape == conv.weight.shape


def test_is_a_conv_and_msr_acts_on_the_weight_only():
    model = nn.Sequential(ScaledConv2d(3, 4, 3), nn.ReLU())
    assert isinstance(model[0], nn.Conv2d) and is_scaled_conv(model[0])
    assert [w.name for w in eligible_weights(model)] == ["0.weight"]
    assert repr(model[0]) == "ScaledConv2d(3, 4, kernel_size=(3, 3), stride=(1, 1))"
    assert list(dict(model[0].named_parameters())) == ["weight", "bias", "scale"]
    model[0].reset_parameters()
    assert torch.equal(model[0].scale, torch.ones(4))


def test_scale_conv_and_merge_scale_in_place():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 6, 6)
    before = conv(x)
    weight, bias = conv.weight, conv.bias
    scale_conv_(conv, scale=torch.full((4,), 2.0))
    assert type(conv) is ScaledConv2d and conv.weight is weight and conv.bias is bias
    torch.testing.assert_close(conv(x), 2.0 * (before - bias.view(-1, 1, 1)) + bias.view(-1, 1, 1))
    after = conv(x)
    merge_scale_(conv)
    assert type(conv) is nn.Conv2d and "scale" not in dict(conv.named_parameters())
    assert conv.weight is not weight and conv.bias is bias
    torch.testing.assert_close(conv(x), after)
    with pytest.raises(MSRConfigurationError, match="Expected a ScaledConv1d, ScaledConv2d or ScaledConv3d, but got"):
        merge_scale_(conv)
    with pytest.raises(MSRConfigurationError, match=r"Expected a plain nn\.Conv1d, nn\.Conv2d or nn\.Conv3d, but got"):
        scale_conv_(nn.ConvTranspose2d(3, 4, 3))


def test_scale_conv_follows_device_dtype_and_requires_grad():
    conv = nn.Conv1d(2, 3, 3, bias=False).double()
    frozen = torch.ones(3, requires_grad=False)
    scale_conv_(conv, scale=frozen, bias=torch.zeros(3, requires_grad=True))
    assert conv.scale.dtype == conv.bias.dtype == torch.float64
    assert not conv.scale.requires_grad and conv.bias.requires_grad
