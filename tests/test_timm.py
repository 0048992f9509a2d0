"""timm's models: their BatchNormAct2d is replaced (or folded) with its drop path and activation kept, exactly."""

from __future__ import annotations

import copy
import math
import warnings

import lightning as L
import pytest
import torch
from helpers import trainer
from torch import nn

import lightning_msr
from lightning_msr import MSRConfigurationError, replace_batchnorm
from lightning_msr.nn import AutomaticGainControl, ChannelAffine, NormAct
from lightning_msr.nn.norm_act import is_norm_act

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d  # noqa: E402

MODELS = ["efficientnet_b0", "mobilenetv3_small_100", "regnetx_002", "rexnet_100", "lcnet_050"]


def _randomised(name: str) -> nn.Module:
    """A timm model without weights whose BatchNorm layers have non-trivial affine parameters and statistics."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("replacement", ["fold", "affine"])
@pytest.mark.parametrize("name", MODELS)
def test_converted_timm_model_computes_what_the_batchnorm_model_computes(name, replacement):
    """With the running statistics folded in, the converted model's output is the BatchNorm model's in eval mode:
    every activation and drop path is still there, in its place."""
    model = _randomised(name)
    norm_acts = {n: (m.drop, m.act) for n, m in model.named_modules() if is_norm_act(m)}
    assert norm_acts, "the model is built with BatchNormAct2d"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
    converted = copy.deepcopy(model)
    result = replace_batchnorm(converted, replacement, fold_running_stats=True)
    assert not lightning_msr.find_batchnorm(converted)
    for bn_name, (drop, act) in norm_acts.items():
        new = converted.get_submodule(bn_name)
        assert isinstance(new, NormAct), bn_name
        assert type(new.drop) is type(drop) and type(new.act) is type(act)  # the very layers, not look-alikes
        expected = nn.Identity if bn_name in result.folded else ChannelAffine
        assert isinstance(new.norm, expected)
    if replacement == "fold":
        assert len(result.folded) > len(result) / 2
    with torch.no_grad():
        out = converted.eval()(x)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))


def test_agc_keeps_the_activation_after_the_gain_control():
    """Deep Control's layer in BatchNormAct2d's place, checked against the formula written out by hand."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), BatchNormAct2d(6, act_layer=nn.SiLU))
    replace_batchnorm(net, "agc")
    assert isinstance(net[1], NormAct) and isinstance(net[1].norm, AutomaticGainControl)
    with torch.no_grad():
        net[1].norm.gain.uniform_(0.5, 2.0)
        net[1].norm.beta.uniform_(0.2, 1.0)
        net[1].norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 3, 9, 9)
    y = net[0](x)
    agc = net[1].norm
    by_hand = nn.functional.silu(
        agc.gain.view(1, -1, 1, 1) * (y - agc.beta.view(1, -1, 1, 1) * y.mean(dim=(2, 3), keepdim=True))
        + agc.bias.view(1, -1, 1, 1)
    )
    torch.testing.assert_close(net(x), by_hand)


def test_other_batchnorm_subclasses_with_their_own_forward_stay_refused():
    class Custom(nn.BatchNorm2d):
        def __init__(self, n: int) -> None:
            super().__init__(n)
            self.drop, self.act = nn.Identity(), nn.ReLU()

        def forward(self, x):  # the activation first: not timm's order
            return super().forward(self.act(x))

    with pytest.raises(MSRConfigurationError, match="'0' is a Custom, a BatchNorm subclass with its own forward"):
        replace_batchnorm(nn.Sequential(Custom(3)), "fold")


class _Classifier(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


@pytest.mark.parametrize("recipe", ["msr_replace", "deep_control_msr"])
def test_timm_efficientnet_adopted_in_one_line_trains(tmp_path, recipe):
    net = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)
    activations = sum(isinstance(m, nn.SiLU) for m in net.modules())
    callbacks = {
        "msr_replace": [lightning_msr.MeanShiftRejection(batchnorm="replace", calibration_samples=8)],
        "deep_control_msr": [lightning_msr.DeepControl(), lightning_msr.MeanShiftRejection(calibration_samples=8)],
    }[recipe]
    g = torch.Generator().manual_seed(0)
    x = nn.functional.interpolate(torch.randn(24, 3, 8, 8, generator=g), size=64, mode="bilinear")
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 10, (24,), generator=g))
    model = _Classifier(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, max_steps=12, callbacks=callbacks).fit(model, torch.utils.data.DataLoader(data, batch_size=2))
    assert not lightning_msr.find_batchnorm(net)
    assert sum(isinstance(m, nn.SiLU) for m in net.modules()) == activations  # no activation lost
    assert len(model.losses) == 12 and all(math.isfinite(v) for v in model.losses), model.losses
