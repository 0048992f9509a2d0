"""LightningCLI: lightning_msr's callbacks and strategy switched on from flags and YAML (examples/digits/main.py)."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the examples are not installed: import them from the repository
    sys.path.insert(0, str(ROOT))

from helpers import DEFAULT_MODE  # noqa: E402

import lightning_msr  # noqa: E402
from examples.digits.main import cli_main  # noqa: E402
from lightning_msr.functional import eligible_weights, mean_shift  # noqa: E402

DIGITS = ROOT / "examples" / "digits"

MSR_FLAGS = [
    "--trainer.callbacks+=lightning_msr.MeanShiftRejection",
    "--trainer.callbacks.alpha=1.0",
    "--trainer.callbacks.batchnorm=error",
    "--trainer.callbacks.keep_magnitude=true",
    "--trainer.callbacks+=lightning_msr.NoiseInjection",
    "--trainer.callbacks.scale=0.15",
    "--trainer.callbacks.shift=0.05",
]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when `args` is given while sys.argv holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["main.py"])


def _quick(tmp_path: Path) -> list[str]:
    """Flags that make a fit take a few seconds: a small training subset, one epoch, nothing written but tmp."""
    return [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.max_train_samples=64",
        "--data.batch_size=8",
        "--model.width=8",
    ]


def _worst_mean_shift(model: torch.nn.Module) -> float:
    return max(float(mean_shift(w.parameter, mode=DEFAULT_MODE, **w.layout_kwargs())) for w in eligible_weights(model))


def test_print_config_shows_callbacks_with_their_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--model.norm=affine", *MSR_FLAGS, "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    callbacks = config["trainer"]["callbacks"]
    assert [c["class_path"] for c in callbacks] == ["lightning_msr.MeanShiftRejection", "lightning_msr.NoiseInjection"]
    msr, noise = (c["init_args"] for c in callbacks)
    # the flags, and every other constructor argument with its default
    assert msr["alpha"] == 1.0 and msr["batchnorm"] == "error" and msr["keep_magnitude"] is True
    assert noise["scale"] == 0.15 and noise["shift"] == 0.05
    for init_args, cls, flags in (
        (msr, lightning_msr.MeanShiftRejection, {"alpha", "batchnorm", "keep_magnitude"}),
        (noise, lightning_msr.NoiseInjection, {"scale", "shift"}),
    ):
        parameters = inspect.signature(cls).parameters
        assert set(init_args) == set(parameters)
        assert all(init_args[name] == parameters[name].default for name in set(parameters) - flags)
    assert config["model"]["norm"] == "affine"


def test_fit_from_flags_alone(tmp_path):
    # the paper's plain draw (no calibration, no clipping) keeps init_magnitude's norm, which the test checks
    paper = [*MSR_FLAGS[:4], "--trainer.callbacks.calibrate=false", "--trainer.callbacks.adaptive_clip=null"]
    paper += MSR_FLAGS[4:]
    cli = cli_main(["fit", "--model.norm=affine", "--trainer.logger=false", *_quick(tmp_path), *paper])
    trainer, model = cli.trainer, cli.model
    assert trainer.state.finished
    assert trainer.global_step == 64 // 8
    msr = next(c for c in trainer.callbacks if isinstance(c, lightning_msr.MeanShiftRejection))
    noise = next(c for c in trainer.callbacks if isinstance(c, lightning_msr.NoiseInjection))
    assert msr.alpha == 1.0 and "keep_magnitude=True" in repr(msr) and "scale=0.15" in repr(noise)
    assert "calibrate=False" in repr(msr) and "adaptive_clip=None" in repr(msr)
    # MSR really ran: every kernel was re-drawn zero-mean and stayed there through 8 SGD steps
    assert len(msr.weights) == 4
    assert _worst_mean_shift(model) < 1e-5
    # ... and kept its filter norm (init_magnitude's default, 1.0) through them: keep_magnitude came through
    for w in msr.weights:
        norms = w.parameter.detach().flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-5, atol=0)
    assert "val_acc" in trainer.callback_metrics


def test_fit_without_msr_leaves_kernels_alone(tmp_path):
    """The control for the test above: the same run without the callbacks keeps PyTorch's default kernels."""
    cli = cli_main(["fit", "--model.norm=affine", "--trainer.logger=false", *_quick(tmp_path)])
    assert cli.trainer.global_step == 64 // 8
    assert _worst_mean_shift(cli.model) > 1e-2


@pytest.mark.parametrize("config", ["config_msr.yaml", "config_batchnorm.yaml"])
def test_yaml_config(tmp_path, config):
    args = [
        "fit",
        f"--config={DIGITS / config}",
        *_quick(tmp_path),
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    cli = cli_main(args)
    trainer = cli.trainer
    assert trainer.state.finished and trainer.global_step == 64 // 8
    has_msr = any(isinstance(c, lightning_msr.MeanShiftRejection) for c in trainer.callbacks)
    has_noise = any(isinstance(c, lightning_msr.NoiseInjection) for c in trainer.callbacks)
    batchnorms = [m for m in cli.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if config == "config_msr.yaml":
        assert has_msr and has_noise and not batchnorms
        assert _worst_mean_shift(cli.model) < 1e-5
    else:
        assert not has_msr and not has_noise and len(batchnorms) == 4
    # the config's ModelCheckpoint and CSV logger did their work under tmp_path
    assert list(tmp_path.rglob("*.ckpt"))
    assert list(tmp_path.rglob("metrics.csv"))


@pytest.mark.parametrize(
    ("flag", "named"),
    [
        ("--trainer.callbacks.alpha=abc", "alpha"),
        ("--trainer.callbacks.init=random", "init"),
        ("--trainer.callbacks.include_linear=maybe", "include_linear"),
    ],
)
def test_bad_flag_value_is_a_parser_error_naming_the_argument(capsys, flag, named):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--trainer.callbacks+=lightning_msr.MeanShiftRejection", flag])
    assert exit_info.value.code == 2  # argparse's usage error
    err = capsys.readouterr().err
    assert "error:" in err
    assert f'Parser key "{named}"' in err
    assert flag.split("=")[1] in err


def test_bad_model_flag_is_a_parser_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--model.norm=layernorm"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "norm" in err and "layernorm" in err


@pytest.mark.parametrize(
    ("callback", "flag", "named", "restriction"),
    [
        ("MeanShiftRejection", "--trainer.callbacks.alpha=2", "alpha", "v>=0 and v<=1"),
        ("MeanShiftRejection", "--trainer.callbacks.alpha=-0.5", "alpha", "v>=0 and v<=1"),
        ("MeanShiftRejection", "--trainer.callbacks.init_magnitude=0", "init_magnitude", "v>0"),
        ("NoiseInjection", "--trainer.callbacks.scale=-0.1", "scale", "v>=0"),
        ("NoiseInjection", "--trainer.callbacks.final_shift=-1", "final_shift", "v>=0"),
        ("DeepControl", "--trainer.callbacks.beta_init=5", "beta_init", "v>=0 and v<=1"),
    ],
)
def test_out_of_range_flag_value_is_a_parser_error_naming_the_argument(capsys, callback, flag, named, restriction):
    """Range-typed constructor arguments: LightningCLI refuses the value while parsing (usage error, exit 2)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", f"--trainer.callbacks+=lightning_msr.{callback}", flag])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f'Parser key "{named}"' in err
    assert f"does not conform to restriction {restriction}" in err and flag.split("=")[1] in err
    assert "Traceback" not in err


def test_in_range_values_of_every_type_reach_the_callbacks(tmp_path):
    cli = cli_main(
        [
            "--trainer.callbacks+=lightning_msr.MeanShiftRejection",
            "--trainer.callbacks.alpha=1",  # an int where a float in [0, 1] is expected
            "--trainer.callbacks.init_magnitude=1.414",
            "--trainer.callbacks+=lightning_msr.NoiseInjection",
            "--trainer.callbacks.scale=0.2",
            "--trainer.callbacks.final_scale=0",
            "--trainer.callbacks.schedule=cosine",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    msr, noise = (c for c in cli.trainer.callbacks if type(c).__module__.startswith("lightning_msr"))
    assert type(msr.alpha) is float and msr.alpha == 1.0 and "init_magnitude=1.414" in repr(msr)
    assert "scale=0.2" in repr(noise) and "final_scale=0.0" in repr(noise)


def test_checks_that_depend_on_several_arguments_run_when_the_callback_is_built():
    # each value is in range on its own; together they are not: the callback's own check names them
    with pytest.raises(ValueError, match=r"Expected `scale` to be in \[0, 1\], but got 1.5"):
        cli_main(["fit", "--trainer.callbacks+=lightning_msr.NoiseInjection", "--trainer.callbacks.scale=1.5"])
    with pytest.raises(ValueError, match=r"'backward' with alpha=0.5"):
        cli_main(
            [
                "fit",
                "--trainer.callbacks+=lightning_msr.MeanShiftRejection",
                "--trainer.callbacks.alpha=0.5",
                "--trainer.callbacks.projection_timing=backward",
            ]
        )


def test_fit_help_lists_the_callbacks_and_their_argument_types(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--help"])
    assert exit_info.value.code in (0, None)
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in ("lightning_msr.DeepControl", "lightning_msr.MeanShiftRejection", "lightning_msr.NoiseInjection"):
        assert name in out
    with pytest.raises(SystemExit):
        cli_main(["fit", "--trainer.callbacks.help", "lightning_msr.MeanShiftRejection"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--trainer.callbacks.alpha ALPHA" in out and "type: ClosedUnitInterval, default: 1.0" in out
    assert "type: PositiveFloat, default: 1.0" in out


@pytest.mark.parametrize(
    ("flags", "broadcast_buffers"),
    [
        (["--trainer.strategy=ddp_msr"], False),
        (["--trainer.strategy.class_path=lightning_msr.MSRDDPStrategy"], False),
        (
            [
                "--trainer.strategy.class_path=lightning_msr.MSRDDPStrategy",
                "--trainer.strategy.init_args.broadcast_buffers=true",
            ],
            True,
        ),
    ],
    ids=["name", "class_path", "class_path-init_args"],
)
def test_ddp_msr_strategy_from_flags(tmp_path, flags, broadcast_buffers):
    """`--trainer.strategy` alone takes a registered name (`ddp_msr`); a class path goes in `.class_path`."""
    cli = cli_main(
        [
            *flags,
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert isinstance(cli.trainer.strategy, lightning_msr.MSRDDPStrategy)
    assert cli.trainer.strategy.broadcast_buffers is broadcast_buffers


def test_script_runs_from_any_directory(tmp_path):
    """`python examples/digits/main.py` works as a script, from outside the repository too."""
    proc = subprocess.run(
        [sys.executable, str(DIGITS / "main.py"), "fit", f"--config={DIGITS / 'config_msr.yaml'}", "--print_config"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = yaml.safe_load(proc.stdout)
    assert config["trainer"]["callbacks"][0]["class_path"] == "lightning_msr.MeanShiftRejection"
