"""Smoke runs of the speed benchmarks on tiny settings: each script runs end to end and writes its table.

The numbers themselves are benchmarks, not tests (see docs/benchmarks/); these tests only show the scripts work.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str, timeout: int = 600) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=BENCH.parent,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_overhead_tiny_reports_ratios():
    sys.path.insert(0, str(BENCH))
    try:
        from overhead import main
    finally:
        sys.path.remove(str(BENCH))
    result = main(["--tiny"])
    for key in ("wall_ratio", "cpu_ratio", "cpu_ratio_optimizer_step", "cpu_ratio_keep_magnitude"):
        assert 0.2 < result[key] < 5.0, (key, result[key])
    assert result["projection_cpu_ms[lightning_msr]"] > 0


def test_noise_tiny_writes_table(tmp_path):
    target = tmp_path / "noise.md"
    out = _run("noise.py", "--tiny", "--out", str(target))
    assert "ratio" in out.lower()
    assert target.read_text().count("|") > 10


def test_surgery_small_writes_table_and_csv(tmp_path):
    _run("surgery.py", "--batch", "2", "--size", "32", "--repeats", "2", "--warmup", "1", "--out", str(tmp_path))
    rows = list(csv.DictReader(open(tmp_path / "surgery.csv")))
    assert {r["variant"] for r in rows} >= {"batchnorm", "affine", "agc", "identity"}
    assert (tmp_path / "surgery.md").read_text().count("|") > 10


@pytest.mark.ddp
def test_ddp_tiny_counts_collectives(tmp_path):
    _run(
        "ddp.py", "--rounds", "1", "--steps", "2", "--warmup", "1", "--batch-size", "2", "--size", "16",
        "--width", "8", "--out", str(tmp_path / "ddp.md"),
    )
    text = (tmp_path / "ddp.md").read_text()
    assert (tmp_path / "ddp.csv").exists()
    assert "ddp_msr" in text and "collectives" in text


def test_speed_tiny_two_models_budget_and_floor(tmp_path):
    _run(
        "speed.py", "--tiny", "--out", str(tmp_path), "--models", "resnet18", "mobilenet_v2",
        "--methods", "batchnorm", "msr", "msr_affine", "agc", "no_norm", "--budget-methods", "batchnorm", "msr",
    )  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "speed.csv")))
    assert {(r["model"], r["method"]) for r in rows} == {
        (model, method)
        for model in ("resnet18", "mobilenet_v2")
        for method in ("batchnorm", "msr", "msr_affine", "agc", "no_norm")
    }
    for model in ("resnet18", "mobilenet_v2"):
        saved = {r["method"]: int(r["saved_bytes"]) for r in rows if r["model"] == model}
        # folding the scale into the conv saves what deleting BatchNorm saves; the separate layer does not
        assert saved["no_norm"] <= saved["msr"] <= 1.02 * saved["no_norm"] < saved["msr_affine"] <= saved["batchnorm"]
        assert saved["msr"] < saved["agc"] < saved["msr_affine"]
    budget = list(csv.DictReader(open(tmp_path / "speed_budget.csv")))
    assert {r["method"] for r in budget} == {"batchnorm", "msr"}
    assert all(float(r["peak_rss_mib"]) > float(r["baseline_rss_mib"]) > 0 for r in budget)
    text = (tmp_path / "speed.md").read_text()
    assert "## mobilenet_v2" in text and "largest batch within budget" in text
    assert (tmp_path / "speed_budget.png").stat().st_size > 0
