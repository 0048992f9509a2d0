"""Tests of the per-sample layers: AutomaticGainControl (Deep Control) and ChannelAffine."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_msr import MSRConfigurationError, MSRWarning
from lightning_msr.nn import AutomaticGainControl
from lightning_msr.nn.affine import ChannelAffine, channel_affine
from lightning_msr.nn.gain_control import automatic_gain_control


def reference_agc(x, gain, beta, bias):
    """The paper's formula written out, one (n, c) map at a time."""
    out = torch.empty_like(x)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            fmap = x[n, c]
            out[n, c] = gain[c] * (fmap - beta[c] * fmap.mean()) + bias[c]
    return out


def randomised(layer: AutomaticGainControl, seed: int = 0) -> AutomaticGainControl:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return layer


@pytest.mark.parametrize("shape", [(3, 4, 7), (3, 4, 5, 6), (2, 4, 3, 4, 5)], ids=["1d", "2d", "3d"])
def test_agc_matches_reference(shape):
    layer = randomised(AutomaticGainControl(4, dtype=torch.float64))
    x = torch.randn(shape, dtype=torch.float64) + 2.0
    expected = reference_agc(x, layer.gain, layer.beta, layer.bias)
    torch.testing.assert_close(layer(x), expected)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    beta=st.floats(0, 1),
)
def test_agc_matches_reference_any_shape(batch, channels, spatial, beta):
    layer = randomised(AutomaticGainControl(channels, beta_init=beta, dtype=torch.float64))
    x = torch.randn(batch, channels, *spatial, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference_agc(x, layer.gain, layer.beta, layer.bias))


def test_agc_default_init_removes_map_mean():
    layer = AutomaticGainControl(6)
    x = torch.randn(4, 6, 5, 5) * 3 + 10
    out = layer(x)
    torch.testing.assert_close(out.mean(dim=(2, 3)), torch.zeros(4, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, x - x.mean(dim=(2, 3), keepdim=True))


def test_agc_beta_zero_is_affine():
    layer = randomised(AutomaticGainControl(3, dtype=torch.float64))
    with torch.no_grad():
        layer.beta.zero_()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    expected = x * layer.gain.view(-1, 1, 1) + layer.bias.view(-1, 1, 1)
    torch.testing.assert_close(layer(x), expected)


def test_agc_gradcheck():
    gain, beta, bias = (torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(automatic_gain_control, (x, gain, beta, bias))
    assert torch.autograd.gradgradcheck(automatic_gain_control, (x, gain, beta, bias))
    # without gain and bias (the identity branch of the affine part)
    assert torch.autograd.gradcheck(lambda x, beta: automatic_gain_control(x, None, beta), (x, beta))


def test_agc_module_gradcheck_3d():
    layer = randomised(AutomaticGainControl(2, dtype=torch.float64))
    x = torch.randn(2, 2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_agc_batch_independence():
    layer = randomised(AutomaticGainControl(5))
    x = torch.randn(6, 5, 7, 7)
    batched = layer(x)
    for i in range(len(x)):
        torch.testing.assert_close(batched[i : i + 1], layer(x[i : i + 1]))
    # changing the other samples does not change sample 0
    other = x.clone()
    other[1:] = torch.randn_like(other[1:]) * 100
    torch.testing.assert_close(layer(other)[0], batched[0])


def test_agc_gradients_are_per_sample():
    """The gradient w.r.t. one sample's input does not depend on the other samples' loss."""
    layer = randomised(AutomaticGainControl(3))
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    layer(x)[0].square().sum().backward()
    assert x.grad[1:].abs().max() == 0
    assert x.grad[0].abs().max() > 0


def test_agc_train_equals_eval():
    layer = randomised(AutomaticGainControl(4))
    x = torch.randn(3, 4, 6, 6)
    assert torch.equal(layer.train()(x), layer.eval()(x))
    assert len(list(layer.buffers())) == 0


def test_agc_batch_size_one_in_training():
    layer = AutomaticGainControl(4).train()
    assert layer(torch.randn(1, 4, 1, 3)).shape == (1, 4, 1, 3)


def test_agc_warns_once_about_single_element_maps():
    layer = AutomaticGainControl(4)
    with pytest.warns(MSRWarning, match=r"maps of a single element \(input shape \(2, 4, 1, 1\)\)"):
        out = layer(torch.randn(2, 4, 1, 1))
    torch.testing.assert_close(out, torch.zeros(2, 4, 1, 1))  # beta = 1 cancels the whole signal
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(2, 4, 1, 1))  # once per layer
        AutomaticGainControl(4)(torch.randn(2, 4, 2, 1))  # more than one element: no warning


def test_agc_channels_last():
    layer = randomised(AutomaticGainControl(8))
    x = torch.randn(2, 8, 5, 6)
    x_cl = x.to(memory_format=torch.channels_last)
    out = layer(x_cl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, layer(x))
    x3 = torch.randn(2, 8, 3, 4, 5)
    out3 = layer(x3.to(memory_format=torch.channels_last_3d))
    assert out3.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out3, layer(x3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_agc_low_precision_input(dtype):
    layer = randomised(AutomaticGainControl(4))
    x = torch.randn(2, 4, 16, 16) + 50.0  # a large common mode: the mean must be accurate
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    expected = reference_agc(x.to(dtype).double(), layer.gain.double(), layer.beta.double(), layer.bias.double())
    torch.testing.assert_close(out.double(), expected, atol=0.5, rtol=0.02)
    out.float().sum().backward()
    assert layer.gain.grad is not None and layer.gain.grad.dtype == torch.float32


def test_agc_parameters_and_repr():
    layer = AutomaticGainControl(3, beta_init=0.25, gain_init=2.0)
    assert {name for name, _ in layer.named_parameters()} == {"gain", "beta", "bias"}
    torch.testing.assert_close(layer.beta.detach(), torch.full((3,), 0.25))
    torch.testing.assert_close(layer.gain.detach(), torch.full((3,), 2.0))
    torch.testing.assert_close(layer.bias.detach(), torch.zeros(3))
    assert repr(layer) == "AutomaticGainControl(3, beta_init=0.25, gain_init=2.0, bias=True)"
    no_bias = AutomaticGainControl(3, bias=False)
    assert no_bias.bias is None and "bias=False" in repr(no_bias)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(no_bias(x), x - x.mean(dim=2, keepdim=True))


def test_agc_device_dtype_and_state_dict():
    layer = AutomaticGainControl(3, dtype=torch.float64, device="meta")
    assert layer.gain.dtype == torch.float64 and layer.gain.device.type == "meta"
    source = randomised(AutomaticGainControl(3))
    target = AutomaticGainControl(3)
    target.load_state_dict(source.state_dict())
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(target(x), source(x))


def test_agc_from_batchnorm():
    bn = nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        bn.weight.copy_(torch.arange(1.0, 5.0))
        bn.bias.copy_(torch.arange(4.0))
    bn.bias.requires_grad_(False)
    layer = AutomaticGainControl.from_batchnorm(bn, beta_init=0.5)
    assert layer.gain.dtype == torch.float64 and not layer.training
    torch.testing.assert_close(layer.gain.detach(), bn.weight.detach())
    torch.testing.assert_close(layer.bias.detach(), bn.bias.detach())
    torch.testing.assert_close(layer.beta.detach(), torch.full((4,), 0.5, dtype=torch.float64))
    assert layer.gain.requires_grad and not layer.bias.requires_grad
    assert layer.gain.data_ptr() != bn.weight.data_ptr()  # copies, the old layer stays intact

    plain = AutomaticGainControl.from_batchnorm(nn.BatchNorm1d(3, affine=False))
    torch.testing.assert_close(plain.gain.detach(), torch.ones(3))
    torch.testing.assert_close(plain.bias.detach(), torch.zeros(3))
    assert plain.gain.requires_grad and plain.bias.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_features": 0}, "Expected `num_features` to be a positive integer, but got 0."),
        ({"num_features": 2.0}, "Expected `num_features` to be a positive integer"),
        ({"num_features": True}, "Expected `num_features` to be a positive integer"),
        ({"num_features": 2, "beta_init": float("nan")}, r"Expected `beta_init` to be in \[0, 1\], but got nan."),
        ({"num_features": 2, "gain_init": "1"}, "Expected `gain_init` to be a finite number"),
        ({"num_features": 2, "bias": 1}, "Expected `bias` to be True or False, but got 1."),
    ],
)
def test_agc_argument_validation(kwargs, match):
    with pytest.raises(MSRConfigurationError, match=match):
        AutomaticGainControl(**kwargs)


def test_agc_rejects_inputs_without_spatial_dims_or_wrong_channels():
    layer = AutomaticGainControl(4)
    with pytest.raises(MSRConfigurationError, match=r"at least one spatial dim, but got shape \(2, 4\)"):
        layer(torch.randn(2, 4))
    with pytest.raises(MSRConfigurationError, match=r"with 4 channels in dim 1, but got shape \(2, 3, 5\)"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(MSRConfigurationError, match=r"Expected `gain` to have 2 elements like `beta`, but got 3\."):
        automatic_gain_control(torch.randn(1, 2, 3), torch.ones(3), torch.ones(2))


# ----------------------------------------------------------------------------------------------- ChannelAffine


@pytest.mark.parametrize("shape", [(5, 3), (5, 3, 4), (5, 3, 4, 4), (2, 3, 2, 3, 4)])
def test_channel_affine_matches_reference(shape):
    layer = ChannelAffine(3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, -2.0, 3.0]))
        layer.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    x = torch.randn(shape, dtype=torch.float64)
    view = (-1,) + (1,) * (len(shape) - 2)
    torch.testing.assert_close(layer(x), x * layer.weight.view(view) + layer.bias.view(view), rtol=0, atol=1e-12)


def test_channel_affine_gradcheck_and_independence():
    weight, bias = torch.randn(3, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64)
    bias.requires_grad_(True)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(channel_affine, (x, weight, bias))
    assert torch.autograd.gradgradcheck(channel_affine, (x, weight, bias))
    layer = ChannelAffine(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(layer.train()(x)[2:3], layer.eval()(x[2:3]))


def test_channel_affine_channels_last_low_precision_and_validation():
    layer = ChannelAffine(4)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
    x = torch.randn(2, 4, 3, 3)
    out = layer(x.to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, layer(x))
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert repr(ChannelAffine(4, bias=False)) == "ChannelAffine(4, bias=False)"
    assert ChannelAffine(4, bias=False).bias is None
    with pytest.raises(MSRConfigurationError, match=r"with 4 channels in dim 1, but got shape \(2, 5\)"):
        layer(torch.randn(2, 5))
    with pytest.raises(MSRConfigurationError, match="positive integer"):
        ChannelAffine(-1)
    assert channel_affine(x, None, None) is x


def test_channel_affine_from_batchnorm():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    layer = ChannelAffine.from_batchnorm(bn)
    assert layer.training
    torch.testing.assert_close(layer.weight.detach(), bn.weight.detach())
    torch.testing.assert_close(layer.bias.detach(), bn.bias.detach())
    # a fresh BatchNorm in eval mode (mean 0, variance 1) is the affine layer up to its eps
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(layer(x), bn.eval()(x), rtol=1e-4, atol=1e-5)
    # with trained statistics, folding them reproduces BatchNorm's evaluation output
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -1.0, 0.5]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 9.0]))
    folded = ChannelAffine.from_batchnorm(bn, fold_running_stats=True)
    assert not folded.training
    torch.testing.assert_close(folded(x), bn(x))
    # affine=False: scale 1 and bias 0, learnable
    plain = ChannelAffine.from_batchnorm(nn.BatchNorm1d(5, affine=False, track_running_stats=False))
    torch.testing.assert_close(plain.weight.detach(), torch.ones(5))
    assert plain.weight.requires_grad and plain.bias.requires_grad


# --------------------------------------------------------------------------- the lean backward
def _saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


def test_agc_without_gain_saves_only_the_map_means():
    layer = AutomaticGainControl(8, beta_init=0.7, gain=False)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    out, saved = _saved(lambda: layer(x))
    params = {p.data_ptr() for p in layer.parameters()}
    activations = [t for t in saved if t.data_ptr() not in params]
    assert activations and all(t.shape == (4, 8, 1, 1) for t in activations)  # nothing activation-sized
    torch.relu_(out).sum().backward()  # so the next in-place ReLU is safe
    assert x.grad is not None and layer.beta.grad is not None and layer.bias.grad is not None


def test_agc_with_gain_saves_its_input_for_the_gain_gradient_only():
    layer = AutomaticGainControl(8)
    x = torch.randn(4, 8, 6, 6)
    _, saved = _saved(lambda: layer(x))
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # dL/dgain = sum(grad * (x - beta * mean))
    layer.gain.requires_grad_(False)
    _, saved = _saved(lambda: layer(x))
    assert not any(t.shape == x.shape for t in saved)


@pytest.mark.parametrize("shape", [(3, 4, 7), (2, 4, 3, 5), (2, 4, 2, 3, 2)], ids=["1d", "2d", "3d"])
def test_agc_function_gradcheck_float64(shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    gain, beta, bias = (torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(automatic_gain_control, (x, gain, beta, bias))
    assert torch.autograd.gradcheck(automatic_gain_control, (x, None, beta, bias))
    assert torch.autograd.gradgradcheck(lambda x, beta: automatic_gain_control(x, None, beta, bias), (x, beta))


def test_agc_without_gain_after_a_scaled_conv_equals_agc_with_gain():
    from lightning_msr.nn import ScaledConv2d

    torch.manual_seed(0)
    conv = ScaledConv2d(3, 4, 3, bias=False)
    folded = AutomaticGainControl(4, beta_init=0.6, gain=False)
    unfolded = AutomaticGainControl(4, beta_init=0.6)
    with torch.no_grad():
        conv.scale.uniform_(0.5, 2.0)
        unfolded.gain.copy_(conv.scale)
        folded.bias.normal_()
        unfolded.bias.copy_(folded.bias)
    x = torch.randn(2, 3, 8, 8)
    plain = nn.functional.conv2d(x, conv.weight)
    torch.testing.assert_close(folded(conv(x)), unfolded(plain), rtol=1e-5, atol=1e-6)
    assert repr(folded) == "AutomaticGainControl(4, beta_init=0.6, gain_init=1.0, bias=True, gain=False)"


def test_agc_low_precision_autocast_gradients_keep_parameter_dtypes():
    layer = AutomaticGainControl(4, beta_init=0.5)
    x = torch.randn(2, 4, 5, 5, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert layer.gain.grad.dtype == layer.beta.grad.dtype == layer.bias.grad.dtype == torch.float32
