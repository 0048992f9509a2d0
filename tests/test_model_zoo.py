"""Standard torchvision models adopted with the one-line defaults start like BatchNorm and train.

Each model is built with BatchNorm, as users have it, and adopted unchanged by callbacks:
``MeanShiftRejection(batchnorm="replace")`` or ``DeepControl()`` + ``MeanShiftRejection()``. At batch size 2 on
64x64 inputs, the signal reaching the classifier in the first training step must be within 10x of what the same
model gives with BatchNorm in training mode, four SGD steps at BatchNorm's learning rate (0.01, momentum 0.9)
must stay finite, and every conv weight must move.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import lightning as L
import pytest
import torch
import torchvision
from torch import nn

import lightning_msr

pytestmark = pytest.mark.free_stem  # the defaults as shipped, the stem left free

MODELS = [
    "resnet50",
    "resnet152",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "vgg16_bn",
    "regnet_x_3_2gf",
    "mnasnet1_0",
    "densenet121",
]
RECIPES = {
    "msr_replace": lambda: [lightning_msr.MeanShiftRejection(batchnorm="replace")],
    "deep_control_msr": lambda: [lightning_msr.DeepControl(), lightning_msr.MeanShiftRejection()],
}


class Classifier(L.LightningModule):
    """Records the first training step's classifier input RMS and every loss."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.losses: list[float] = []
        self.head_rms: float | None = None
        self.head = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.head_rms is None:
            self.head_rms = float(args[0].detach().double().square().mean().sqrt())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        handle = self.head.register_forward_hook(self._record)
        loss = nn.functional.cross_entropy(self.net(x), y)
        handle.remove()
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def _data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 10, (8,), generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(data, batch_size=2)


_REFERENCE: dict[str, tuple[nn.Module, float]] = {}


def _reference(name: str) -> tuple[nn.Module, float]:
    """The BatchNorm model (fresh, seeded) and its classifier-input RMS on the first batch in training mode."""
    if name not in _REFERENCE:
        torch.manual_seed(0)
        net = torchvision.models.get_model(name, num_classes=10)
        probe = Classifier(copy.deepcopy(net)).train()
        x, y = next(iter(_data()))
        with torch.no_grad():
            probe.training_step((x, y), 0)
        _REFERENCE.clear()  # keep one model in memory at a time
        _REFERENCE[name] = (net, probe.head_rms)
    return _REFERENCE[name]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("name", MODELS)
def test_default_adoption_starts_like_batchnorm_and_trains(tmp_path, name, recipe):
    net, batchnorm_rms = _reference(name)
    model = Classifier(copy.deepcopy(net))
    convs = [(n, m) for n, m in model.net.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    before = {n: m.weight.detach().clone() for n, m in convs}
    trainer = L.Trainer(
        max_steps=4,
        callbacks=RECIPES[recipe](),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, _data())
    assert not lightning_msr.find_batchnorm(model)
    ratio = model.head_rms / batchnorm_rms
    assert 0.1 <= ratio <= 10, f"classifier input RMS {model.head_rms:.3g} vs BatchNorm's {batchnorm_rms:.3g}"
    assert len(model.losses) == 4 and all(math.isfinite(loss) for loss in model.losses), model.losses
    after = dict(model.net.named_modules())
    unmoved = [n for n, w in before.items() if torch.equal(w, after[n].weight.detach())]
    assert not unmoved, f"{len(unmoved)} conv weight(s) did not move, e.g. {unmoved[:3]}"
