"""The engine outside the Trainer: MSREngine, NoiseEngine and DeepControlEngine on plain models and optimizers.

The end-to-end check trains the same BatchNorm model three ways (Trainer + callbacks, Lightning Fabric + engines,
a plain PyTorch loop + engines; 1 process, and 2 CPU processes with gloo), each with a checkpoint and a resume in
the middle, and requires the same weights bit for bit (``tests/ddp_scripts/engine_run.py``).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from helpers import DEFAULT_MODE, run_script
from torch import nn

import lightning_msr
from lightning_msr import MeanShiftRejection, MSREngine, MSRSettings, NoiseInjection
from lightning_msr.engine.deep_control import DeepControlEngine
from lightning_msr.engine.noise import NoiseEngine, NoiseSettings
from lightning_msr.exceptions import MSRConfigurationError
from lightning_msr.functional import mean_shift

SCRIPT = Path(__file__).parent / "ddp_scripts" / "engine_run.py"


def bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def batches(n: int = 4, batch_size: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, 1, 8, 8, generator=g), torch.randint(0, 3, (batch_size,), generator=g))
        for _ in range(n)
    ]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data) -> None:
    for x, y in data:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def worst_shift(engine: MSREngine) -> float:
    return max(float(mean_shift(w.parameter, mode=DEFAULT_MODE, **w.layout_kwargs())) for w in engine.weights)


# ---------------------------------------------------------------------------------------------- the three loops


@pytest.fixture(scope="module", params=[1, pytest.param(2, marks=pytest.mark.ddp)], ids=["1-process", "2-process"])
def loops(request, tmp_path_factory):
    devices = request.param
    results = {}
    for loop, straight in (("trainer", True), ("trainer", False), ("fabric", False), ("plain", False)):
        out = tmp_path_factory.mktemp(f"{loop}{'-straight' if straight else ''}-{devices}")
        result = run_script(
            SCRIPT, out, "--loop", loop, "--devices", str(devices), *(["--straight"] if straight else [])
        )
        assert result.returncode == 0, result.stderr[-4000:]
        results[(loop, straight)] = (torch.load(out / "result.pt"), out)
    return devices, results


def test_fabric_and_plain_loops_train_the_weights_of_the_trainer_bit_for_bit(loops):
    _, results = loops
    (reference, _) = results[("trainer", True)]
    for key, (result, _) in results.items():
        assert result["state"].keys() == reference["state"].keys(), key
        for name, value in reference["state"].items():
            assert torch.equal(result["state"][name], value), (key, name)


def test_every_loop_keeps_the_kernels_zero_mean_and_steps_the_new_parameters(loops):
    _, results = loops
    assert results[("trainer", True)][0]["calibrated"]
    for key, (result, _) in results.items():
        assert result["weights"] == 2 and result["mean_shift"] < 1e-6, key  # the stem is left free
        # the optimizer built before the surgery steps the folded scales and biases, and no stale BatchNorm one
        assert result["optimizer_params"] == result["model_params"] == 11, key


def test_the_plain_checkpoint_was_taken_while_the_calibration_pooled(loops):
    devices, results = loops
    saved = torch.load(results[("plain", False)][1] / "plain.pt", weights_only=False)
    if devices == 1:  # 4 samples a step, 16 to pool, 3 steps before the checkpoint: it resumes mid-pooling
        assert saved["msr"]["calibration"]["samples"] == 12 and not saved["msr"]["calibration"]["complete"]
    else:  # 8 samples a step: complete at the second step
        assert "calibration" not in saved["msr"]
    assert saved["noise"]["batches"] == 3


# ---------------------------------------------------------------------------------------------- MSREngine


def test_settings_are_defined_once():
    assert inspect.signature(MeanShiftRejection.__init__) == inspect.signature(MSRSettings.__init__)
    assert MeanShiftRejection.__init__ is MSRSettings.__init__
    callback = MeanShiftRejection(alpha=0.5, keep_magnitude=True, exclude=["1"])
    engine = MSREngine(bn_net(), **{**callback.settings(), "batchnorm": "replace"})
    assert {**engine.settings(), "batchnorm": "warn"} == callback.settings()
    with pytest.raises(MSRConfigurationError, match=r"Expected `alpha` to be in \[0, 1\], but got 2"):
        MSREngine(bn_net(), alpha=2.0)
    with pytest.raises(TypeError, match="calibration_sample"):
        MSREngine(bn_net(), calibration_sample=4)


def test_one_line_adopts_a_batchnorm_model_and_the_optimizer_groups_it_was_built_with():
    torch.manual_seed(0)
    model = bn_net()
    bn_params = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    others = [p for p in model.parameters() if all(p is not q for q in bn_params)]
    optimizer = torch.optim.SGD(
        [{"params": others, "weight_decay": 5e-4}, {"params": bn_params, "weight_decay": 0.0}], lr=0.05, momentum=0.9
    )
    msr = MSREngine(model, optimizer, batchnorm="replace", calibration_samples=8)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    stepped = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(stepped) == len(list(model.parameters()))
    assert all(any(p is q for q in stepped) for p in model.parameters())
    no_decay = optimizer.param_groups[1]["params"]
    # the folded scales and the biases that replaced BatchNorm's keep its group (no weight decay)
    assert any(p is model[0].scale for p in no_decay) and any(p is model[3].scale for p in no_decay)
    assert any(p is model[3].bias for p in no_decay) and all(p is not model[3].weight for p in no_decay)
    train(model, optimizer, batches(4))
    assert msr.calibration is not None and msr.calibration.complete and msr.calibration.passes == 2
    assert worst_shift(msr) < 1e-6


def test_an_optimizer_built_after_the_surgery_is_attached_later():
    torch.manual_seed(0)
    model = bn_net()
    msr = MSREngine(model, batchnorm="replace", calibration_samples=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    msr.attach(optimizer)
    train(model, optimizer, batches(3))
    assert msr.uses_recentering(optimizer)  # Adam's update is not linear in the gradient: re-centred
    assert worst_shift(msr) < 1e-6


def test_the_surgery_refuses_an_optimizer_that_has_stepped():
    model = bn_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, optimizer, batches(1))
    with pytest.raises(
        MSRConfigurationError, match=r"optimizers that have not stepped yet.*holds state for the BatchNorm '1'"
    ):
        MSREngine(model, optimizer, batchnorm="replace")


@pytest.mark.parametrize("implementation", ["eager", "fused"])
def test_detach_removes_every_hook(implementation):
    torch.manual_seed(0)
    model = bn_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with MSREngine(model, optimizer, batchnorm="replace", implementation=implementation, calibration_samples=4) as msr:
        train(model, optimizer, batches(2))
        assert worst_shift(msr) < 1e-6
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert not model._forward_pre_hooks and not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert not model[3].weight._post_accumulate_grad_hooks
    train(model, optimizer, batches(2, seed=1))  # plain training again: the kernels leave the isocline
    assert worst_shift(msr) > 1e-4


def test_keep_magnitude_and_a_mid_calibration_resume_repeat_the_straight_run():
    def start():
        torch.manual_seed(0)
        model = bn_net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        msr = MSREngine(model, optimizer, batchnorm="replace", keep_magnitude=True, calibration_samples=12)
        return model, optimizer, msr

    data = batches(6)
    straight, optimizer, msr = start()
    train(straight, optimizer, data)
    model, optimizer, msr = start()
    train(model, optimizer, data[:2])  # 8 of 12 samples pooled
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "msr": msr.state_dict()}
    assert saved["msr"]["calibration"]["samples"] == 8
    model, optimizer, msr = start()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    msr.load_state_dict(saved["msr"])
    train(model, optimizer, data[2:])
    assert msr.calibration.complete and msr.calibration.passes == 3
    assert "kept_norms" in msr.state_dict()
    for name, value in straight.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_scale_invariant_keeps_the_norms_steps_virtual_ones_and_resumes_bit_for_bit():
    from lightning_msr.functional import filter_norms

    def start():
        torch.manual_seed(0)
        model = bn_net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
        msr = MSREngine(model, optimizer, batchnorm="replace", scale_invariant=True, calibration_samples=4)
        return model, optimizer, msr

    data = batches(8)
    straight, optimizer, msr = start()
    assert not msr.fused  # the fused SGD pass does not step virtual weights
    train(straight, optimizer, data)
    virtual = msr.state_dict()["virtual_norms"]
    for w in msr.weights:  # the forward pass sees every filter at its norm at fit start, 1
        torch.testing.assert_close(filter_norms(w.parameter), torch.ones_like(filter_norms(w.parameter)))
        assert float((virtual[w.name] - 1).abs().max()) > 1e-3  # while the virtual weights have moved
    assert worst_shift(msr) < 1e-6
    model, optimizer, msr = start()
    train(model, optimizer, data[:3])
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "msr": msr.state_dict()}
    model, optimizer, msr = start()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    msr.load_state_dict(saved["msr"])
    train(model, optimizer, data[3:])
    for name, value in straight.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_a_bad_optimizer_is_named():
    with pytest.raises(MSRConfigurationError, match=r"Expected `optimizers` to be a torch\.optim\.Optimizer"):
        MSREngine(bn_net(), ["sgd"], batchnorm="replace")


# ---------------------------------------------------------------------------------------------- NoiseEngine


def test_noise_engine_adds_noise_in_training_forwards_only_and_resumes_its_stream():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    x = torch.ones(2, 1, 6, 6)
    engine = NoiseEngine(model, scale=0.2, shift=0.1, seed=3)
    first, second = model(x), model(x)
    assert not torch.equal(first, second)
    with torch.no_grad():  # not a training forward
        assert torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    state = engine.state_dict()
    assert state["batches"] == 2
    third = model(x)
    engine.detach()
    again = NoiseEngine(model, scale=0.2, shift=0.1, seed=99)
    again.load_state_dict(state)
    assert torch.equal(model(x), third)  # the stream continues where the state was taken
    again.detach()
    clean = model(x)
    assert torch.equal(clean, model(x))


def test_noise_engine_and_callback_share_the_settings_and_the_schedule_needs_a_length():
    assert NoiseInjection.__init__ is NoiseSettings.__init__
    assert NoiseInjection(scale=0.2).settings() == NoiseSettings(scale=0.2).settings()
    model = nn.Sequential(nn.Conv2d(1, 4, 3))
    with pytest.raises(MSRConfigurationError, match="Expected `total_steps` with schedule='cosine'"):
        NoiseEngine(model, scale=0.2, final_scale=0.0, schedule="cosine")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = NoiseEngine(model, optimizer, scale=0.2, final_scale=0.0, schedule="linear", total_steps=4)
    levels = []
    for _ in range(4):
        model(torch.ones(1, 1, 5, 5)).sum().backward()
        levels.append(engine.current_scale)
        optimizer.step()
    assert levels == pytest.approx([0.2, 0.15, 0.1, 0.05])
    engine.detach()


# ---------------------------------------------------------------------------------------------- Deep Control


def test_deep_control_engine_replaces_batchnorm_and_updates_the_optimizer():
    model = bn_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = DeepControlEngine(model, optimizer, beta_init=0.5)
    assert engine.replaced == ["1", "4"]
    assert isinstance(model[1], lightning_msr.nn.AutomaticGainControl)
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert stepped == {id(p) for p in model.parameters()}
    before = model[1].beta.detach().clone()
    train(model, optimizer, batches(2))
    assert not torch.equal(model[1].beta, before)  # the new parameters train
    assert engine.state_dict() == {"beta_init": 0.5, "replaced": ["1", "4"]}


def test_a_model_fabric_has_wrapped_is_refused_when_batchnorm_is_to_be_replaced():
    import lightning as L

    fabric = L.Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    model = bn_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    wrapped, fabric_optimizer = fabric.setup(model, optimizer)
    with pytest.raises(MSRConfigurationError, match=r"Create the engine before `fabric.setup`"):
        MSREngine(wrapped, fabric_optimizer, batchnorm="replace")
    # without BatchNorm to replace, the wrapped model and optimizer are taken as they are
    plain = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(3))
    plain(torch.zeros(1, 1, 8, 8))
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    wrapped, fabric_optimizer = fabric.setup(plain, optimizer)
    msr = MSREngine(wrapped, fabric_optimizer, calibration_samples=4)
    for x, y in batches(3):
        fabric_optimizer.zero_grad()
        fabric.backward(nn.functional.cross_entropy(wrapped(x), y))
        fabric_optimizer.step()
    assert msr.model is plain and worst_shift(msr) < 1e-6


# ---------------------------------------------------------------------------------------------- the grouped path


@pytest.mark.parametrize(
    ("optimizer", "settings"),
    [
        ("sgd_momentum", {}),
        ("adam", {}),
        ("sgd_nesterov_wd", {"keep_magnitude": True}),
        ("sgd_momentum", {"alpha": 0.5, "mode": "filter"}),
    ],
)
def test_the_grouped_path_trains_the_weights_of_the_per_weight_path(optimizer, settings):
    """KernelBanks do the eager path's math in a constant number of operations: the same weights within rounding,
    on a net with spatial, depthwise, pointwise and transposed convs (the last ones are left to the per-weight path)."""
    from helpers import OPTIMIZERS, ConvNet

    finals = {}
    for implementation in ("eager", "grouped"):
        torch.manual_seed(0)
        model = ConvNet()
        opt = OPTIMIZERS[optimizer](model.parameters())
        msr = MSREngine(model, opt, implementation=implementation, calibration_samples=8, **settings)
        assert msr.projects_in_backward is (implementation == "eager" and settings.get("alpha", 1.0) == 1.0)
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            x, y = torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        finals[implementation] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if not settings.get("alpha"):  # the exact projection keeps every kernel on the isocline
            assert worst_shift(msr) < 1e-5
        msr.detach()
    for name, value in finals["eager"].items():
        torch.testing.assert_close(finals["grouped"][name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: `auto` takes the grouped path off the CPU")
def test_auto_takes_the_grouped_path_on_a_gpu():
    torch.manual_seed(0)
    model = bn_net().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    msr = MSREngine(model, optimizer, batchnorm="replace", calibration_samples=4)
    assert not msr.fused and not msr.projects_in_backward
    train(model, optimizer, [(x.cuda(), y.cuda()) for x, y in batches(3)])
    assert worst_shift(msr) < 1e-6


def test_noise_on_a_folded_conv_is_added_in_place_with_the_same_values_and_gradients():
    """A ScaledConv2d (BatchNorm folded) returns a fresh tensor its backward does not keep, like a stock conv: the
    noise is multiplied in place there, saving an activation-sized allocation per layer."""
    from lightning_msr.engine.noise import NoiseEngine as Engine
    from lightning_msr.nn import ScaledConv2d

    results = []
    for inplace_types in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4))
        lightning_msr.replace_batchnorm(model, "fold")  # the BatchNorm becomes an Identity
        assert isinstance(model[0], ScaledConv2d)
        if not inplace_types:  # a second forward hook may have kept the clean output: out of place
            model[0].register_forward_hook(lambda m, a, out: None)
        engine = Engine(model, scale=0.3, shift=0.1, seed=0)
        x = torch.randn(2, 1, 6, 6, requires_grad=True)
        y = model(x)  # a training forward of the model: the noise is on
        assert (y._version > 0) is inplace_types  # the conv's own output, changed in place
        y.square().sum().backward()
        results.append((y.detach(), x.grad, model[0].weight.grad, model[0].scale.grad))
        assert engine.batches == 1
        engine.detach()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
