"""The fused per-step kernel (lightning_msr.fused): equal to the eager path, deterministic, and never in the way."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from helpers import DEFAULT_MODE, ConvNet, conv_weights, loader, needs_fused_kernel, trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from test_functional import conv_weights as conv_weight_cases

import lightning_msr.fused as fused_module
from lightning_msr import MeanShiftRejection, MSRConfigurationError, MSRWarning
from lightning_msr.functional import adaptive_clip_, mean_shift, project_mean_
from lightning_msr.fused import (
    FusedWeight,
    fused_unavailable,
    project_and_clip_,
    recenter_and_rescale_,
    sgd_step_,
    unsupported,
)

pytestmark = needs_fused_kernel


def _eager_keep_(weight: torch.Tensor, target: torch.Tensor) -> None:
    norms = weight.flatten(1).norm(dim=1)
    ratio = torch.where(target == 0, 1.0, target / norms.clamp(min=torch.finfo(torch.float32).tiny))
    weight.mul_(ratio.view(-1, *([1] * (weight.dim() - 1))))


# ------------------------------------------------------------------------------------------ the functions
@settings(max_examples=120, deadline=None)
@given(
    conv_weight_cases(),
    st.floats(0.0, 1.0),
    st.sampled_from([None, 0.01, 0.1, 10.0]),
    st.sampled_from(["kernel", "filter"]),
)
def test_projection_and_clipping_equal_the_eager_functions(case, alpha, clip, mode):
    weight, transposed, groups = case
    weight = weight.float()
    if unsupported(weight, transposed=transposed, mode=mode) is not None:
        with pytest.raises(MSRConfigurationError, match="cannot take"):
            FusedWeight.of(torch.nn.Parameter(weight), mode=mode, transposed=transposed, groups=groups)
        return
    grad = torch.randn_like(weight) * 3
    eager, fused = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    eager.grad, fused.grad = grad.clone(), grad.clone()
    layout = {"transposed": transposed, "groups": groups, "mode": mode}
    centrable = FusedWeight.of(fused, mode=mode, transposed=transposed, groups=groups).alpha > 0
    if centrable and alpha > 0:
        project_mean_(eager.grad, alpha, **layout)
    if clip is not None:
        adaptive_clip_([eager], clip)
    project_and_clip_([FusedWeight.of(fused, mode=mode, transposed=transposed, groups=groups, alpha=alpha, clip=clip)])
    torch.testing.assert_close(fused.grad, eager.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(fused.data, weight)  # the weight is only read


@settings(max_examples=60, deadline=None)
@given(conv_weight_cases(), st.booleans(), st.booleans())
def test_recentring_and_rescaling_equal_the_eager_path(case, recenter, keep):
    weight, transposed, groups = case
    weight = weight.float()
    if unsupported(weight, transposed=transposed, keep_magnitude=keep) is not None:
        return
    target = torch.rand(weight.shape[0]) + 0.5
    target[0] = 0.0  # a filter left free
    param = torch.nn.Parameter(weight.clone())
    description = FusedWeight.of(
        param, transposed=transposed, groups=groups, recenter=recenter, target=target if keep else None
    )
    expected = weight.clone()
    if description.recenter:
        project_mean_(expected, transposed=transposed, groups=groups)
    if keep:
        _eager_keep_(expected, target)
    recenter_and_rescale_([description])
    torch.testing.assert_close(param.data, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "hyper",
    [
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        {"momentum": 0.5, "dampening": 0.1},
        {"weight_decay": 0.01, "maximize": True},
        {},
    ],
)
@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (16, 8, 1, 1), (6, 2, 3, 3, 3), (5, 7)])
def test_sgd_step_equals_projection_clipping_and_sgd(hyper, shape):
    torch.manual_seed(0)
    start = torch.randn(shape)
    target = torch.rand(shape[0]) + 0.5
    eager, fused = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    bias_e, bias_f = torch.nn.Parameter(torch.zeros(shape[0])), torch.nn.Parameter(torch.zeros(shape[0]))
    opt_e = torch.optim.SGD([eager, bias_e], lr=0.1, **hyper)
    opt_f = torch.optim.SGD([fused, bias_f], lr=0.1, **hyper)
    description = FusedWeight.of(fused, alpha=0.7, clip=0.1, recenter=True, target=target)
    for step in range(4):
        grad = torch.randn(shape) * (step + 1)
        eager.grad, fused.grad = grad.clone(), grad.clone()
        bias_e.grad = bias_f.grad = torch.ones(shape[0])
        project_mean_(eager.grad, 0.7)
        adaptive_clip_([eager], 0.1)
        opt_e.step()
        project_mean_(eager.data)
        _eager_keep_(eager.data, target)
        assert sgd_step_(opt_f, [description]) == [fused]
        fused.grad = None  # the other parameters: SGD's own step
        opt_f.step()
        torch.testing.assert_close(fused.data, eager.data, rtol=1e-5, atol=1e-6)
        assert torch.equal(bias_f.data, bias_e.data)
    if hyper.get("momentum"):  # the buffer lives where SGD keeps it, so checkpoints and a switch to eager work
        torch.testing.assert_close(
            opt_f.state[fused]["momentum_buffer"], opt_e.state[eager]["momentum_buffer"], rtol=1e-5, atol=1e-6
        )


def test_sgd_step_refuses_other_optimizers():
    w = torch.nn.Parameter(torch.randn(4, 2, 3, 3))
    with pytest.raises(MSRConfigurationError, match=r"torch\.optim\.SGD"):
        sgd_step_(torch.optim.Adam([w]), [FusedWeight.of(w)])


def test_the_result_does_not_depend_on_the_number_of_threads():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(256, 128, 3, 3)) for _ in range(2)]
    grads = [torch.randn_like(w) for w in weights]
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            params = [torch.nn.Parameter(w.detach().clone()) for w in weights]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            project_and_clip_([FusedWeight.of(p, clip=0.01) for p in params])
            results.append([p.grad.clone() for p in params])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize(
    ("tensor", "transposed", "keep", "match"),
    [
        (torch.zeros(4, 2, 3, 3, dtype=torch.bfloat16), False, False, "bfloat16"),
        (torch.zeros(4, 2, 3, 3, dtype=torch.float64), False, False, "float64"),
        (torch.zeros(4, 2, 3, 3).to(memory_format=torch.channels_last), False, False, "contiguous"),
        (torch.zeros(4, 2, 1, 1), True, False, "pointwise ConvTranspose"),
        (torch.zeros(4, 2, 3, 3), True, True, "keep_magnitude"),
        (torch.zeros(4), False, False, "fewer than 2 dims"),
    ],
)
def test_unsupported_says_why(tensor, transposed, keep, match):
    assert match in unsupported(tensor, transposed=transposed, keep_magnitude=keep)
    with pytest.raises(MSRConfigurationError, match="cannot take"):
        FusedWeight.of(tensor, transposed=transposed, target=torch.ones(4) if keep else None)


def test_fused_weight_checks_its_arguments():
    w = torch.nn.Parameter(torch.zeros(4, 2, 3, 3))
    with pytest.raises(MSRConfigurationError, match="alpha"):
        FusedWeight.of(w, alpha=1.5)
    with pytest.raises(MSRConfigurationError, match="clip"):
        FusedWeight.of(w, clip=0.0)
    with pytest.raises(MSRConfigurationError, match="mode"):
        FusedWeight.of(w, mode="row")
    with pytest.raises(MSRConfigurationError, match="one float32 norm per output filter"):
        FusedWeight.of(w, target=torch.ones(3))


# ------------------------------------------------------------------------------------------ building the kernel
@pytest.fixture
def fresh_kernel_state(monkeypatch, tmp_path):
    """A process that has not loaded the kernel yet, with its own cache folder."""
    monkeypatch.setattr(fused_module, "_library", None)
    monkeypatch.setattr(fused_module, "_failure", None)
    monkeypatch.setattr(fused_module, "_compile_seconds", None)
    monkeypatch.setenv("LIGHTNING_MSR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_kernel_is_compiled_once_into_the_cache(fresh_kernel_state):
    assert fused_unavailable() is None
    built = list(fresh_kernel_state.glob("msr_fused-*.so"))
    assert len(built) == 1 and fused_module.compile_seconds() is not None
    assert not list(fresh_kernel_state.glob("*.partial"))
    fused_module._library = None  # a new process: loads the cached file, compiles nothing
    fused_module._compile_seconds = None
    assert fused_unavailable() is None
    assert fused_module.compile_seconds() is None


def test_without_a_compiler_the_reason_is_given(fresh_kernel_state, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert "no C compiler" in fused_unavailable()
    with pytest.raises(MSRConfigurationError, match="not available"):
        project_and_clip_([FusedWeight.of(torch.nn.Parameter(torch.zeros(2, 2, 3, 3)))])


def test_a_failing_compiler_is_reported(fresh_kernel_state, monkeypatch):
    monkeypatch.setenv("CC", "false")
    assert "could not be built" in fused_unavailable()


# ------------------------------------------------------------------------------------------ in the callback
class _FusedSpy(L.Callback):
    """Whether the fit took the fused path (the flag is reset at teardown)."""

    def __init__(self, msr: MeanShiftRejection) -> None:
        self.msr, self.fused = msr, None

    def on_train_start(self, trainer, pl_module):
        self.fused = self.msr.fused


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "sgd_nesterov_wd", "adam", "rmsprop"])
@pytest.mark.parametrize("keep", [False, True])
def test_the_callback_trains_alike_on_both_paths(tmp_path, optimizer, keep):
    finals, fused_flags = {}, {}
    for implementation in ("eager", "fused"):
        L.seed_everything(0)
        model = ConvNet(optimizer)
        cb = MeanShiftRejection(implementation=implementation, keep_magnitude=keep)
        spy = _FusedSpy(cb)
        trainer(tmp_path, max_steps=6, callbacks=[cb, spy]).fit(model, loader(48, 8))
        finals[implementation] = conv_weights(model)
        fused_flags[implementation] = spy.fused
        shifts = [mean_shift(w.parameter, mode=DEFAULT_MODE, **w.layout_kwargs()) for w in cb.weights if w.centrable]
        assert max(float(s) for s in shifts) < 1e-5
    # ConvNet has a ConvTranspose2d: with keep_magnitude its output-channel norms are not rows, so eager runs
    assert fused_flags == {"eager": False, "fused": not keep}
    for name, value in finals["eager"].items():
        torch.testing.assert_close(finals["fused"][name], value, rtol=1e-4, atol=1e-5)


def _plain_net() -> ConvNet:
    model = ConvNet("sgd_momentum")
    model.features[6] = torch.nn.Conv2d(12, 8, 3, padding=1)  # no ConvTranspose: every path can take the kernel
    return model


def test_keep_magnitude_on_the_fused_path(tmp_path):
    finals = {}
    for implementation in ("eager", "fused"):
        L.seed_everything(0)
        model = _plain_net()
        cb = MeanShiftRejection(implementation=implementation, keep_magnitude=True)
        trainer(tmp_path, max_steps=5, callbacks=[cb]).fit(model, loader(40, 8))
        finals[implementation] = conv_weights(model)
    for name, value in finals["eager"].items():
        torch.testing.assert_close(finals["fused"][name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("implementation", ["fused", "eager"])
def test_resume_is_bit_exact(tmp_path, implementation):
    """Two epochs straight, or one epoch, a checkpoint and a resumed second epoch: the same bits (SGD's momentum
    buffers are where SGD keeps them, and the kernel does not depend on anything but its inputs)."""

    def fit(model, root, epochs, **kwargs):
        msr = MeanShiftRejection(implementation=implementation, keep_magnitude=True)
        callbacks = [msr, *kwargs.pop("callbacks", [])]
        trainer(root, max_epochs=epochs, callbacks=callbacks, **kwargs).fit(
            model, loader(32, 8), **kwargs.pop("fit", {})
        )
        return msr

    L.seed_everything(0)
    straight = _plain_net()
    fit(straight, tmp_path / "a", 2)
    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(_plain_net(), tmp_path / "b", 1, enable_checkpointing=True, callbacks=[ckpt])
    resumed = _plain_net()
    msr = MeanShiftRejection(implementation=implementation, keep_magnitude=True)
    spy = _FusedSpy(msr)
    trainer(tmp_path / "c", max_epochs=2, callbacks=[msr, spy]).fit(
        resumed, loader(32, 8), ckpt_path=ckpt.last_model_path
    )
    assert spy.fused is (implementation == "fused")
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_trainer_gradient_clipping_runs_the_eager_path_and_says_why(tmp_path, caplog):
    cb = MeanShiftRejection()
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, max_steps=2, gradient_clip_val=1.0, callbacks=[cb]).fit(ConvNet(), loader())
    assert "eager per-step path runs" in caplog.text and "gradient_clip_val" in caplog.text
    with pytest.warns(MSRWarning, match=r"implementation='fused'\) runs the eager per-step path.*gradient_clip_val"):
        trainer(
            tmp_path, max_steps=2, gradient_clip_val=1.0, callbacks=[MeanShiftRejection(implementation="fused")]
        ).fit(ConvNet(), loader())


def test_low_precision_weights_run_the_eager_path(tmp_path, caplog):
    model = ConvNet()
    with caplog.at_level(logging.INFO), pytest.warns(MSRWarning):
        trainer(tmp_path, max_steps=2, precision="bf16-true", callbacks=[MeanShiftRejection()]).fit(model, loader())
    assert "bfloat16" in caplog.text and "eager per-step path runs" in caplog.text


def test_no_compiler_runs_the_eager_path(tmp_path, caplog, fresh_kernel_state, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    L.seed_everything(0)
    model = ConvNet()
    cb = MeanShiftRejection()
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, max_steps=3, callbacks=[cb]).fit(model, loader())
    assert "no C compiler" in caplog.text
    shifts = [mean_shift(w.parameter, mode=DEFAULT_MODE, **w.layout_kwargs()) for w in cb.weights if w.centrable]
    assert max(float(s) for s in shifts) < 1e-5


def test_implementation_is_checked():
    with pytest.raises(MSRConfigurationError, match=r"implementation.*'auto', 'fused', 'grouped', 'eager'"):
        MeanShiftRejection(implementation="triton")
    assert "implementation='eager'" in repr(MeanShiftRejection(implementation="eager"))


def test_amp_grad_scaler_steps_without_a_closure_on_the_fused_sgd_path(tmp_path):
    """AMP's `GradScaler.step` runs the closure first and then `optimizer.step()` without one: the fused SGD update
    then runs in the step's pre-hook. Same weights as the eager path."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    finals = {}
    for implementation in ("eager", "fused"):
        L.seed_everything(0)
        model = _plain_net()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        msr = MeanShiftRejection(implementation=implementation)
        plugin = MixedPrecision("16-mixed", "cpu", scaler)
        trainer(tmp_path, max_steps=4, plugins=[plugin], callbacks=[msr]).fit(model, loader(32, 8))
        finals[implementation] = conv_weights(model)
    for name, value in finals["eager"].items():
        assert not torch.equal(value, _plain_net().state_dict()[name])
        torch.testing.assert_close(finals["fused"][name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("how", ["keyword", "positional", "none"])
def test_the_fused_sgd_step_takes_the_closure_however_it_is_passed(tmp_path, how):
    """Manual calls of `optimizer.step` with the callback's hooks on it: closure by keyword, positional, or none."""
    L.seed_everything(0)
    model = _plain_net()
    msr = MeanShiftRejection(implementation="fused")
    grabbed = {}

    class Grab(L.Callback):
        def on_train_end(self, trainer, pl_module):  # the hooks are still registered here
            grabbed["optimizer"] = trainer.optimizers[0]
            opt = trainer.optimizers[0]
            x, y = next(iter(loader(8, 8)))
            before = conv_weights(pl_module)

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(pl_module(x), y)
                loss.backward()
                return loss

            with torch.enable_grad():
                if how == "keyword":
                    opt.step(closure=closure)
                elif how == "positional":
                    opt.step(closure)
                else:
                    closure()
                    opt.step()
            grabbed["moved"] = {n: not torch.equal(v, conv_weights(pl_module)[n]) for n, v in before.items()}
            grabbed["grads"] = all(p.grad is not None for p in pl_module.parameters())

    trainer(tmp_path, max_steps=1, callbacks=[msr, Grab()]).fit(model, loader(8, 8))
    assert all(grabbed["moved"].values())
    assert grabbed["grads"]  # the kernels' gradients are given back after SGD's own loop
    for w in msr.weights:
        if w.centrable:
            assert float(mean_shift(w.parameter, mode=DEFAULT_MODE, **w.layout_kwargs())) < 1e-5


@pytest.mark.parametrize(("options", "fused_sgd"), [({}, True), ({"fused": True}, False)])
def test_sgd_with_its_own_fused_kernel_keeps_its_update(tmp_path, monkeypatch, options, fused_sgd):
    """`SGD(fused=True)` unscales AMP's gradients inside its own kernel, so the callback leaves its update to it."""
    import lightning_msr.engine.step as module

    calls = []
    original = module.sgd_step_
    monkeypatch.setattr(module, "sgd_step_", lambda *args: (calls.append(1), original(*args))[1])

    class Net(ConvNet):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, **options)

    L.seed_everything(0)
    model = Net()
    msr = MeanShiftRejection(implementation="fused")
    trainer(tmp_path, max_steps=2, callbacks=[msr]).fit(model, loader())
    assert bool(calls) is fused_sgd
    shifts = [mean_shift(w.parameter, mode=DEFAULT_MODE, **w.layout_kwargs()) for w in msr.weights if w.centrable]
    assert max(float(s) for s in shifts) < 1e-5
