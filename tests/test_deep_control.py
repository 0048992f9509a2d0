"""DeepControl (and MeanShiftRejection(batchnorm="replace")) on an unchanged BatchNorm LightningModule."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from helpers import trainer
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18

from lightning_msr import DeepControl, MeanShiftRejection, MSRConfigurationError, MSRWarning, replace_batchnorm
from lightning_msr.nn import AutomaticGainControl, ScaledConv2d
from lightning_msr.nn.affine import ChannelAffine


class ResNetModule(L.LightningModule):
    """A LightningModule around a torchvision resnet18 that knows nothing about lightning_msr."""

    def __init__(self, num_classes: int = 3, lr: float = 0.01) -> None:
        super().__init__()
        self.lr = lr
        self.net = resnet18(weights=None, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def images(n: int = 4, batch_size: int = 1, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=generator) + 0.5, torch.arange(n) % 3)
    return DataLoader(data, batch_size=batch_size)


def batchnorms(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def assert_per_sample_and_mode_free(model: nn.Module) -> None:
    x = torch.randn(4, 3, 32, 32)
    model.train()
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
        other = x.clone()
        other[1:] = torch.randn_like(other[1:]) * 10
        torch.testing.assert_close(alone, batched, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(other)[0], batched[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.eval()(x), batched, atol=1e-5, rtol=1e-5)


def test_fit_at_batch_size_one_with_deep_control(tmp_path):
    L.seed_everything(0)
    model = ResNetModule()
    callback = DeepControl(beta_init=0.5)
    trainer(tmp_path, limit_train_batches=4, callbacks=[callback]).fit(model, images())

    assert batchnorms(model) == []
    layers = [m for m in model.modules() if isinstance(m, AutomaticGainControl)]
    assert len(layers) == 20 and len(callback.replaced) == 20
    assert callback.replaced[0] == "net.bn1"
    # fold_gain=True: every gain went into the conv before it, the gain control keeps beta and bias
    assert all(m.gain is None for m in layers)
    convs = [m for m in model.modules() if isinstance(m, ScaledConv2d)]
    assert len(convs) == 20
    # the optimizer was built after the surgery: the new parameters were trained
    assert any(not torch.allclose(m.beta, torch.full_like(m.beta, 0.5)) for m in layers)
    assert any(not torch.allclose(m.scale, torch.ones_like(m.scale)) for m in convs)
    assert_per_sample_and_mode_free(model)


def test_fold_gain_false_keeps_the_gain_in_the_gain_control(tmp_path):
    L.seed_everything(0)
    model = ResNetModule()
    trainer(tmp_path, limit_train_batches=2, callbacks=[DeepControl(fold_gain=False)]).fit(model, images())
    layers = [m for m in model.modules() if isinstance(m, AutomaticGainControl)]
    assert len(layers) == 20 and all(m.gain is not None for m in layers)
    assert not any(isinstance(m, ScaledConv2d) for m in model.modules())


def test_fit_at_batch_size_one_with_mean_shift_rejection_replace(tmp_path):
    L.seed_everything(0)
    model = ResNetModule()
    trainer(tmp_path, limit_train_batches=4, callbacks=[MeanShiftRejection(batchnorm="replace")]).fit(
        model, images()
    )
    assert batchnorms(model) == []
    assert not any(isinstance(m, ChannelAffine) for m in model.modules())  # every BatchNorm folded
    convs = [m for m in model.modules() if isinstance(m, ScaledConv2d)]
    assert len(convs) == 20
    assert any(not torch.allclose(m.scale, torch.ones_like(m.scale)) for m in convs)
    assert_per_sample_and_mode_free(model)


def test_fit_with_mean_shift_rejection_affine_keeps_separate_layers(tmp_path):
    L.seed_everything(0)
    model = ResNetModule()
    trainer(tmp_path, limit_train_batches=2, callbacks=[MeanShiftRejection(batchnorm="affine")]).fit(
        model, images()
    )
    layers = [m for m in model.modules() if isinstance(m, ChannelAffine)]
    assert len(layers) == 20 and not any(isinstance(m, ScaledConv2d) for m in model.modules())
    assert any(not torch.allclose(m.weight, torch.ones_like(m.weight)) for m in layers)


def test_batchnorm_model_fails_at_batch_size_one_without_surgery(tmp_path):
    """The reason for the callbacks: BatchNorm cannot train on a batch of one 1x1 map."""
    model = ResNetModule()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        trainer(tmp_path, limit_train_batches=1).fit(model, images(n=1))


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_nothing_happens_outside_fit(tmp_path, stage):
    model = ResNetModule()
    model.test_step = model.validation_step
    run = trainer(tmp_path, limit_val_batches=1, limit_test_batches=1, limit_predict_batches=1,
                  callbacks=[DeepControl()])
    getattr(run, stage)(model, images(n=2, batch_size=2))
    assert len(batchnorms(model)) == 20


def test_second_fit_does_not_repeat_the_surgery(tmp_path):
    L.seed_everything(0)
    model = ResNetModule()
    callback = DeepControl()
    trainer(tmp_path, limit_train_batches=2, callbacks=[callback]).fit(model, images())
    layers = {name: m for name, m in model.named_modules() if isinstance(m, AutomaticGainControl)}
    state = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", MSRWarning)  # no "found no BatchNorm" warning
        trainer(tmp_path, max_epochs=1, limit_train_batches=0, callbacks=[callback]).fit(model, images())
        # another DeepControl on the converted model: nothing to do, said at info level only
        trainer(tmp_path, max_epochs=1, limit_train_batches=0, callbacks=[DeepControl()]).fit(model, images())
    assert {name: m for name, m in model.named_modules() if isinstance(m, AutomaticGainControl)} == layers
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


class SelfConverting(ResNetModule):
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "DeepControl" in checkpoint.get("callbacks", {}):
            replace_batchnorm(self, "agc_fold")


def test_checkpoint_round_trip(tmp_path):
    L.seed_everything(0)
    model = ResNetModule()
    run = trainer(tmp_path, limit_train_batches=3, callbacks=[DeepControl(beta_init=0.7)])
    run.fit(model, images())
    path = tmp_path / "deep_control.ckpt"
    run.save_checkpoint(path)
    saved = copy.deepcopy(model.state_dict())
    assert any(key.endswith(".beta") for key in saved)
    assert torch.load(path, weights_only=False)["callbacks"]["DeepControl"]["replaced"][:2] == [
        "net.bn1",
        "net.layer1.0.bn1",
    ]

    # A fresh, unchanged LightningModule with the same callback: the surgery runs before the restore.
    L.seed_everything(1)
    fresh = ResNetModule()
    trainer(tmp_path, limit_train_batches=3, callbacks=[DeepControl(beta_init=0.7)]).fit(
        fresh, images(), ckpt_path=path
    )  # max_epochs=1 is already reached: the checkpoint is restored and fit ends
    assert batchnorms(fresh) == []
    restored = fresh.state_dict()
    assert restored.keys() == saved.keys()
    assert all(torch.equal(restored[key], saved[key]) for key in saved)

    # Training continues from there.
    trainer(tmp_path, max_epochs=2, limit_train_batches=2, callbacks=[DeepControl(beta_init=0.7)]).fit(
        ResNetModule(), images(), ckpt_path=path
    )

    # Evaluation in a new process, as in the how-to: the module converts itself when loading.
    loaded = SelfConverting.load_from_checkpoint(path)
    assert batchnorms(loaded) == []
    assert all(torch.equal(loaded.state_dict()[key], saved[key]) for key in saved)

    # Without the callback the checkpoint does not fit the BatchNorm model.
    with pytest.raises(RuntimeError, match=r"Missing key|Unexpected key"):
        trainer(tmp_path, limit_train_batches=1).fit(ResNetModule(), images(), ckpt_path=path)


def test_warns_when_there_is_no_batchnorm(tmp_path):
    model = ResNetModule()
    model.net = nn.Sequential(nn.Conv2d(3, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.warns(MSRWarning, match="DeepControl found no BatchNorm layer to replace in ResNetModule"):
        trainer(tmp_path, limit_train_batches=1, callbacks=[DeepControl()]).fit(model, images())


class LateBatchNorm(ResNetModule):
    def setup(self, stage: str) -> None:  # runs after the callbacks' setup
        self.extra = nn.BatchNorm2d(3)


def test_warns_about_batchnorm_built_after_the_surgery(tmp_path):
    model = LateBatchNorm()
    with pytest.warns(MSRWarning, match=r"1 BatchNorm layer\(s\) appeared after the surgery \('extra'\)"):
        trainer(tmp_path, limit_train_batches=1, callbacks=[DeepControl()]).fit(model, images())
    assert batchnorms(model) == ["extra"]


def test_exclude(tmp_path):
    model = ResNetModule()
    callback = DeepControl(exclude=["net.layer4.*"])
    trainer(tmp_path, limit_train_batches=1, callbacks=[callback]).fit(model, images(batch_size=2))
    assert batchnorms(model) == ["net.layer4.0.bn1", "net.layer4.0.bn2", "net.layer4.0.downsample.1",
                                 "net.layer4.1.bn1", "net.layer4.1.bn2"]
    assert len(callback.replaced) == 15


def test_state_dict_mismatch_warns():
    callback = DeepControl()
    callback._replaced = ["a", "b"]
    assert callback.state_dict() == {"beta_init": 1.0, "replaced": ["a", "b"]}
    callback.load_state_dict({"beta_init": 1.0, "replaced": ["a", "b"]})
    with pytest.warns(MSRWarning, match="saved after replacing 1 BatchNorm layer"):
        callback.load_state_dict({"beta_init": 1.0, "replaced": ["a"]})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta_init": float("nan")}, r"Expected `beta_init` to be in \[0, 1\], but got nan."),
        ({"beta_init": "1"}, r"Expected `beta_init` to be a number in \[0, 1\], but got .1. of type str"),
        ({"exclude": [3]}, "Expected `exclude` to be a list of module-name patterns"),
        ({"fold_gain": "yes"}, "Expected `fold_gain` to be True or False, but got 'yes'"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(MSRConfigurationError, match=match):
        DeepControl(**kwargs)


def test_repr():
    assert repr(DeepControl()) == "DeepControl(beta_init=1.0, exclude=None, fold_gain=True)"
    assert (
        repr(DeepControl(beta_init=0, exclude="head.*", fold_gain=False))
        == "DeepControl(beta_init=0.0, exclude=['head.*'], fold_gain=False)"
    )


def test_from_lightning_cli(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["train.py"])
    cli = LightningCLI(
        ResNetModule,
        run=False,
        args=[
            "--trainer.callbacks+=lightning_msr.DeepControl",
            "--trainer.callbacks.beta_init=0.25",
            "--trainer.callbacks.exclude=[net.fc]",
            "--trainer.callbacks.fold_gain=false",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        save_config_kwargs={"overwrite": True},
    )
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, DeepControl)]
    assert [repr(c) for c in callbacks] == ["DeepControl(beta_init=0.25, exclude=['net.fc'], fold_gain=False)"]


def test_warns_that_spawned_workers_do_not_convert_the_main_process_model(tmp_path):
    """With ddp_spawn the surgery runs in the workers; the model object in the main process stays as it was."""
    spawn = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, default_root_dir=tmp_path)
    with pytest.warns(MSRWarning, match=r"worker processes of `DDPStrategy`.*before `trainer.fit`"):
        DeepControl().setup(spawn, ResNetModule(), "fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MSRWarning)
        DeepControl().setup(trainer(tmp_path), ResNetModule(), "fit")  # in-process: no warning


# ---------------------------------------------------------------- what a new user runs into (issue 16)


class MLPHead(L.LightningModule):
    """A conv body with BatchNorm2d and an MLP head with a BatchNorm1d on (N, C) features."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.body(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_batchnorm1d_on_features_names_the_layer_and_exclude(tmp_path):
    with pytest.raises(
        MSRConfigurationError,
        match=r"DeepControl replaced the BatchNorm `head.2` by an AutomaticGainControl, .* but `head.2` gets \(N, C\) "
        r"features of shape \(2, 8\) .* Leave it out with `DeepControl\(exclude=\['head.2'\]\)`",
    ):
        trainer(tmp_path, max_steps=1, callbacks=[DeepControl()]).fit(MLPHead(), images(batch_size=2))
    # the fix the message gives works, and the spatial BatchNorm is still replaced
    model = MLPHead()
    callback = DeepControl(exclude=["head.2"])
    trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(model, images(batch_size=2))
    assert callback.replaced == ["body.1"] and batchnorms(model) == ["head.2"]
    # the first-input check removes itself once it has run: no hook is left behind
    assert not model.body[1]._forward_pre_hooks


def test_exclude_pattern_matching_nothing_is_refused(tmp_path):
    model = ResNetModule()
    with pytest.raises(
        MSRConfigurationError,
        match=r"The `exclude` pattern 'net.layer5.\*' matches no module of ResNetModule. Module names look like "
        r"\['net', 'net.conv1', 'net.bn1', 'net.relu', ...\]",
    ):
        trainer(tmp_path, max_steps=1, callbacks=[DeepControl(exclude=["net.layer5.*"])]).fit(model, images())
    assert len(batchnorms(model)) == 20  # nothing replaced


@pytest.mark.parametrize("beta_init", [-0.1, 1.5, 5.0])
def test_beta_init_outside_0_1_is_refused(beta_init):
    with pytest.raises(MSRConfigurationError, match=rf"Expected `beta_init` to be in \[0, 1\], but got {beta_init}"):
        DeepControl(beta_init=beta_init)


def test_beta_init_accepts_any_real_number():
    from fractions import Fraction

    import numpy as np

    for value in (np.float32(0.5), torch.tensor(0.5), Fraction(1, 2)):
        assert repr(DeepControl(beta_init=value)) == "DeepControl(beta_init=0.5, exclude=None, fold_gain=True)"
    for value in (True, torch.tensor([0.5]), 0.5j):
        with pytest.raises(MSRConfigurationError, match="Expected `beta_init` to be a number in"):
            DeepControl(beta_init=value)
