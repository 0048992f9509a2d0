"""The stem (the conv reading the network's input) is left free by default: not redrawn, not projected,
but calibrated and clipped like the other convs."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torchvision
from helpers import DEFAULT_MODE
from torch import nn

from lightning_msr import MeanShiftRejection
from lightning_msr.functional import eligible_weights, mean_shift, stem_conv

pytestmark = pytest.mark.free_stem


class Net(L.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 3),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _fit(model: Net, callback: MeanShiftRejection, steps: int = 4) -> None:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(32, 1, 8, 8) * 3 + 1, torch.randint(0, 3, (32,)))
    L.Trainer(
        max_steps=steps,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(model, torch.utils.data.DataLoader(data, batch_size=8))


def test_stem_conv_is_the_first_of_several_convs():
    net = torchvision.models.resnet18()
    assert stem_conv(net) is net.conv1
    mobile = torchvision.models.mobilenet_v2()
    assert stem_conv(mobile) is mobile.features[0][0]
    assert stem_conv(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())) is None  # a single conv is not a stem
    names = [w.name for w in eligible_weights(net, include_stem=False)]
    assert "conv1.weight" not in names and len(names) == len(eligible_weights(net)) - 1


def test_default_leaves_the_stem_free_but_calibrates_it():
    L.seed_everything(0)
    model = Net(lr=0.0)  # the step changes nothing: what is left is the calibration
    drawn = model.net[0].weight.detach().clone()
    callback = MeanShiftRejection()
    _fit(model, callback, steps=1)
    assert [w.name for w in callback.weights] == ["net.2.weight"]
    stem = model.net[0].weight.detach()
    # not redrawn: the user's filters, only rescaled per output channel by the calibration
    ratio = stem / drawn
    torch.testing.assert_close(ratio, ratio[:, :1, :1, :1].expand_as(ratio), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(ratio, torch.ones_like(ratio))  # the calibration did scale it
    assert float(mean_shift(stem, mode=DEFAULT_MODE)) > 0.1  # and it keeps its mean: nothing centred it
    assert float(mean_shift(model.net[2].weight, mode=DEFAULT_MODE)) < 1e-5


def test_stem_is_trained_free_and_clipped():
    L.seed_everything(0)
    model = Net()
    _fit(model, MeanShiftRejection(calibrate=False), steps=6)
    assert float(mean_shift(model.net[0].weight, mode=DEFAULT_MODE)) > 0.1
    assert float(mean_shift(model.net[2].weight, mode=DEFAULT_MODE)) < 1e-5


def test_include_stem_acts_on_every_conv():
    L.seed_everything(0)
    model = Net()
    callback = MeanShiftRejection(include_stem=True)
    _fit(model, callback)
    assert [w.name for w in callback.weights] == ["net.0.weight", "net.2.weight"]
    assert float(mean_shift(model.net[0].weight, mode=DEFAULT_MODE)) < 1e-5


def test_an_excluded_stem_is_not_calibrated():
    L.seed_everything(0)
    model = Net(lr=0.0)
    drawn = model.net[0].weight.detach().clone()
    _fit(model, MeanShiftRejection(exclude=["net.0"]), steps=1)
    assert torch.equal(model.net[0].weight.detach(), drawn)


def test_include_stem_is_checked():
    from lightning_msr import MSRConfigurationError

    with pytest.raises(MSRConfigurationError, match="include_stem"):
        MeanShiftRejection(include_stem="yes")
