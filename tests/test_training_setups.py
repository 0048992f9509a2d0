"""MeanShiftRejection (and NoiseInjection) in the training setups users really run.

Exact resume, mixed precision and GradScaler overflow, gradient accumulation, manual optimization with two
optimizers, frozen and later unfrozen layers, channels_last, torch.compile, gradient clipping, NaN/Inf.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import pytest
import torch
from helpers import DEFAULT_MODE, ConvNet, WeightRecorder, conv_weights, loader, needs_fused_kernel, trainer
from lightning.pytorch.callbacks import BackboneFinetuning, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_msr import MeanShiftRejection, MSRWarning, NoiseInjection
from lightning_msr.functional import eligible_weights, mean_shift
from lightning_msr.nn import ScaledConv2d


def worst_mean_shift(model: nn.Module) -> float:
    weights = [w for w in eligible_weights(model) if w.centrable]
    return max(float(mean_shift(w.parameter, mode=DEFAULT_MODE, **w.layout_kwargs())) for w in weights)


# --------------------------------------------------------------------------- resume is exact
def test_resume_is_bit_identical(tmp_path):
    """2 epochs in one go == 1 epoch, checkpoint, resume for 1 more (MSR + NoiseInjection, Adam)."""

    def callbacks():
        return [MeanShiftRejection(), NoiseInjection(scale=0.1, shift=0.05)]

    L.seed_everything(0)
    straight = ConvNet("adam")
    trainer(tmp_path, max_epochs=2, deterministic=True, callbacks=callbacks()).fit(straight, loader(32, 4))

    L.seed_everything(0)
    first = ConvNet("adam")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_epochs=1, deterministic=True, enable_checkpointing=True, callbacks=[*callbacks(), ckpt]).fit(
        first, loader(32, 4)
    )
    L.seed_everything(0)
    resumed = ConvNet("adam")
    trainer(tmp_path, max_epochs=2, deterministic=True, callbacks=callbacks()).fit(
        resumed, loader(32, 4), ckpt_path=ckpt.last_model_path
    )
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- mixed precision
def test_bf16_mixed_keeps_the_isocline(tmp_path):
    L.seed_everything(0)
    model = ConvNet("sgd_momentum")
    trainer(tmp_path, max_epochs=2, precision="bf16-mixed", callbacks=[MeanShiftRejection()]).fit(model, loader())
    assert worst_mean_shift(model) < 1e-5


def test_bf16_true_projects_low_precision_gradients(tmp_path):
    L.seed_everything(0)
    model = ConvNet("sgd_momentum")
    trainer(tmp_path, max_epochs=2, precision="bf16-true", callbacks=[MeanShiftRejection()]).fit(model, loader())
    assert model.features[0].weight.dtype == torch.bfloat16
    assert worst_mean_shift(model) < 2e-2  # bf16 has 8 bits of mantissa; a fresh conv is at ~0.3


class GradCheck(L.Callback):
    """Records, at on_before_optimizer_step (after AMP unscaling), the worst relative kernel mean of the grads."""

    def __init__(self) -> None:
        self.worst: list[float] = []
        self.scales: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        vals = []
        for w in eligible_weights(pl_module):
            g = w.parameter.grad
            if w.centrable and g is not None and torch.isfinite(g).all():
                vals.append(float(mean_shift(g, mode=DEFAULT_MODE, **w.layout_kwargs())))
        self.worst.append(max(vals, default=0.0))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales.append(float(scaler.get_scale()) if scaler is not None else 1.0)


def test_fp16_grad_scaler_projection_is_after_unscale_and_overflow_skips_cleanly(tmp_path):
    """The fp16 GradScaler path, run on the CPU: projected, unscaled grads; an overflow step leaves weights alone."""

    class Overflowing(ConvNet):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 2 else loss

    L.seed_everything(0)
    model = Overflowing("adam")
    check = GradCheck()
    snapshots = {}

    class Snap(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[batch_idx] = conv_weights(pl_module)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    # the calibration ends in the first step (it would otherwise go on rescaling filters in the overflow step's
    # forward, which is not the optimizer step this test is about)
    t = trainer(tmp_path, max_steps=4, plugins=[MixedPrecision("16-mixed", "cpu", scaler)], callbacks=[
        MeanShiftRejection(calibration_samples=4), check, Snap()])
    t.fit(model, loader(32, 4))
    assert all(w < 1e-5 for i, w in enumerate(check.worst) if i != 2)
    assert check.scales[3] < check.scales[2]  # the scaler saw the overflow and backed off
    for name, value in snapshots[2].items():  # the overflow step was skipped: weights unchanged, no NaN
        assert torch.equal(snapshots[3][name], value), name
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert worst_mean_shift(model) < 1e-5


# --------------------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_accumulation_equals_one_big_batch_for_sgd(tmp_path, alpha):
    finals = []
    for accumulate, batch in ((4, 2), (1, 8)):
        L.seed_everything(0)
        model = ConvNet("sgd")
        cb = MeanShiftRejection(alpha=alpha, calibrate=False)  # calibration sees one micro-batch
        trainer(tmp_path, max_epochs=2, accumulate_grad_batches=accumulate, callbacks=[cb]).fit(
            model, loader(32, batch)
        )
        finals.append(conv_weights(model))
    for name in finals[0]:
        torch.testing.assert_close(finals[0][name], finals[1][name], rtol=1e-4, atol=1e-6)


def test_accumulation_projects_once_per_optimizer_step_when_alpha_below_one(tmp_path, monkeypatch):
    calls = []
    import lightning_msr.engine.step as module

    original = module.project_groups_
    monkeypatch.setattr(module, "project_groups_", lambda *a: (calls.append(1), original(*a)))
    cb = MeanShiftRejection(alpha=0.5, calibrate=False, implementation="eager")
    trainer(tmp_path, max_steps=3, accumulate_grad_batches=4, callbacks=[cb]).fit(ConvNet("sgd"), loader(48, 2))
    n_weights = sum(w.centrable for w in cb.weights)
    assert len(calls) == 3 * n_weights


@needs_fused_kernel
@pytest.mark.free_stem
@pytest.mark.parametrize(("observer", "fused_call"), [(False, "sgd_step_"), (True, "project_and_clip_")])
def test_accumulation_runs_the_fused_pass_once_per_optimizer_step(tmp_path, monkeypatch, observer, fused_call):
    """With SGD and nothing looking at the gradients before the step, the pass does SGD's update of the kernels too
    (`sgd_step_`); a callback with `on_before_optimizer_step` gets them projected in their own pass before it."""
    import lightning_msr.engine.step as module

    calls = []
    original = getattr(module, fused_call)
    monkeypatch.setattr(module, fused_call, lambda *args: (calls.append(len(args[-1])), original(*args))[1])
    cb = MeanShiftRejection(alpha=0.5, calibrate=False, implementation="fused")
    callbacks = [cb, WeightRecorder()] if observer else [cb]
    trainer(tmp_path, max_steps=3, accumulate_grad_batches=4, callbacks=callbacks).fit(ConvNet("sgd"), loader(48, 2))
    assert len(calls) == 3
    assert calls[0] == sum(w.centrable for w in cb.weights) + 1  # every kernel, and the free stem (clipped)


# --------------------------------------------------------------------------- manual optimization
class TwoOptimizers(L.LightningModule):
    """GAN-style: a generator and a discriminator with their own optimizers, stepped manually."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 1, 3, padding=1))
        self.discriminator = nn.Sequential(
            nn.Conv2d(1, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.Flatten(), nn.LazyLinear(1)
        )
        self.discriminator(torch.zeros(1, 1, 8, 8))  # materialise the lazy head

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        fake = self.generator(x.flip(-1))  # deterministic 'latent' so the test can recompute it
        d_loss = nn.functional.softplus(self.discriminator(fake.detach())).mean()
        d_loss = d_loss + nn.functional.softplus(-self.discriminator(x)).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = nn.functional.softplus(-self.discriminator(fake)).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.generator.parameters(), lr=1e-2),
            torch.optim.SGD(self.discriminator.parameters(), lr=1e-2, momentum=0.9),
        )


def test_manual_optimization_with_two_optimizers_keeps_the_isocline(tmp_path):
    L.seed_everything(0)
    model = TwoOptimizers()
    trainer(tmp_path, max_epochs=2, callbacks=[MeanShiftRejection()]).fit(model, loader())
    assert worst_mean_shift(model) < 1e-5


def test_manual_optimization_projects_each_optimizers_own_parameters_once(tmp_path):
    """alpha=0.5 (not idempotent): the discriminator's step sees its raw grads projected exactly once and the
    generator's kernels, which have no gradient yet, untouched."""
    L.seed_everything(0)
    model = TwoOptimizers()
    reference = copy.deepcopy(model)
    recorder = WeightRecorder()
    data = loader(4, 4)
    msr = MeanShiftRejection(alpha=0.5, init="none", adaptive_clip=None, mode="kernel")  # exact, no clipping
    trainer(tmp_path, max_steps=1, callbacks=[msr, recorder]).fit(model, data)
    x, _ = next(iter(data))
    fake = reference.generator(x.flip(-1))
    d_loss = nn.functional.softplus(reference.discriminator(fake.detach())).mean()
    d_loss = d_loss + nn.functional.softplus(-reference.discriminator(x)).mean()
    d_loss.backward()
    seen = recorder.grads[0]  # at opt_d.step()
    for name, param in reference.discriminator.named_parameters():
        raw = param.grad
        expected = raw - 0.5 * raw.mean(dim=(2, 3), keepdim=True) if raw.dim() == 4 else raw
        torch.testing.assert_close(seen[f"discriminator.{name}"], expected)
    assert not any(name.startswith("generator") for name in seen)
    # at opt_g.step() the generator's kernels are projected once, with alpha=0.5
    g_seen = recorder.grads[1]
    for name in ("generator.0.weight", "generator.2.weight"):
        g = g_seen[name]
        assert g.mean(dim=(2, 3)).abs().max() > 1e-9


# --------------------------------------------------------------------------- frozen and unfrozen layers
class WithBackbone(ConvNet):
    def __init__(self) -> None:
        super().__init__("adam")
        self.backbone = self.features[:4]

    def configure_optimizers(self):
        return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=1e-2)


def test_frozen_layers_are_skipped_and_unfrozen_ones_projected(tmp_path):
    L.seed_everything(0)
    model = WithBackbone()
    snapshots = {}

    class Snap(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots[trainer.current_epoch] = conv_weights(pl_module)

    finetune = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.5, verbose=False)
    recorder = WeightRecorder()
    trainer(tmp_path, max_epochs=3, callbacks=[MeanShiftRejection(), finetune, Snap(), recorder]).fit(model, loader())
    name = "features.0.weight"
    # epoch 0: the backbone is frozen, its kernels unchanged (and never re-centred by the Adam post-step hook)
    assert torch.equal(snapshots[0][name], recorder.at_fit_start[name])
    assert not torch.equal(snapshots[0]["features.8.weight"], recorder.at_fit_start["features.8.weight"])
    # after unfreezing it trained, and stayed on the isocline under Adam
    assert not torch.equal(snapshots[2][name], snapshots[0][name])
    assert worst_mean_shift(model) < 1e-5


def test_parameters_without_grad_are_left_alone(tmp_path):
    """A kernel that gets no gradient (unused branch) is neither projected nor re-centred."""

    class Unused(ConvNet):
        def __init__(self):
            super().__init__("adam")
            self.unused = nn.Conv2d(3, 3, 3)

    L.seed_everything(0)
    model = Unused()
    recorder = WeightRecorder()
    trainer(tmp_path, max_steps=3, callbacks=[MeanShiftRejection(), recorder]).fit(model, loader())
    assert model.unused.weight.grad is None
    assert torch.equal(model.unused.weight, recorder.at_fit_start["unused.weight"])


# --------------------------------------------------------------------------- memory formats, compile
class ChannelsLast(ConvNet):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x.to(memory_format=torch.channels_last)), y)


@pytest.mark.parametrize("timing", ["auto", "optimizer_step"])
def test_channels_last_weights_and_activations(tmp_path, timing):
    L.seed_everything(0)
    model = ChannelsLast("adam").to(memory_format=torch.channels_last)
    cb = MeanShiftRejection(projection_timing=timing)
    trainer(tmp_path, max_epochs=2, callbacks=[cb, NoiseInjection(scale=0.1)]).fit(model, loader(32, 4, channels=1))
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert worst_mean_shift(model) < 1e-5


@pytest.mark.slow
def test_torch_compile_keeps_projection(tmp_path):
    L.seed_everything(0)
    model = ConvNet("adam")
    compiled = torch.compile(model, backend="aot_eager")  # AOTAutograd without a C++ toolchain
    trainer(tmp_path, max_epochs=2, callbacks=[MeanShiftRejection()]).fit(compiled, loader())
    assert worst_mean_shift(model) < 1e-5


# --------------------------------------------------------------------------- clipping
def test_norm_clipping_keeps_the_isocline_without_recentering(tmp_path):
    L.seed_everything(0)
    model = ConvNet("sgd_momentum")
    check = GradCheck()
    cb = MeanShiftRejection()
    trainer(tmp_path, max_epochs=2, gradient_clip_val=0.01, gradient_clip_algorithm="norm", callbacks=[cb, check]).fit(
        model, loader()
    )
    assert not cb.engine.uses_recentering(model.optimizers().optimizer)  # SGD: norm clipping alone keeps the projection
    assert worst_mean_shift(model) < 1e-5


def test_value_clipping_warns_and_recentering_restores(tmp_path):
    L.seed_everything(0)
    model = ConvNet("sgd_momentum")
    with pytest.warns(MSRWarning, match="clipping by value.*breaks the zero-mean condition"):
        trainer(tmp_path, max_epochs=2, gradient_clip_val=1e-3, gradient_clip_algorithm="value",
                callbacks=[MeanShiftRejection()]).fit(model, loader())
    assert worst_mean_shift(model) < 1e-5
    # contrast: without re-centring, value clipping pushes kernels off the isocline
    L.seed_everything(0)
    model = ConvNet("sgd_momentum")
    with pytest.warns(MSRWarning):
        trainer(tmp_path, max_epochs=2, gradient_clip_val=1e-3, gradient_clip_algorithm="value",
                callbacks=[MeanShiftRejection(recenter=False)]).fit(model, loader())
    assert worst_mean_shift(model) > 1e-4


# --------------------------------------------------------------------------- NaN / Inf
def test_non_finite_gradients_do_not_crash_and_a_skipped_step_leaves_weights(tmp_path):
    class SkipsNonFinite(ConvNet):
        def on_before_optimizer_step(self, optimizer):
            # the user's own guard: skip the step (zero the update) when a gradient is not finite
            if not all(torch.isfinite(p.grad).all() for p in self.parameters() if p.grad is not None):
                for p in self.parameters():
                    p.grad = None

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx == 1 else loss

    L.seed_everything(0)
    model = SkipsNonFinite("adam")
    snapshots = {}

    class Snap(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[batch_idx] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    for timing in ("backward", "optimizer_step"):
        snapshots.clear()
        # the calibration ends in the first step, so the skipped step is all that runs between the snapshots
        msr = MeanShiftRejection(projection_timing=timing, calibration_samples=4)
        trainer(tmp_path, max_steps=3, callbacks=[msr, Snap()]).fit(model, loader(32, 4))
        for name, value in snapshots[1].items():
            assert torch.equal(snapshots[2][name], value), name
        assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------- BatchNorm folded into the conv
def folded_callbacks(**kwargs: Any) -> list:
    return [MeanShiftRejection(batchnorm="replace", **kwargs)]


def assert_folded(model: nn.Module) -> None:
    conv = model.features[0]
    assert type(conv) is ScaledConv2d and type(model.features[1]) is nn.Identity
    assert "features.0.scale" not in {w.name for w in eligible_weights(model)}


@pytest.mark.parametrize("optimizer", ["sgd_nesterov_wd", "adamw"])
def test_folded_model_stays_on_the_isocline_and_the_scale_trains_freely(tmp_path, optimizer):
    L.seed_everything(0)
    model = ConvNet(optimizer, batchnorm=True)
    trainer(tmp_path, max_epochs=2, callbacks=folded_callbacks(keep_magnitude=True, calibrate=False)).fit(
        model, loader()
    )
    assert_folded(model)
    conv = model.features[0]
    assert worst_mean_shift(model) < 1e-5
    # keep_magnitude acts on the direction: every filter of the folded conv is still at its init norm
    torch.testing.assert_close(conv.weight.flatten(1).norm(dim=1), torch.ones(8), rtol=1e-5, atol=1e-5)
    # the scale is its own parameter: trained, and neither centred nor renormalised
    assert not torch.allclose(conv.scale, torch.ones(8))
    assert abs(float(conv.scale.mean())) > 0.5


def test_folded_resume_is_bit_identical(tmp_path):
    L.seed_everything(0)
    straight = ConvNet("adam", batchnorm=True)
    trainer(tmp_path, max_epochs=2, deterministic=True, callbacks=folded_callbacks()).fit(straight, loader(32, 4))

    L.seed_everything(0)
    first = ConvNet("adam", batchnorm=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(
        tmp_path, max_epochs=1, deterministic=True, enable_checkpointing=True, callbacks=[*folded_callbacks(), ckpt]
    ).fit(first, loader(32, 4))
    L.seed_everything(0)
    resumed = ConvNet("adam", batchnorm=True)  # a fresh BatchNorm model: the callback folds it before the restore
    trainer(tmp_path, max_epochs=2, deterministic=True, callbacks=folded_callbacks()).fit(
        resumed, loader(32, 4), ckpt_path=ckpt.last_model_path
    )
    assert_folded(resumed)
    assert straight.state_dict().keys() == resumed.state_dict().keys()
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_folded_bf16_mixed_keeps_the_isocline(tmp_path):
    L.seed_everything(0)
    model = ConvNet("sgd_momentum", batchnorm=True)
    before = model.features[1].weight.detach().clone()
    trainer(tmp_path, max_epochs=2, precision="bf16-mixed", callbacks=folded_callbacks()).fit(model, loader())
    assert_folded(model)
    assert model.features[0].scale.dtype == torch.float32 and not torch.equal(model.features[0].scale, before)
    assert worst_mean_shift(model) < 1e-5


def test_folded_accumulation_equals_one_big_batch_for_sgd(tmp_path):
    finals = []
    for accumulate, batch in ((4, 2), (1, 8)):
        L.seed_everything(0)
        model = ConvNet("sgd", batchnorm=True)
        callbacks = folded_callbacks(calibrate=False)  # calibration would see one micro-batch
        trainer(tmp_path, max_epochs=2, accumulate_grad_batches=accumulate, callbacks=callbacks).fit(
            model, loader(32, batch)
        )
        assert_folded(model)
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in finals[0]:
        torch.testing.assert_close(finals[0][name], finals[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_folded_torch_compile_keeps_projection(tmp_path):
    L.seed_everything(0)
    model = ConvNet("adam", batchnorm=True)
    compiled = torch.compile(model, backend="aot_eager")
    trainer(tmp_path, max_epochs=2, callbacks=folded_callbacks()).fit(compiled, loader())
    assert_folded(model)
    assert not torch.allclose(model.features[0].scale, torch.ones(8))
    assert worst_mean_shift(model) < 1e-5
