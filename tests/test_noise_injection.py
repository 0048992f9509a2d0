"""NoiseInjection and channel_noise: the noise's statistics, when it is applied, its randomness, resume, errors."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_msr import MSRConfigurationError, NoiseInjection
from lightning_msr.engine.noise import scheduled as _scheduled
from lightning_msr.engine.noise import stream_seed as _stream_seed
from lightning_msr.noise import channel_noise

# ---------------------------------------------------------------------------------------------- channel_noise


def draw(scale: float, shift: float = 0.0, distribution: str = "uniform", seed: int = 0, x=None) -> torch.Tensor:
    x = torch.ones(256, 64, 3, 3) if x is None else x
    return channel_noise(x, scale, shift, distribution, torch.Generator().manual_seed(seed))


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def test_uniform_factor_is_one_value_per_map_within_bounds_and_spread():
    scale = 0.2
    y = draw(scale)
    assert bool((y == y[..., :1, :1]).all()), "the factor must be constant over each (sample, channel) map"
    factors = y[:, :, 0, 0].double()
    n = factors.numel()
    assert float(factors.min()) >= 1 - scale and float(factors.max()) <= 1 + scale
    assert float(factors.min()) < 1 - 0.99 * scale and float(factors.max()) > 1 + 0.99 * scale  # fills the range
    assert abs(float(factors.mean()) - 1.0) < 4 * scale / math.sqrt(3 * n)
    assert float(factors.var()) == pytest.approx(scale**2 / 3, rel=0.05)


def test_uniform_shift_is_one_value_per_map_within_bounds_and_spread():
    shift = 0.3
    y = draw(0.0, shift, x=torch.zeros(256, 64, 2, 5))
    assert bool((y == y[..., :1, :1]).all())
    offsets = y[:, :, 0, 0].double()
    assert float(offsets.abs().max()) <= shift
    assert abs(float(offsets.mean())) < 4 * shift / math.sqrt(3 * offsets.numel())
    assert float(offsets.var()) == pytest.approx(shift**2 / 3, rel=0.05)


def test_gaussian_factor_and_shift_spread():
    y = draw(0.1, distribution="gaussian")
    factors = y[:, :, 0, 0].double()
    assert abs(float(factors.mean()) - 1.0) < 4 * 0.1 / math.sqrt(factors.numel())
    assert float(factors.std()) == pytest.approx(0.1, rel=0.05)
    offsets = draw(0.0, 0.2, "gaussian", x=torch.zeros(256, 64, 3))[:, :, 0].double()
    assert abs(float(offsets.mean())) < 4 * 0.2 / math.sqrt(offsets.numel())
    assert float(offsets.std()) == pytest.approx(0.2, rel=0.05)


def test_gaussian_factor_is_clamped_to_0_2():
    factors = draw(2.0, distribution="gaussian")[:, :, 0, 0]
    assert float(factors.min()) == 0.0 and float(factors.max()) == 2.0
    # N(1, 2) < 0 with probability Phi(-0.5) = 0.3085: all of that mass sits at exactly 0
    assert float((factors == 0).double().mean()) == pytest.approx(0.3085, abs=0.02)


def test_noise_is_independent_across_samples_channels_and_between_factor_and_offset():
    # x = 1 at one position and 2 at another: y = a * x + b gives a = y2 - y1 and b = 2 * y1 - y2.
    x = torch.ones(256, 64, 1, 2, dtype=torch.float64)
    x[..., 1] = 2.0
    y = draw(0.2, 0.2, x=x)[:, :, 0]
    a, b = y[..., 1] - y[..., 0], 2 * y[..., 0] - y[..., 1]
    assert float((a - 1).abs().max()) <= 0.2 + 1e-12 and float(b.abs().max()) <= 0.2 + 1e-12
    limit = 4 / math.sqrt(a.numel())  # 4 standard errors of a correlation coefficient
    for values in (a, b):
        assert abs(correlation(values[:, :-1], values[:, 1:])) < limit  # neighbouring channels
        assert abs(correlation(values[:-1], values[1:])) < limit  # neighbouring samples
        assert not any(torch.equal(values[i], values[i + 1]) for i in range(len(values) - 1))
    assert abs(correlation(a, b)) < limit


def test_zero_noise_returns_the_same_tensor_without_graph():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = channel_noise(x, 0.0, 0.0, generator=torch.Generator().manual_seed(0))
    assert y is x and y.grad_fn is None


def test_gradient_flows_through_the_factor_only():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = channel_noise(x, 0.3, 0.2, generator=torch.Generator().manual_seed(0))
    y.sum().backward()
    x2 = torch.zeros_like(x).requires_grad_(False)
    offset = channel_noise(x2, 0.3, 0.2, generator=torch.Generator().manual_seed(0))  # b (x = 0)
    factor = (y - offset) / x
    torch.testing.assert_close(x.grad, factor.detach().expand_as(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_noise_follows_dtype_and_keeps_channels_last(dtype):
    x = torch.randn(4, 6, 5, 5, dtype=dtype).to(memory_format=torch.channels_last)
    for scale, shift in [(0.1, 0.0), (0.0, 0.1), (0.1, 0.1)]:
        y = channel_noise(x, scale, shift, generator=torch.Generator().manual_seed(0))
        assert y.dtype == dtype and y.device == x.device
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_inplace_noise_gives_the_same_values_and_gradients():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3)
    inputs = torch.randn(4, 3, 7, 7)
    grads = []
    for inplace in (False, True):
        conv.zero_grad()
        out = conv(inputs)
        y = channel_noise(out, 0.3, 0.2, generator=torch.Generator().manual_seed(1), inplace=inplace)
        assert (y is out) == inplace
        (y.square() * torch.arange(5.0)).sum().backward()
        grads.append((y.detach().clone(), conv.weight.grad.clone(), conv.bias.grad.clone()))
    for reference, inplace in zip(*grads):
        torch.testing.assert_close(inplace, reference)


def test_generator_draws_are_reproducible_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    first = draw(0.1, 0.1, seed=3)
    assert torch.equal(first, draw(0.1, 0.1, seed=3))
    assert not torch.equal(first, draw(0.1, 0.1, seed=4))
    assert torch.equal(state, torch.get_rng_state())


def test_two_dim_inputs_get_one_value_per_element():
    y = channel_noise(torch.ones(8, 5), 0.5, generator=torch.Generator().manual_seed(0))
    assert y.shape == (8, 5) and len(torch.unique(y)) > 1 and float((y - 1).abs().max()) <= 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": -0.1}, r"Expected `scale` to be in \[0, 1\], but got -0.1"),
        ({"scale": 1.5}, r"Expected `scale` to be in \[0, 1\], but got 1.5\. A uniform factor"),
        ({"scale": -1.0, "distribution": "gaussian"}, r"Expected `scale` to be a finite non-negative number"),
        ({"shift": -0.2}, r"Expected `shift` to be a finite non-negative number, but got -0.2"),
        ({"shift": float("nan")}, r"Expected `shift` to be a finite non-negative number, but got nan"),
        ({"distribution": "laplace"}, r"Expected `distribution` to be one of 'uniform', 'gaussian', but got 'laplace'"),
    ],
)
def test_channel_noise_argument_errors(kwargs, match):
    with pytest.raises(MSRConfigurationError, match=match):
        channel_noise(torch.ones(2, 3, 4), **kwargs)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (
            torch.ones(5),
            r"Expected `x` to be a floating-point tensor of shape \(N, C, \*spatial\), but got a "
            r"torch.float32 tensor of shape \(5,\)",
        ),
        (torch.ones(2, 3, dtype=torch.long), r"but got a torch.int64 tensor of shape \(2, 3\)"),
        ([1.0, 2.0], r"but got list"),
    ],
)
def test_channel_noise_input_errors(x, match):
    with pytest.raises(MSRConfigurationError, match=match):
        channel_noise(x, 0.1)
    with pytest.raises(MSRConfigurationError, match=r"Expected `inplace` to be True or False, but got 'yes'"):
        channel_noise(torch.ones(2, 3), 0.1, inplace="yes")


# ---------------------------------------------------------------------------------------------- the callback


class Probe(nn.Conv2d):
    """A conv whose output is all ones: after NoiseInjection its ``[:, :, 0, 0]`` is exactly the noise ``a + b``."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__(1, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_ones(x.shape[0], self.out_channels, 3, 3)


class NoiseNet(L.LightningModule):
    """Records, per step, whether its conv output differs from a hook-free ``F.conv2d`` and the noise drawn."""

    def __init__(
        self, keep_train_mode_in_validation: bool = False, conv_in_eval: bool = False, capture: bool = False
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.captured: list[torch.Tensor] = []
        if capture:  # a user's hook, registered before NoiseInjection's, that keeps the conv output
            self.conv.register_forward_hook(lambda module, args, output: self.captured.append(output))
        self.probe = Probe()
        self.head = nn.Linear(4, 3)
        self.keep_train_mode_in_validation = keep_train_mode_in_validation
        self.conv_in_eval = conv_in_eval
        self.noise: list[torch.Tensor] = []
        self.train_records: list[dict[str, Any]] = []
        self.val_records: list[dict[str, Any]] = []
        self.first_samples: list[torch.Tensor] = []
        self.levels: list[tuple[float, float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    def _record(self, x: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        out = self.conv(x)
        clean = F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)
        record = {
            "noisy": not torch.equal(out, clean),
            "grad_fn": type(out.grad_fn).__name__ if out.grad_fn is not None else None,
            "conv_training": self.conv.training,
            "hooks": len(self.conv._forward_hooks),
            "probe": self.probe(x)[:, :, 0, 0].detach().clone(),
        }
        return record, out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.conv_in_eval:
            self.conv.eval()  # e.g. a frozen layer
        record, out = self._record(x)
        self.train_records.append(record)
        self.noise.append(record["probe"])
        self.first_samples.append(x[0].clone())
        callback = next((c for c in self.trainer.callbacks if isinstance(c, NoiseInjection)), None)
        if callback is not None:
            self.levels.append((callback.current_scale, callback.current_shift))
        return F.cross_entropy(self.head(torch.relu(out).mean(dim=(2, 3))), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        record, _ = self._record(batch[0])
        self.val_records.append(record)

    def on_validation_model_eval(self) -> None:
        if not self.keep_train_mode_in_validation:
            super().on_validation_model_eval()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def fit(tmp_path, callback=None, model=None, seed: int = 0, ckpt_path=None, train=None, **kwargs) -> NoiseNet:
    if seed is not None:
        L.seed_everything(seed, verbose=False)
    model = NoiseNet() if model is None else model
    callbacks = kwargs.pop("callbacks", []) + ([callback] if callback is not None else [])
    train = loader() if train is None else train
    trainer(tmp_path, callbacks=callbacks, **kwargs).fit(model, train, ckpt_path=ckpt_path)
    return model


def test_noise_in_training_step_and_not_in_validation_step(tmp_path):
    L.seed_everything(0)
    model = NoiseNet()
    t = trainer(tmp_path, callbacks=[NoiseInjection(scale=0.2, shift=0.1)], max_epochs=2, num_sanity_val_steps=2)
    t.fit(model, loader(), loader(16))
    assert len(model.train_records) == 8 and all(r["noisy"] for r in model.train_records)
    assert all(r["grad_fn"] == "AddBackward0" for r in model.train_records)  # in place on a stock conv
    assert len(model.val_records) == 2 + 2 * 2  # sanity check + two epochs
    assert not any(r["noisy"] for r in model.val_records)
    assert all(bool((r["probe"] == 1).all()) for r in model.val_records)


def test_no_noise_in_validation_even_if_the_model_stays_in_train_mode(tmp_path):
    L.seed_everything(0)
    model = NoiseNet(keep_train_mode_in_validation=True)
    t = trainer(tmp_path, callbacks=[NoiseInjection(scale=0.2)], max_epochs=1, num_sanity_val_steps=1)
    t.fit(model, loader(), loader(16))
    assert all(r["conv_training"] for r in model.val_records)  # what makes this test meaningful
    assert model.val_records and not any(r["noisy"] for r in model.val_records)
    assert all(r["noisy"] and r["grad_fn"] == "MulBackward0" for r in model.train_records)


def test_modules_in_eval_mode_get_no_noise_during_training(tmp_path):
    model = fit(tmp_path, NoiseInjection(scale=0.2), model=NoiseNet(conv_in_eval=True))
    assert model.train_records and not any(r["noisy"] for r in model.train_records)
    assert all(r["grad_fn"] == "ConvolutionBackward0" for r in model.train_records)
    assert not any(bool((noise == 1).all()) for noise in model.noise)  # the probe, still in train mode, got noise


def test_an_earlier_forward_hook_keeps_the_clean_output(tmp_path):
    model = fit(tmp_path, NoiseInjection(scale=0.2, shift=0.1), model=NoiseNet(capture=True), max_steps=2)
    assert [r["noisy"] for r in model.train_records] == [True, True]
    assert {r["grad_fn"] for r in model.train_records} == {"AddcmulBackward0"}  # not in place
    first = model.captured[0]  # the output of the training_step's first conv call, as the user's hook kept it
    assert first.shape == (8, 4, 8, 8) and first.grad_fn is not None
    assert type(first.grad_fn).__name__ == "ConvolutionBackward0"  # never modified in place


def test_zero_noise_is_an_exact_identity_in_fit(tmp_path):
    model = fit(tmp_path, NoiseInjection(scale=0.0, shift=0.0), logger=CSVLogger(tmp_path))
    assert model.train_records and not any(r["noisy"] for r in model.train_records)
    assert all(r["grad_fn"] == "ConvolutionBackward0" for r in model.train_records)  # no extra graph
    assert all(bool((noise == 1).all()) for noise in model.noise)
    assert float(model.trainer.callback_metrics["msr/noise_scale"]) == 0.0


def test_noise_levels_are_logged(tmp_path):
    model = fit(tmp_path, NoiseInjection(scale=0.15), logger=CSVLogger(tmp_path))
    assert float(model.trainer.callback_metrics["msr/noise_scale"]) == pytest.approx(0.15)
    assert "msr/noise_shift" not in model.trainer.callback_metrics
    model = fit(tmp_path, NoiseInjection(scale=0.15, shift=0.05), logger=CSVLogger(tmp_path))
    assert float(model.trainer.callback_metrics["msr/noise_shift"]) == pytest.approx(0.05)


def test_hooks_registered_once_not_stacked_on_a_second_fit_and_removed_at_teardown(tmp_path):
    callback = NoiseInjection(scale=0.2)
    L.seed_everything(0)
    model = NoiseNet()
    t = trainer(tmp_path, callbacks=[callback], max_epochs=1)
    t.fit(model, loader())
    assert {r["hooks"] for r in model.train_records} == {1}
    assert len(model.conv._forward_hooks) == 0 and len(model.probe._forward_hooks) == 0
    assert callback.hooked_modules == []
    t.fit_loop.max_epochs = 2  # a second fit continues with the same Trainer, callback and model
    t.fit(model, loader())
    assert len(model.train_records) == 8 and {r["hooks"] for r in model.train_records} == {1}
    assert all(r["noisy"] for r in model.train_records)
    # the continued training continues the noise stream instead of repeating it
    assert not torch.equal(torch.stack(model.noise[:4]), torch.stack(model.noise[4:]))
    assert len(model.conv._forward_hooks) == 0


def test_one_callback_instance_on_two_models(tmp_path):
    callback = NoiseInjection(scale=0.2)
    first = fit(tmp_path, callback)
    second = fit(tmp_path, callback, model=NoiseNet())
    assert all(r["noisy"] and r["hooks"] == 1 for r in first.train_records + second.train_records)
    assert not first.conv._forward_hooks and not second.conv._forward_hooks
    # the same seed gives the same noise stream on both models
    torch.testing.assert_close(torch.stack(first.noise), torch.stack(second.noise), rtol=0, atol=0)


def test_hooked_modules_during_fit(tmp_path):
    seen = []

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(noise.hooked_modules)

    noise = NoiseInjection(scale=0.1, exclude=["probe"])
    model = fit(tmp_path, noise, callbacks=[Spy()], max_steps=1)
    assert seen == [["conv"]]
    assert all(bool((n == 1).all()) for n in model.noise)  # excluded


def test_noise_is_reproducible_under_seed_everything(tmp_path):
    runs = [torch.stack(fit(tmp_path, NoiseInjection(scale=0.2, shift=0.1), seed=seed).noise) for seed in (7, 7, 8)]
    assert runs[0].shape == (4, 8, 4)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    # a different draw per batch, per sample and per channel
    assert len(torch.unique(runs[0])) == runs[0].numel()


def test_explicit_seed_ignores_the_global_seed(tmp_path):
    a = torch.stack(fit(tmp_path, NoiseInjection(scale=0.2, seed=123), seed=1).noise)
    b = torch.stack(fit(tmp_path, NoiseInjection(scale=0.2, seed=123), seed=2).noise)
    c = torch.stack(fit(tmp_path, NoiseInjection(scale=0.2, seed=124), seed=1).noise)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_global_rng_data_order_and_dropout_are_untouched(tmp_path):
    def run(callback):
        L.seed_everything(0, verbose=False)
        model = NoiseNet()
        shuffled = DataLoader(loader().dataset, batch_size=8, shuffle=True)
        trainer(tmp_path, callbacks=[callback] if callback else [], max_epochs=2).fit(model, shuffled)
        return torch.stack(model.first_samples), torch.rand(8), [r["noisy"] for r in model.train_records]

    with_noise, without = run(NoiseInjection(scale=0.3, shift=0.3)), run(None)
    assert torch.equal(with_noise[0], without[0])  # the same data order
    assert torch.equal(with_noise[1], without[1])  # the global RNG is where it would have been
    assert all(with_noise[2]) and not any(without[2])


def test_each_rank_draws_different_noise(tmp_path, monkeypatch):
    rank0 = torch.stack(fit(tmp_path, NoiseInjection(scale=0.2)).noise)
    monkeypatch.setattr(L.Trainer, "global_rank", property(lambda self: 1))
    rank1 = torch.stack(fit(tmp_path, NoiseInjection(scale=0.2)).noise)
    assert not torch.equal(rank0, rank1)
    assert abs(correlation(rank0, rank1)) < 0.3
    assert len({_stream_seed(0, rank, batch, 0) for rank in range(8) for batch in range(100)}) == 800


class RankFiles(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(torch.stack(pl_module.noise), Path(self.out_dir) / f"noise_rank{trainer.global_rank}.pt")


@pytest.mark.ddp
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_each_ddp_rank_draws_different_noise(tmp_path):
    L.seed_everything(0)
    model = NoiseNet()
    t = trainer(
        tmp_path,
        strategy="ddp_spawn_find_unused_parameters_true",
        devices=2,
        max_steps=2,
        callbacks=[NoiseInjection(scale=0.2, shift=0.1), RankFiles(str(tmp_path))],
    )
    t.fit(model, loader())
    rank0, rank1 = (torch.load(tmp_path / f"noise_rank{r}.pt") for r in (0, 1))
    assert rank0.shape == rank1.shape == (2, 8, 4)  # 16 samples per rank
    assert not torch.equal(rank0, rank1)
    # rank 0 of the DDP run draws what a single-process run with the same seed draws
    single = torch.stack(fit(tmp_path, NoiseInjection(scale=0.2, shift=0.1), max_steps=2).noise)
    assert torch.equal(rank0, single)


def test_resume_continues_the_same_noise_stream(tmp_path):
    noise = dict(scale=0.2, shift=0.1)
    # 4 batches per epoch: the checkpoint at step 3 is mid-epoch, the resumed run crosses an epoch boundary
    uninterrupted = torch.stack(fit(tmp_path / "a", NoiseInjection(**noise), max_steps=6, max_epochs=2).noise)
    assert len(uninterrupted) == 6
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = fit(
        tmp_path / "b",
        NoiseInjection(**noise),
        max_steps=3,
        max_epochs=2,
        enable_checkpointing=True,
        callbacks=[checkpoint],
    )
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    # a new process would have a different global seed: the checkpoint's stream must win
    resumed = fit(tmp_path / "b", NoiseInjection(**noise), seed=123, max_steps=6, max_epochs=2, ckpt_path=str(path))
    assert torch.equal(torch.stack(first.noise), uninterrupted[:3])
    assert len(resumed.noise) == 3
    assert torch.equal(torch.stack(resumed.noise), uninterrupted[3:])
    fresh = torch.stack(fit(tmp_path / "c", NoiseInjection(**noise), seed=123, max_steps=3).noise)
    assert not torch.equal(fresh, uninterrupted[3:])


def test_state_dict_round_trip_and_distinct_state_keys():
    a = NoiseInjection()
    a.load_state_dict({"seed": 42, "batches": 17})
    b = NoiseInjection()
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == {"seed": 42, "batches": 17}
    assert NoiseInjection().state_key == a.state_key
    assert NoiseInjection(module_names=["conv"]).state_key != a.state_key
    assert NoiseInjection(exclude=["conv"]).state_key != a.state_key


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", lambda p: 0.2),
        ("linear", lambda p: 0.2 + (0.05 - 0.2) * p),
        ("cosine", lambda p: 0.05 + (0.2 - 0.05) * 0.5 * (1 + math.cos(math.pi * p))),
    ],
)
def test_schedule_over_max_steps(tmp_path, schedule, expected):
    final = {} if schedule == "constant" else {"final_scale": 0.05, "final_shift": 0.0}
    callback = NoiseInjection(scale=0.2, shift=0.1, schedule=schedule, **final)
    model = fit(tmp_path, callback, max_steps=8, max_epochs=-1, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    scales = [s for s, _ in model.levels]
    assert scales == pytest.approx([expected(k / 8) for k in range(8)])
    shifts = [s for _, s in model.levels]
    assert shifts == pytest.approx(
        [
            0.1
            if schedule == "constant"
            else 0.1 * (1 - k / 8)
            if schedule == "linear"
            else 0.05 * (1 + math.cos(math.pi * k / 8))
            for k in range(8)
        ]
    )
    # the noise drawn follows the current level
    for (scale, shift), noise in zip(model.levels, model.noise):
        assert float((noise - 1).abs().max()) <= scale + shift + 1e-6
    logged = (Path(model.trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    column = header.index("msr/noise_scale")
    values = [float(row.split(",")[column]) for row in logged[1:] if row.split(",")[column]]
    assert values == pytest.approx(scales)


def test_schedule_over_epochs_counts_optimizer_steps(tmp_path):
    callback = NoiseInjection(scale=0.2, final_scale=0.0, schedule="linear")
    model = fit(tmp_path, callback, max_epochs=2, accumulate_grad_batches=2)  # 4 batches/epoch -> 4 steps
    assert [s for s, _ in model.levels] == pytest.approx([0.2, 0.2, 0.15, 0.15, 0.1, 0.1, 0.05, 0.05])


def test_schedule_function_endpoints():
    for schedule in ("linear", "cosine"):
        assert _scheduled(0.3, 0.1, 0.0, schedule) == 0.3
        assert _scheduled(0.3, 0.1, 1.0, schedule) == pytest.approx(0.1)
        assert _scheduled(0.3, 0.1, 2.0, schedule) == pytest.approx(0.1)  # past the end: stays at final
    assert _scheduled(0.1, 0.3, 0.5, "cosine") == pytest.approx(0.2)  # an increasing schedule also works


def test_gaussian_noise_in_fit(tmp_path):
    model = fit(tmp_path, NoiseInjection(scale=2.0, distribution="gaussian"))
    noise = torch.stack(model.noise)
    assert float(noise.min()) >= 0.0 and float(noise.max()) <= 2.0
    assert float((noise == 0).double().mean()) > 0.1  # clamped


class UnbatchedNet(NoiseNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0][0]  # (C, H, W): Conv2d accepts unbatched input
        out = self.conv(x)
        clean = F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)
        self.noise.append((out / clean).detach())
        return out.sum()


def test_unbatched_conv_input_gets_one_factor_per_channel(tmp_path):
    model = fit(tmp_path, NoiseInjection(scale=0.3), model=UnbatchedNet(), max_steps=2)
    for ratio in model.noise:
        assert ratio.shape == (4, 8, 8)
        per_channel = ratio.flatten(1)
        torch.testing.assert_close(per_channel, per_channel[:, :1].expand_as(per_channel))
        assert len(torch.unique(per_channel[:, 0])) == 4


class LateNet(NoiseNet):
    """Builds its conv in ``configure_model``, which Lightning calls after the callbacks' ``setup``."""

    def __init__(self) -> None:
        super().__init__()
        del self.conv

    def configure_model(self) -> None:
        if not hasattr(self, "conv"):
            self.conv = nn.Conv2d(1, 4, 3, padding=1)


def test_layers_built_in_configure_model_get_noise(tmp_path):
    model = fit(tmp_path, NoiseInjection(scale=0.2), model=LateNet(), max_steps=2)
    assert [r["noisy"] for r in model.train_records] == [True, True]


class PairNet(NoiseNet):
    def __init__(self) -> None:
        super().__init__()
        self.pair = nn.LSTM(4, 4, batch_first=True)  # returns a tuple

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out, _ = self.pair(batch[0].flatten(2)[..., :4])
        return out.sum()


def test_non_tensor_output_error_names_the_module(tmp_path):
    with pytest.raises(
        MSRConfigurationError,
        match=r"expected the output of `pair` \(LSTM\) to be a floating-point "
        r"tensor of shape \(N, C, \.\.\.\), but got tuple",
    ):
        fit(tmp_path, NoiseInjection(module_types=["LSTM"]), model=PairNet())


def test_module_types_and_names_select_other_layers(tmp_path):
    class Net(NoiseNet):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))

    callback = NoiseInjection(module_types=["torch.nn.modules.linear.Linear"], module_names=["block.*"])
    seen = []

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(callback.hooked_modules)

    model = fit(tmp_path, callback, model=Net(), callbacks=[Spy()], max_steps=1)
    assert seen == [["block.0", "block.2"]]
    assert not any(r["noisy"] for r in model.train_records)  # the conv is not selected
    seen.clear()
    callback = NoiseInjection(module_types=["Module"], module_names=["conv", "head", "*"])
    fit(tmp_path, callback, model=Net(), callbacks=[Spy()], max_steps=1)
    assert seen == [["conv", "probe", "head", "block", "block.0", "block.1", "block.2"]]  # never the model itself


class MLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "model", "match"),
    [
        (
            {"module_names": ["encoder.*"]},
            NoiseNet,
            r"The `module_names` pattern 'encoder\.\*' selects no module of NoiseNet: it matches no module; module "
            r"names look like \['conv', 'probe', 'head'\]",
        ),
        (
            {"module_names": ["conv", "head"]},
            NoiseNet,
            r"The `module_names` pattern 'head' selects no module of NoiseNet: it matches only modules that are not "
            r"of `module_types` \[Conv1d, Conv2d, Conv3d\] or are excluded \(\['head'\]\)",
        ),
        ({"exclude": ["cnov"]}, NoiseNet, r"The `exclude` pattern 'cnov' matches no module of NoiseNet"),
        ({}, MLP, r"NoiseInjection found no module of type \[Conv1d, Conv2d, Conv3d\] to add noise to in MLP"),
        ({"exclude": ["conv", "probe"]}, NoiseNet, r"found no module of type"),
    ],
)
def test_setup_errors_name_the_pattern(tmp_path, kwargs, model, match):
    m = model()
    with pytest.raises(MSRConfigurationError, match=match):
        fit(tmp_path, NoiseInjection(**kwargs), model=m)
    assert not any(module._forward_hooks for module in m.modules())


def test_decay_schedule_needs_a_finite_training_length(tmp_path):
    callback = NoiseInjection(final_scale=0.0, schedule="linear")
    with pytest.raises(
        MSRConfigurationError,
        match=r"needs a finite training length, but the Trainer has "
        r"max_epochs=-1 and max_steps=-1",
    ):
        fit(tmp_path, callback, max_epochs=-1, max_steps=-1)

    class Stream(IterableDataset):
        def __iter__(self):
            yield from loader().dataset

    with pytest.raises(MSRConfigurationError, match=r"`trainer.estimated_stepping_batches` is -1"):
        fit(tmp_path, callback, train=DataLoader(Stream(), batch_size=8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": -0.1}, r"Expected `scale` to be in \[0, 1\], but got -0.1"),
        (
            {"scale": 1.5},
            r"Expected `scale` to be in \[0, 1\], but got 1.5\. A uniform factor .* use "
            r"distribution='gaussian'",
        ),
        ({"shift": -0.2}, r"Expected `shift` to be a finite non-negative number, but got -0.2"),
        ({"distribution": "laplace"}, r"Expected `distribution` to be one of 'uniform', 'gaussian', but got 'laplace'"),
        ({"schedule": "step"}, r"Expected `schedule` to be one of 'constant', 'linear', 'cosine', but got 'step'"),
        (
            {"final_scale": 0.0},
            r"Expected `final_scale` and `final_shift` to be unset with schedule='constant', "
            r"but got final_scale=0.0, final_shift=None\. Set `schedule`",
        ),
        ({"final_scale": 1.5, "schedule": "linear"}, r"Expected `final_scale` to be in \[0, 1\], but got 1.5"),
        ({"final_shift": -1.0, "schedule": "cosine"}, r"Expected `final_shift` to be a finite non-negative number"),
        (
            {"module_types": ["Conv9d"]},
            r"Expected every entry of `module_types` to name an `nn.Module` subclass, .* "
            r"but got 'Conv9d'",
        ),
        ({"module_types": ["no_such_package.Conv"]}, r"but got 'no_such_package.Conv'"),
        ({"module_types": ["torch.Tensor"]}, r"but got 'torch.Tensor'"),
        ({"module_types": []}, r"Expected `module_types` to be a non-empty list of module type names"),
        ({"module_names": [""]}, r"Expected `module_names` to be a list of module-name patterns"),
        ({"exclude": 3}, r"Expected `exclude` to be a list of module-name patterns"),
        ({"module_types": ["Module"]}, r"Expected `module_names` with module_types=\['Module'\]"),
        ({"seed": "abc"}, r"Expected `seed` to be an integer or None, but got 'abc'"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(MSRConfigurationError, match=match):
        NoiseInjection(**kwargs)


def test_gaussian_allows_a_scale_above_one_and_repr():
    assert repr(NoiseInjection(scale=2.0, distribution="gaussian", exclude=["head"], seed=3)) == (
        "NoiseInjection(scale=2.0, shift=0.0, distribution='gaussian', schedule='constant', "
        "module_types=['Conv1d', 'Conv2d', 'Conv3d'], exclude=['head'], seed=3)"
    )


def test_configurable_from_the_command_line():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(NoiseInjection, "noise")
    config = parser.parse_args(
        [
            "--noise.scale=0.15",
            "--noise.shift=0.1",
            "--noise.schedule=cosine",
            "--noise.final_scale=0",
            "--noise.module_names=[layer*, stem]",
            "--noise.distribution=gaussian",
        ]
    )
    callback = parser.instantiate_classes(config).noise
    assert isinstance(callback, NoiseInjection)
    assert repr(callback) == (
        "NoiseInjection(scale=0.15, shift=0.1, distribution='gaussian', final_scale=0.0, final_shift=0.1, "
        "schedule='cosine', module_types=['Conv1d', 'Conv2d', 'Conv3d'], module_names=['layer*', 'stem'])"
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--noise.distribution=laplace"])


def test_barebones_trainer_gets_noise_without_logging_warnings(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fit(tmp_path, NoiseInjection(scale=0.2, shift=0.1), barebones=True, max_steps=2)
    assert [r["noisy"] for r in model.train_records] == [True, True]
    assert not [w for w in caught if "self.log" in str(w.message)]


# ---------------------------------------------------------------- what a new user runs into (issue 16)


def test_two_callbacks_on_the_same_modules_are_refused(tmp_path):
    model = NoiseNet()
    first, second = NoiseInjection(scale=0.1), NoiseInjection(scale=0.2, module_names=["conv"])
    with pytest.raises(
        MSRConfigurationError,
        match=r"Two NoiseInjection callbacks act on the same 1 module\(s\) \('conv'\): NoiseInjection\(scale=0.1, .*\) "
        r"and NoiseInjection\(scale=0.2, .*module_names=\['conv'\]\)\. .*`exclude` \(or `module_names`\)",
    ):
        fit(tmp_path, callbacks=[first, second], model=model, max_steps=1)
    assert not any(module._forward_hooks for module in model.modules())  # nothing left hooked


def test_two_callbacks_on_disjoint_modules_both_act(tmp_path):
    conv_noise, probe_noise = NoiseInjection(scale=0.1, exclude=["probe"]), NoiseInjection(module_names=["probe"])
    model = fit(tmp_path, callbacks=[conv_noise, probe_noise], max_steps=2)
    # the conv has one noise hook (not two), and the probe gets noise from the second callback
    assert all(record["noisy"] and record["hooks"] == 1 for record in model.train_records)
    assert all(not torch.all(probe == 1.0) for probe in model.noise)


def test_noise_levels_accept_any_real_number():
    import numpy as np

    noise = NoiseInjection(scale=np.float32(0.25), shift=torch.tensor(0.5), seed=np.int64(7))
    assert (noise.current_scale, noise.current_shift) == (0.25, 0.5)
    assert "seed=7" in repr(noise)
    with pytest.raises(MSRConfigurationError, match=r"Expected `scale` to be a number in \[0, 1\], but got True"):
        NoiseInjection(scale=True)
