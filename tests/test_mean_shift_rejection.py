"""MeanShiftRejection in real Trainer.fit runs: init, projection, re-centring, logging, resume, errors."""

from __future__ import annotations

import copy
import math
import warnings
from fractions import Fraction
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from helpers import DEFAULT_MODE, OPTIMIZERS, ConvNet, WeightRecorder, conv_weights, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_msr import MeanShiftRejection, MSRConfigurationError, MSRWarning
from lightning_msr.functional import eligible_weights, filter_norms, mean_shift
from lightning_msr.fused import fused_unavailable


def worst_mean_shift(model: nn.Module) -> float:
    weights = [w for w in eligible_weights(model) if w.centrable]
    return max(float(mean_shift(w.parameter, mode=DEFAULT_MODE, **w.layout_kwargs())) for w in weights)


def param_hooks(model: nn.Module) -> int:
    return sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_kernels_stay_on_the_isocline_with_every_optimizer(tmp_path, optimizer):
    L.seed_everything(0)
    model = ConvNet(optimizer)
    trainer(tmp_path, max_epochs=3, callbacks=[MeanShiftRejection()]).fit(model, loader(64))
    assert worst_mean_shift(model) < 1e-5
    # the Linear head is not centred by default
    assert float(mean_shift(model.head.weight, mode=DEFAULT_MODE)) > 1e-3


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_without_the_callback_kernels_leave_the_isocline(tmp_path, optimizer):
    """The contrast that makes the test above meaningful: training alone does not keep kernels zero-mean."""
    L.seed_everything(0)
    model = ConvNet(optimizer)
    trainer(tmp_path, max_epochs=3).fit(model, loader(64))
    assert worst_mean_shift(model) > 1e-2


def test_zero_mean_init_at_setup(tmp_path):
    L.seed_everything(0)
    model = ConvNet()
    recorder = WeightRecorder()
    trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection(init_magnitude=2.0), recorder]).fit(model, loader())
    start = recorder.at_fit_start
    for w in eligible_weights(model):
        weight = start[w.name]
        if not w.centrable:
            continue
        assert float(mean_shift(weight, mode=DEFAULT_MODE, **w.layout_kwargs())) < 1e-6
        if not w.transposed:
            torch.testing.assert_close(weight.flatten(1).norm(dim=1), torch.full((weight.shape[0],), 2.0))


def test_init_is_reproducible_and_leaves_global_rng_alone(tmp_path):
    weights, states = [], []
    for _ in range(2):
        L.seed_everything(7)
        model = ConvNet()
        recorder = WeightRecorder()
        trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection(), recorder]).fit(model, loader())
        weights.append(recorder.at_fit_start["features.0.weight"])
        states.append(torch.get_rng_state())
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)

    # the global RNG is where it would be without the callback's draw
    L.seed_everything(7)
    model = ConvNet()
    cb = MeanShiftRejection()
    before = torch.get_rng_state()
    cb.setup(SimpleNamespace(strategy=None, ckpt_path=None), model, "fit")
    assert torch.equal(before, torch.get_rng_state())


def test_gradients_are_projected_and_linear_and_biases_untouched(tmp_path):
    L.seed_everything(0)
    model = ConvNet("sgd")
    reference = copy.deepcopy(model)
    recorder = WeightRecorder()
    data = loader(8, batch_size=8)
    plain = MeanShiftRejection(init="none", adaptive_clip=None)  # the projection alone, no clipping
    trainer(tmp_path, max_steps=1, callbacks=[plain, recorder]).fit(model, data)
    x, y = next(iter(data))
    nn.functional.cross_entropy(reference(x), y).backward()
    seen = recorder.grads[0]
    layouts = {w.name: w for w in eligible_weights(reference)}
    for name, param in reference.named_parameters():
        raw = param.grad
        if name in layouts and layouts[name].centrable:
            expected = raw.clone()
            from lightning_msr.functional import project_mean_

            project_mean_(expected, mode=DEFAULT_MODE, **layouts[name].layout_kwargs())
            torch.testing.assert_close(seen[name], expected)
            assert not torch.allclose(seen[name], raw)
        else:  # Linear weight, biases and the uncentrable depthwise pointwise kernels
            torch.testing.assert_close(seen[name], raw, rtol=0, atol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_alpha_weights_the_mean_subtraction(tmp_path, alpha):
    L.seed_everything(0)
    model = ConvNet("sgd")
    reference = copy.deepcopy(model)
    recorder = WeightRecorder()
    data = loader(8, batch_size=8)
    weighted = MeanShiftRejection(alpha=alpha, init="none", adaptive_clip=None)
    trainer(tmp_path, max_steps=1, callbacks=[weighted, recorder]).fit(model, data)
    x, y = next(iter(data))
    nn.functional.cross_entropy(reference(x), y).backward()
    raw = reference.features[0].weight.grad
    expected = raw - alpha * raw.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(recorder.grads[0]["features.0.weight"], expected)


def test_include_linear_and_filter_mode(tmp_path):
    L.seed_everything(0)
    model = ConvNet("adam")
    trainer(tmp_path, max_epochs=2, callbacks=[MeanShiftRejection(include_linear=True, mode="filter")]).fit(
        model, loader()
    )
    assert float(mean_shift(model.head.weight, mode=DEFAULT_MODE)) < 1e-5
    conv = model.features[8].weight  # 8 input channels: a filter holds 8 kernels
    assert float(mean_shift(conv, mode="filter")) < 1e-5
    assert float(mean_shift(conv, mode="kernel")) > 1e-4  # per-kernel means are free in filter mode


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_kernel_mode_keeps_every_kernel_zero_mean(tmp_path, optimizer):
    """The paper's constraint, `mode="kernel"`: every (output, input) kernel zero-mean, not only every filter."""
    L.seed_everything(0)
    model = ConvNet(optimizer)
    trainer(tmp_path, max_epochs=2, callbacks=[MeanShiftRejection(mode="kernel")]).fit(model, loader())
    weights = [w for w in eligible_weights(model) if w.centrable]
    assert max(float(mean_shift(w.parameter, mode="kernel", **w.layout_kwargs())) for w in weights) < 1e-5


def test_projection_in_backward_equals_projection_at_the_step(tmp_path):
    """The projection is linear: doing it per backward (before accumulation and all-reduce) is exact."""
    finals = {}
    for timing in ("backward", "optimizer_step"):
        L.seed_everything(0)
        model = ConvNet("sgd_momentum")
        cb = MeanShiftRejection(projection_timing=timing)
        trainer(tmp_path, max_epochs=2, accumulate_grad_batches=2, callbacks=[cb]).fit(model, loader(32, 4))
        finals[timing] = conv_weights(model)
    for name in finals["backward"]:
        torch.testing.assert_close(finals["backward"][name], finals["optimizer_step"][name], rtol=1e-5, atol=1e-6)


def test_auto_timing_choices(tmp_path):
    cb = MeanShiftRejection()
    trainer(tmp_path, max_steps=1, callbacks=[cb]).fit(ConvNet(), loader())
    assert cb.projects_in_backward is False  # reset at teardown

    class Spy(L.Callback):
        def __init__(self, msr):
            self.msr, self.seen = msr, {}

        def on_train_start(self, trainer, pl_module):
            self.seen = {"backward": self.msr.projects_in_backward, "hooks": param_hooks(pl_module)}

    def seen(msr):
        spy = Spy(msr)
        trainer(tmp_path, max_steps=1, callbacks=[msr, spy]).fit(ConvNet(), loader())
        return spy.seen

    # with the fused kernel (a C compiler here) the projection runs at the step, in its single pass
    assert seen(MeanShiftRejection())["backward"] is (fused_unavailable() is not None)
    eager = seen(MeanShiftRejection(implementation="eager"))
    assert eager["backward"] is True and eager["hooks"] > 0
    assert seen(MeanShiftRejection(alpha=0.5, implementation="eager"))["hooks"] == 0


def test_logs_mean_shift_at_logging_interval(tmp_path):
    L.seed_everything(0)
    logger = CSVLogger(tmp_path, name="logs")
    trainer(tmp_path, max_steps=6, log_every_n_steps=2, logger=logger, callbacks=[MeanShiftRejection()]).fit(
        ConvNet(), loader(48, 8)
    )
    import csv

    rows = list(csv.DictReader(open(logger.log_dir + "/metrics.csv")))
    values = [(int(r["step"]), float(r["msr/mean_shift"])) for r in rows if r.get("msr/mean_shift")]
    assert [s for s, _ in values] == [1, 3, 5]  # every 2nd step only
    assert all(v < 1e-5 for _, v in values)


def test_validate_test_predict_do_not_touch_weights(tmp_path):
    model = ConvNet()
    before = conv_weights(model)
    t = trainer(tmp_path, callbacks=[MeanShiftRejection()])
    t.validate(model, loader())
    t.test(model, loader())
    t.predict(model, loader())
    for name, value in conv_weights(model).items():
        assert torch.equal(value, before[name])


def test_second_fit_does_not_reinitialise(tmp_path):
    L.seed_everything(0)
    model = ConvNet()
    cb = MeanShiftRejection()
    trainer(tmp_path, max_steps=3, callbacks=[cb]).fit(model, loader())
    after_first = conv_weights(model)
    recorder = WeightRecorder()
    trainer(tmp_path, max_steps=2, callbacks=[cb, recorder]).fit(model, loader())
    for name, value in after_first.items():
        assert torch.equal(recorder.at_fit_start[name], value)
    # a second callback instance on the same model does not redraw either
    recorder = WeightRecorder()
    before = conv_weights(model)
    trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection(), recorder]).fit(model, loader())
    for name, value in before.items():
        assert torch.equal(recorder.at_fit_start[name], value)
    assert param_hooks(model) == 0  # every hook removed at teardown, none stacked


def test_zero_mean_model_is_kept_not_redrawn(tmp_path):
    """A model trained with MSR and loaded again (e.g. for fine-tuning) keeps its weights."""
    L.seed_everything(0)
    trained = ConvNet()
    trainer(tmp_path, max_steps=3, callbacks=[MeanShiftRejection()]).fit(trained, loader())
    fresh = ConvNet()
    fresh.load_state_dict(trained.state_dict())
    recorder = WeightRecorder()
    trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection(), recorder]).fit(fresh, loader())
    for name, value in conv_weights(trained).items():
        assert torch.equal(recorder.at_fit_start[name], value)


def test_resumed_fit_continues_from_checkpoint_weights(tmp_path):
    L.seed_everything(0)
    model = ConvNet()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[MeanShiftRejection(), ckpt]).fit(
        model, loader()
    )
    saved = torch.load(ckpt.last_model_path, weights_only=False)
    assert any("MeanShiftRejection" in key for key in saved["callbacks"])
    L.seed_everything(123)  # a different seed: a re-initialisation would show
    resumed = ConvNet()
    recorder = WeightRecorder()
    cb = MeanShiftRejection()
    trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[cb, recorder]).fit(
        resumed, loader(), ckpt_path=ckpt.last_model_path
    )
    for name, value in saved["state_dict"].items():
        torch.testing.assert_close(recorder.at_fit_start[name], value, rtol=0, atol=0)
    assert cb.state_dict()["initialized"] is True


def model_filter_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per-output-filter norms of every kernel MSR acts on (ConvTranspose: over dims 0 and 2.., per group)."""
    out = {}
    for w in eligible_weights(model):
        if w.centrable:
            out[w.name] = filter_norms(w.parameter.detach(), "kernel", w.transposed, w.groups).flatten()
    return out


@pytest.mark.parametrize("optimizer", ["sgd_nesterov_wd", "adamw"])
def test_keep_magnitude_holds_every_filter_norm(tmp_path, optimizer):
    L.seed_everything(0)
    model = ConvNet(optimizer)
    recorder = WeightRecorder()
    cb = MeanShiftRejection(init_magnitude=1.5, keep_magnitude=True, calibrate=False)
    trainer(tmp_path, max_epochs=3, callbacks=[cb, recorder]).fit(model, loader(64))
    after = model_filter_norms(model)
    for name, norms in after.items():
        torch.testing.assert_close(norms, torch.full_like(norms, 1.5), rtol=1e-5, atol=0)
        assert not torch.equal(model.get_parameter(name), recorder.at_fit_start[name])  # it did train
    assert worst_mean_shift(model) < 1e-5


def test_without_keep_magnitude_filter_norms_drift(tmp_path):
    """The contrast for the test above: plain MSR keeps the mean, not the norm."""
    L.seed_everything(0)
    model = ConvNet("sgd_nesterov_wd")
    trainer(tmp_path, max_epochs=3, callbacks=[MeanShiftRejection(init_magnitude=1.5)]).fit(model, loader(64))
    drift = max(float((norms - 1.5).abs().max()) for norms in model_filter_norms(model).values())
    assert drift > 1e-3


def test_keep_magnitude_keeps_the_norms_found_at_fit_start(tmp_path):
    """``init="center"`` (a pretrained model): each filter keeps its own norm; frozen kernels are untouched."""
    L.seed_everything(0)
    model = ConvNet("sgd_momentum")
    model.features[8].weight.requires_grad_(False)
    recorder = WeightRecorder()
    cb = MeanShiftRejection(init="center", keep_magnitude=True)
    trainer(tmp_path, max_epochs=2, callbacks=[cb, recorder]).fit(model, loader(64))
    start = model_filter_norms(model)
    for name in start:
        weight = recorder.at_fit_start[name]
        w = next(w for w in eligible_weights(model) if w.name == name)
        expected = filter_norms(weight, "kernel", w.transposed, w.groups).flatten()
        torch.testing.assert_close(start[name], expected, rtol=1e-5, atol=1e-7)
        assert len(expected.unique()) > 1  # pretrained-like: the norms differ from filter to filter
    assert torch.equal(model.features[8].weight, recorder.at_fit_start["features.8.weight"])


def test_keep_magnitude_leaves_zero_initialised_filters_free(tmp_path):
    """A zero-initialised conv (ControlNet-style "zero conv") has no norm to keep: it must still learn."""
    L.seed_everything(0)
    model = ConvNet("sgd_momentum")
    with torch.no_grad():
        model.features[4].weight.zero_()  # a pointwise conv with a bias: its ReLU still passes gradients
        model.features[0].weight.sub_(model.features[0].weight.mean(dim=(2, 3), keepdim=True))
    start = model.features[0].weight.detach().flatten(1).norm(dim=1)
    cb = MeanShiftRejection(init="none", keep_magnitude=True)
    trainer(tmp_path, max_epochs=2, callbacks=[cb]).fit(model, loader(64))
    assert float(model.features[4].weight.abs().max()) > 1e-4  # trained although its norm at fit start was 0
    torch.testing.assert_close(model.features[0].weight.detach().flatten(1).norm(dim=1), start, rtol=1e-5, atol=0)


def test_keep_magnitude_with_accumulation_and_resume(tmp_path):
    L.seed_everything(0)
    model = ConvNet("sgd_momentum")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = MeanShiftRejection(keep_magnitude=True, calibrate=False)
    trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2, enable_checkpointing=True, callbacks=[cb, ckpt]).fit(
        model, loader(64)
    )
    resumed = ConvNet("sgd_momentum")
    trainer(tmp_path, max_epochs=2, callbacks=[MeanShiftRejection(keep_magnitude=True, calibrate=False)]).fit(
        resumed, loader(64), ckpt_path=ckpt.last_model_path
    )
    for norms in model_filter_norms(resumed).values():
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-5, atol=0)


def test_init_center_and_none(tmp_path):
    L.seed_everything(0)
    model = ConvNet()
    original = conv_weights(model)
    recorder = WeightRecorder()
    trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection(init="center"), recorder]).fit(model, loader())
    w = original["features.0.weight"]
    torch.testing.assert_close(recorder.at_fit_start["features.0.weight"], w - w.mean(dim=(2, 3), keepdim=True))

    model = ConvNet()
    original = conv_weights(model)
    recorder = WeightRecorder()
    trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection(init="none"), recorder]).fit(model, loader())
    for name, value in original.items():
        assert torch.equal(recorder.at_fit_start[name], value)


def test_exclude_patterns(tmp_path):
    L.seed_everything(0)
    model = ConvNet("adam")
    original = model.features[0].weight.detach().clone()
    recorder = WeightRecorder()
    trainer(tmp_path, max_steps=2, callbacks=[MeanShiftRejection(exclude=["features.0"]), recorder]).fit(
        model, loader()
    )
    assert torch.equal(recorder.at_fit_start["features.0.weight"], original)
    assert float(mean_shift(model.features[0].weight, mode=DEFAULT_MODE)) > 1e-3
    assert float(mean_shift(model.features[8].weight, mode=DEFAULT_MODE)) < 1e-5


def test_batchnorm_policies(tmp_path):
    with pytest.warns(MSRWarning, match=r"still contains 1 BatchNorm layer\(s\) \('features.1'\)"):
        trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection()]).fit(ConvNet(batchnorm=True), loader())
    with pytest.raises(MSRConfigurationError, match=r"batchnorm='error'.*1 BatchNorm layer"):
        trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection(batchnorm="error")]).fit(
            ConvNet(batchnorm=True), loader()
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", MSRWarning)  # no BatchNorm, no warning
        trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection()]).fit(ConvNet(), loader())


def test_model_without_convs_warns_or_raises(tmp_path):
    class MLP(ConvNet):
        def __init__(self):
            super().__init__()
            self.features = nn.Flatten()
            self.head = nn.Linear(64, 3)

    with pytest.warns(MSRWarning, match="found no conv layer"):
        trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection()]).fit(MLP(), loader())
    with pytest.raises(MSRConfigurationError, match=r"found no conv layer.*strict=True"):
        trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection(strict=True)]).fit(MLP(), loader())


def test_uncentrable_and_lazy_weights_are_reported(tmp_path):
    model = ConvNet()
    model.features[3] = nn.Conv2d(8, 8, 1, groups=8)  # (8, 1, 1, 1): one element per kernel group
    with pytest.warns(MSRWarning, match=r"single element.*\['features.3.weight'\]"):
        trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection()]).fit(model, loader())
    lazy = ConvNet()
    lazy.features[0] = nn.LazyConv2d(8, 3, padding=1)
    with pytest.warns(MSRWarning, match=r"not a plain, materialised parameter.*features.0"):
        trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection()]).fit(lazy, loader())


def test_sharded_strategies_are_refused():
    from lightning.pytorch.strategies import FSDPStrategy

    cb = MeanShiftRejection()
    with pytest.raises(MSRConfigurationError, match=r"FSDPStrategy is not supported: it flattens and shards"):
        cb.setup(SimpleNamespace(strategy=FSDPStrategy(), ckpt_path=None), ConvNet(), "fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5}, r"Expected `alpha` to be in \[0, 1\], but got 1.5"),
        ({"alpha": float("nan")}, r"Expected `alpha` to be in \[0, 1\], but got nan"),
        ({"init": "kaiming"}, r"Expected `init` to be one of 'zero_mean', 'center', 'none', but got 'kaiming'"),
        ({"init_magnitude": 0}, r"Expected `init_magnitude` to be a finite positive number, but got 0.0"),
        ({"include_linear": 1}, r"Expected `include_linear` to be True or False, but got 1"),
        (
            {"batchnorm": "sync"},
            r"Expected `batchnorm` to be one of 'error', 'warn', 'replace', 'affine', but got 'sync'",
        ),
        ({"mode": "channel"}, r"Expected `mode` to be one of 'kernel', 'filter', but got 'channel'"),
        ({"recenter": "yes"}, r"Expected `recenter` to be True, False or None, but got 'yes'"),
        ({"projection_timing": "late"}, r"Expected `projection_timing` to be one of 'auto', 'backward'"),
        ({"projection_timing": "backward", "alpha": 0.5}, r"'backward' with alpha=0.5: a weighted mean"),
        ({"exclude": [""]}, r"Expected `exclude` to be a list of module-name patterns"),
        ({"strict": None}, r"Expected `strict` to be True or False, but got None"),
        ({"keep_magnitude": "yes"}, r"Expected `keep_magnitude` to be True or False, but got 'yes'"),
        ({"seed": 1.5}, r"Expected `seed` to be an integer or None, but got 1.5"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(MSRConfigurationError, match=match):
        MeanShiftRejection(**kwargs)


def test_repr_shows_hyper_parameters():
    assert repr(MeanShiftRejection(alpha=0.5)).startswith("MeanShiftRejection(alpha=0.5, init='zero_mean'")


def test_layers_built_in_configure_model_are_initialised(tmp_path):
    class Deferred(ConvNet):
        def __init__(self):
            super().__init__("adam")
            self.features = None

        def configure_model(self):
            if self.features is None:
                self.features = ConvNet().features

    L.seed_everything(0)
    model = Deferred()
    recorder = WeightRecorder()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*found no conv layer.*")
        trainer(tmp_path, max_steps=2, callbacks=[MeanShiftRejection(), recorder]).fit(model, loader())
    assert float(mean_shift(recorder.at_fit_start["features.0.weight"], mode=DEFAULT_MODE)) < 1e-6
    assert worst_mean_shift(model) < 1e-5


def test_barebones_trainer_trains_without_logging(tmp_path):
    L.seed_everything(0)
    model = ConvNet("adam")
    trainer(tmp_path, max_epochs=1, barebones=True, logger=None, enable_checkpointing=None, enable_progress_bar=None,
            enable_model_summary=None, callbacks=[MeanShiftRejection()]).fit(model, loader())
    assert worst_mean_shift(model) < 1e-5


# ---------------------------------------------------------------- what a new user runs into (issue 16)


def test_keep_magnitude_on_float64_weights(tmp_path):
    """Norms are accumulated in at least float32: float64 weights keep float64 norms instead of crashing."""
    L.seed_everything(0)
    model = ConvNet("adamw")
    cb, recorder = MeanShiftRejection(keep_magnitude=True, calibrate=False), WeightRecorder()
    trainer(tmp_path, max_steps=3, precision="64-true", callbacks=[cb, recorder]).fit(model, loader())
    assert model.features[0].weight.dtype == torch.float64
    for w in cb.weights:
        start = recorder.at_fit_start[w.name]
        assert not torch.equal(w.parameter, start)  # it trained
        norms = filter_norms(w.parameter.detach(), "kernel", w.transposed, w.groups)
        torch.testing.assert_close(norms, filter_norms(start, "kernel", w.transposed, w.groups), rtol=1e-12, atol=0)
    assert worst_mean_shift(model) < 1e-5


class Poison(L.Callback):
    """Writes a NaN into the first conv weight after the second training batch, as a diverging run would."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 1:
            with torch.no_grad():
                pl_module.features[0].weight[0, 0, 0, 0] = float("nan")


def test_logged_mean_shift_shows_a_diverged_weight(tmp_path):
    import csv

    L.seed_everything(0)
    logger = CSVLogger(tmp_path, name="logs")
    trainer(tmp_path, max_steps=3, log_every_n_steps=1, logger=logger, callbacks=[Poison(), MeanShiftRejection()]).fit(
        ConvNet(), loader()
    )
    rows = [r for r in csv.DictReader(open(logger.log_dir + "/metrics.csv")) if r.get("msr/mean_shift")]
    values = [float(r["msr/mean_shift"]) for r in rows]
    assert len(values) == 3 and values[0] < 1e-5
    assert math.isnan(values[1]) and math.isnan(values[2])  # not 0: a NaN weight never reads as zero-mean


def test_exclude_pattern_matching_nothing_is_refused(tmp_path):
    model = ConvNet()
    before = conv_weights(model)
    with pytest.raises(
        MSRConfigurationError,
        match=r"The `exclude` pattern 'featurse.0' matches no module of ConvNet. Module names look like "
        r"\['features', 'features.0', 'features.1', 'features.2', ...\]",
    ):
        trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection(exclude=["featurse.0"])]).fit(model, loader())
    for name, value in conv_weights(model).items():  # refused before anything was drawn
        assert torch.equal(value, before[name])


def test_two_callbacks_on_the_same_weights_are_refused(tmp_path):
    first, second = MeanShiftRejection(alpha=1.0), MeanShiftRejection(alpha=0.5)
    with pytest.raises(
        MSRConfigurationError,
        match=r"Two MeanShiftRejection callbacks act on the same 5 conv weight\(s\) \('features.0.weight', .*\): "
        r"MeanShiftRejection\(alpha=1.0, .*\) and MeanShiftRejection\(alpha=0.5, .*\)\. .*`exclude`",
    ):
        trainer(tmp_path, max_steps=1, callbacks=[first, second]).fit(ConvNet(), loader())


def test_two_callbacks_on_disjoint_weights_both_act(tmp_path):
    L.seed_everything(0)
    model = ConvNet()
    stem = MeanShiftRejection(exclude=["features.[1-9]*"])
    body = MeanShiftRejection(alpha=0.5, exclude=["features.0"])
    trainer(tmp_path, max_steps=2, callbacks=[stem, body]).fit(model, loader())
    assert [w.name for w in stem.weights] == ["features.0.weight"]
    assert "features.0.weight" not in [w.name for w in body.weights] and len(body.weights) == 4


def test_frozen_conv_weights_are_not_redrawn(tmp_path):
    L.seed_everything(0)
    model = ConvNet()
    model.features[0].weight.requires_grad_(False)  # e.g. a frozen pretrained stem
    frozen = model.features[0].weight.detach().clone()
    with pytest.warns(
        MSRWarning, match=r"leaves 1 frozen conv weight\(s\) \(requires_grad=False\) as they are: .*'features.0.weight'"
    ):
        trainer(tmp_path, max_steps=3, callbacks=[MeanShiftRejection()]).fit(model, loader())
    assert torch.equal(model.features[0].weight, frozen)  # not redrawn, not projected, not re-centred
    assert float(mean_shift(model.features[4].weight, mode=DEFAULT_MODE)) < 1e-5  # the trainable ones were initialised


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_frozen_conv_weights_are_not_centred(tmp_path, optimizer):
    L.seed_everything(0)
    model = ConvNet(optimizer)
    model.features[0].weight.requires_grad_(False)
    frozen = model.features[0].weight.detach().clone()
    with pytest.warns(MSRWarning, match=r"init='center' centres only trainable weights"):
        trainer(tmp_path, max_steps=3, callbacks=[MeanShiftRejection(init="center", keep_magnitude=True)]).fit(
            model, loader()
        )
    assert torch.equal(model.features[0].weight, frozen)
    assert float(mean_shift(model.features[4].weight, mode=DEFAULT_MODE)) < 1e-5


def _checkpoint_without_msr(tmp_path) -> str:
    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "plain", save_last=True)
    trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[ckpt]).fit(ConvNet(), loader())
    return ckpt.last_model_path


def test_resuming_a_checkpoint_trained_without_msr_warns_and_keeps_the_weights(tmp_path):
    path = _checkpoint_without_msr(tmp_path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    recorder = WeightRecorder()
    with pytest.warns(
        MSRWarning,
        match=r"was not trained with MeanShiftRejection: its kernels are not zero-mean \(worst mean shift .* in "
        r"'features\.\d+\.weight'\).*resume with `MeanShiftRejection\(init='center'\)`",
    ):
        trainer(tmp_path, max_steps=4, callbacks=[MeanShiftRejection(), recorder]).fit(
            ConvNet(), loader(), ckpt_path=path
        )
    for name, value in saved.items():  # nothing was changed without being asked
        torch.testing.assert_close(recorder.at_fit_start[name], value, rtol=0, atol=0)


def test_resuming_a_checkpoint_trained_without_msr_with_init_center_centres_it(tmp_path):
    path = _checkpoint_without_msr(tmp_path)
    model = ConvNet()
    with warnings.catch_warnings():
        warnings.simplefilter("error", MSRWarning)
        trainer(tmp_path, max_steps=4, callbacks=[MeanShiftRejection(init="center")]).fit(
            model, loader(), ckpt_path=path
        )
    assert worst_mean_shift(model) < 1e-5


def test_resuming_an_msr_checkpoint_does_not_warn(tmp_path):
    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "msr", save_last=True)
    trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[MeanShiftRejection(), ckpt]).fit(
        ConvNet(), loader()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", MSRWarning)
        trainer(tmp_path, max_steps=4, callbacks=[MeanShiftRejection()]).fit(
            ConvNet(), loader(), ckpt_path=ckpt.last_model_path
        )


def test_second_fit_with_other_init_settings_says_no_redraw_happens(tmp_path):
    L.seed_everything(0)
    model = ConvNet()
    trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection()]).fit(model, loader())
    before = conv_weights(model)
    recorder = WeightRecorder()
    with pytest.warns(
        MSRWarning,
        match=r"already initialised by an earlier fit \(init='zero_mean', init_magnitude=1.0, seed=None\), so it is "
        r"not initialised again with init='zero_mean', init_magnitude=2.0, seed=None",
    ):
        trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection(init_magnitude=2.0), recorder]).fit(
            model, loader()
        )
    for name, value in before.items():
        assert torch.equal(recorder.at_fit_start[name], value)
    with warnings.catch_warnings():  # the same settings again: nothing to warn about
        warnings.simplefilter("error", MSRWarning)
        trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection()]).fit(model, loader())


def test_bf16_true_weights_are_warned_about(tmp_path):
    L.seed_everything(0)
    model = ConvNet()
    with pytest.warns(
        MSRWarning,
        match=r"5 weight\(s\) stored in torch.bfloat16 .* zero-mean only to that precision .* `keep_magnitude` holds "
        r"the filter norms to about 8e-03 relative.*precision='bf16-mixed'",
    ):
        trainer(tmp_path, max_steps=1, precision="bf16-true", callbacks=[MeanShiftRejection(keep_magnitude=True)]).fit(
            model, loader()
        )
    assert model.features[0].weight.dtype == torch.bfloat16
    assert 1e-5 < worst_mean_shift(model) < 2e-2  # what the warning announces
    with warnings.catch_warnings():  # float32 weights: no such warning
        warnings.simplefilter("error", MSRWarning)
        trainer(tmp_path, max_steps=1, precision="bf16-mixed", callbacks=[MeanShiftRejection()]).fit(
            ConvNet(), loader()
        )


@pytest.mark.parametrize(
    "alpha",
    [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64), Fraction(1, 2)],
)
def test_any_real_number_is_accepted(alpha):
    cb = MeanShiftRejection(alpha=alpha, init_magnitude=np.float32(2.0), seed=np.int64(3))
    assert cb.alpha == 0.5 and type(cb.alpha) is float
    assert "init_magnitude=2.0" in repr(cb)
