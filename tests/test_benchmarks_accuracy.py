"""The benchmark scripts run end to end on a tiny setting and write what they promise (not the full sweeps)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_accuracy_tiny_writes_outputs_and_resumes(tmp_path):
    base = [
        "--tiny",
        "--out",
        str(tmp_path),
        "--no-progress-bar",
        "--dataset",
        "digits",
        "shapes",
        "--methods",
        "batchnorm",
        "msr_affine[init_magnitude=1.5]",
        "--batch-sizes",
        "2",
        "16",
        "--lrs",
        "0.05",
    ]
    out = _run("accuracy.py", *base, "--seeds", "0")
    assert "8 to run" in out
    rows = _rows(tmp_path / "accuracy.csv")
    assert len(rows) == 2 * 2 * 2  # datasets x methods x batch sizes
    assert {r["method"] for r in rows} == {"batchnorm", "msr_affine[init_magnitude=1.5]"}
    assert {int(r["batch_size"]) for r in rows} == {2, 16}
    for r in rows:
        assert 0.0 <= float(r["test_acc"]) <= 1.0
        assert int(r["steps"]) > 0
        # the MSR variant has no normalisation layer anywhere; the BatchNorm baseline has
        assert int(r["norm_layers"]) == (r["method"] == "batchnorm")
        assert ("MeanShiftRejection" in r["callbacks"]) == r["method"].startswith("msr")
    # the learning rate is given for batch 32 and scaled by sqrt(batch / 32)
    assert {float(r["lr"]) for r in rows if r["batch_size"] == "2"} == {0.0125}
    for name in ("accuracy.md", "accuracy_vs_batch.png", "accuracy_vs_lr.png"):
        assert (tmp_path / name).stat().st_size > 0
    md = (tmp_path / "accuracy.md").read_text()
    assert "## digits" in md and "## shapes" in md and "`msr_affine[init_magnitude=1.5]`" in md and "±" in md

    # resumable: the same command runs nothing; adding a seed runs only the new configurations
    assert "0 to run" in _run("accuracy.py", *base, "--seeds", "0", "--no-report")
    assert len(_rows(tmp_path / "accuracy.csv")) == 8
    out = _run("accuracy.py", *base, "--seeds", "0", "1", "--no-report")
    assert "8 already in" in out and "8 to run" in out
    rows = _rows(tmp_path / "accuracy.csv")
    assert len(rows) == 16 and {r["seed"] for r in rows} == {"0", "1"}


def test_accuracy_rejects_unknown_method(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "accuracy.py"), "--tiny", "--out", str(tmp_path), "--methods", "layernorm"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode != 0 and "Expected a method in" in proc.stderr
    assert not (tmp_path / "accuracy.csv").exists()


def test_speed_tiny_writes_ratios(tmp_path):
    _run("speed.py", "--tiny", "--out", str(tmp_path), "--methods", "batchnorm", "msr")
    rows = {r["method"]: r for r in _rows(tmp_path / "speed.csv")}
    assert set(rows) == {"batchnorm", "msr"}
    assert float(rows["batchnorm"]["step_ratio"]) == pytest.approx(1.0)
    assert float(rows["batchnorm"]["saved_ratio"]) == pytest.approx(1.0)
    for r in rows.values():
        assert float(r["step_ms"]) > 0 and int(r["saved_bytes"]) > 0
    # MSR swaps BatchNorm for a per-channel affine: it must not save more activations than BatchNorm
    assert int(rows["msr"]["saved_bytes"]) <= int(rows["batchnorm"]["saved_bytes"])
    assert (tmp_path / "speed.md").read_text().count("| `") == 2
    assert (tmp_path / "speed.png").stat().st_size > 0


def test_saved_activation_bytes_counts_unique_storages():
    import torch

    sys.path.insert(0, str(BENCH))
    from speed import saved_activation_bytes

    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(16, 64)

    def fn():
        h = x @ w  # saves x (4 KiB) and w (a parameter, excluded)
        (h * h).sum()  # saves h once (4 KiB) though it is used twice

    assert saved_activation_bytes(fn, [w]) == 2 * 16 * 64 * 4


def test_accuracy_method_options_reach_the_run():
    """The ablation's options change what is trained: callback arguments, data-dependent scaling, param groups."""
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        from _accuracy_models import build, load_digits_task, parse_method
        from accuracy import Classifier
    finally:
        sys.path.remove(str(BENCH))
    from lightning_msr import MeanShiftRejection
    from lightning_msr.functional import mean_shift

    task = load_digits_task(max_train=256)
    spec = parse_method("msr[init_magnitude=1.414,keep_magnitude=true,clip=0.3,conv_lr=6,lsuv=1]")
    model, callbacks, overrides = build(spec, task, seed=0)
    (msr,) = callbacks
    assert isinstance(msr, MeanShiftRejection) and "keep_magnitude=True" in repr(msr)
    assert overrides == {"clip": 0.3, "conv_lr": 6.0}
    # lsuv: zero-mean kernels whose outputs have unit RMS on the training images, layer by layer
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    outputs = []
    handles = [c.register_forward_hook(lambda m, i, o: outputs.append(o)) for c in convs]
    with torch.no_grad():
        model(task.x_train)
    for h in handles:
        h.remove()
    for conv, out in zip(convs, outputs):
        assert float(mean_shift(conv.weight)) < 1e-5
        assert float(out.pow(2).mean().sqrt()) == pytest.approx(1.0, rel=0.15)
    opt = Classifier(model, lr=0.1, total_steps=10, conv_lr=6.0).configure_optimizers()["optimizer"]
    lrs = {len(g["params"]): g["lr"] for g in opt.param_groups}
    assert lrs == {len(convs): pytest.approx(0.6), sum(1 for _ in model.parameters()) - len(convs): 0.1}
    with pytest.raises(ValueError, match="Expected `keep_magnitude` to be one of"):
        parse_method("msr[keep_magnitude=maybe]")
