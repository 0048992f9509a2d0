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
    for model in ("resnet18", "mobilenet_v2"):
        for config in ("default", "eager", "projection", "backward", "keep_magnitude", "keep_magnitude_eager"):
            for clock in ("wall_ratio", "cpu_ratio"):
                key = f"{clock}[{model},{config}]"
                assert 0.0 < result[key] < 20.0, (key, result[key])  # tiny runs on a shared machine are noisy
        assert result[f"projection_cpu_ms[{model},projection (lightning_msr)]"] > 0
        fused = ("default", "keep_magnitude") if "compile_seconds" in result else ()
        for config in ("eager", *fused):  # the callback's work alone, relative to the step without it
            assert 0.5 < result[f"work_ratio[{model},{config}]"] < 20.0


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
    # the scale projection: measured inputs, the model's rows for 8, 64 and 512 GPUs, and its plot
    assert "latency-bandwidth projection" in text and "projected by the model, not measured" in text
    assert (tmp_path / "ddp_scale.png").stat().st_size > 0
    rows = list(csv.DictReader(open(tmp_path / "ddp_scale.csv")))
    assert {(r["config"], r["gpus"]) for r in rows} == {(c, g) for c in "ac" for g in ("8", "64", "512")}
    by = {(r["config"], r["gpus"]): r for r in rows}
    for gpus in ("8", "64", "512"):
        # SyncBatchNorm's blocking collectives: measured per layer, so more of them than ddp_msr's one flag
        assert float(by["a", gpus]["blocking_ms"]) > 10 * float(by["c", gpus]["blocking_ms"]) > 0
    sync = [float(by["a", gpus]["blocking_ms"]) for gpus in ("8", "64", "512")]
    assert sync == sorted(sync) and sync[0] < sync[2]  # more nodes, more network steps per collective


def _ddp_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddp_benchmark", BENCH / "ddp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ddp_alpha_beta_model_of_hierarchical_ring_allreduce():
    ddp = _ddp_benchmark()
    a = {**ddp.SCALE_ASSUMPTIONS, "base_latency_us": 0.0}
    us, nbytes = 1e-6, 8e6
    nvlink, ib = a["nvlink_GBps"] * 1e9, a["infiniband_GBps"] * 1e9
    assert ddp.allreduce_seconds(nbytes, 1, a) == 0.0
    # one node of 8: a plain ring over NVLink, 2(p-1) steps, 2(p-1)/p of the bytes
    ring8 = 14 * a["nvlink_step_latency_us"] * us + 14 / 8 * nbytes / nvlink
    assert ddp.allreduce_seconds(nbytes, 8, a) == pytest.approx(ring8)
    # 64 GPUs = 8 nodes of 8: the node ring, plus a ring over the 8 nodes of each GPU's 1/8 shard over InfiniBand
    inter = 14 * a["network_step_latency_us"] * us + 14 / 8 * (nbytes / 8) / ib
    assert ddp.allreduce_seconds(nbytes, 64, a) == pytest.approx(ring8 + inter)


def test_ddp_projection_exposes_blocking_collectives_and_hides_overlapped_buckets():
    ddp = _ddp_benchmark()
    measured = {
        "compute_s": 0.010,
        "backward_compute_s": 0.006,
        "calls": [["all_reduce", 1024, "forward", False], ["all_reduce", 4_000_000, "backward", True]],
    }
    row = ddp.project_step(measured, 64)
    blocking = ddp.allreduce_seconds(1024, 64)
    bucket = ddp.allreduce_seconds(4_000_000, 64)
    assert row["blocking_ms"] == pytest.approx(1e3 * blocking)
    # a single bucket is the last one: exposed whole, however long the backward pass
    assert row["gradient_exposed_ms"] == pytest.approx(1e3 * bucket)
    assert row["step_ms"] == pytest.approx(1e3 * (0.010 + blocking + bucket))
    assert row["waiting"] == pytest.approx((blocking + bucket) / (0.010 + blocking + bucket))
    # several buckets: all but what fits under the backward compute is hidden
    many = {**measured, "calls": [["all_reduce", 4_000_000, "backward", True]] * 4}
    row = ddp.project_step(many, 64)
    assert row["gradient_exposed_ms"] == pytest.approx(1e3 * max(bucket, 4 * bucket - 0.006))


def test_speed_tiny_two_models_budget_and_floor(tmp_path):
    _run(
        "speed.py", "--tiny", "--out", str(tmp_path), "--models", "resnet18", "mobilenet_v2",
        "--methods", "batchnorm", "msr", "msr_affine", "agc", "no_norm", "groupnorm", "frn",
        "--budget-methods", "batchnorm", "msr",
    )  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "speed.csv")))
    assert {(r["model"], r["method"]) for r in rows} == {
        (model, method)
        for model in ("resnet18", "mobilenet_v2")
        for method in ("batchnorm", "msr", "msr_affine", "agc", "no_norm", "groupnorm", "frn")
    }
    for model in ("resnet18", "mobilenet_v2"):
        saved = {r["method"]: int(r["saved_bytes"]) for r in rows if r["model"] == model}
        # folding the scale into the conv saves what deleting BatchNorm saves; the separate layer does not
        assert saved["no_norm"] <= saved["msr"] <= 1.02 * saved["no_norm"] < saved["msr_affine"] <= saved["batchnorm"]
        assert saved["msr"] < saved["agc"] < saved["msr_affine"]
        # the per-sample peers keep their input for backward, as BatchNorm does
        assert saved["msr"] < 0.8 * saved["groupnorm"] and saved["msr"] < 0.8 * saved["frn"]
    budget = list(csv.DictReader(open(tmp_path / "speed_budget.csv")))
    assert {r["method"] for r in budget} == {"batchnorm", "msr"}
    assert all(float(r["peak_rss_mib"]) > float(r["baseline_rss_mib"]) > 0 for r in budget)
    text = (tmp_path / "speed.md").read_text()
    assert "## mobilenet_v2" in text and "largest batch within budget" in text
    assert (tmp_path / "speed_budget.png").stat().st_size > 0


def test_grouped_per_step_work_adds_as_many_operator_calls_whatever_the_depth():
    """The grouped path (KernelBank) adds a constant number of operator calls per step: resnet18 and resnet34 (twice
    the weights) get the same count, where the per-weight path's grows with them."""
    sys.path.insert(0, str(BENCH))
    try:
        from op_count import measure
    finally:
        sys.path.remove(str(BENCH))
    added = {}
    for name in ("resnet18", "resnet34"):
        base = measure(name, None, size=16, batch=2, steps=1)["calls"]
        for path in ("eager", "grouped"):
            added[name, path] = measure(name, path, size=16, batch=2, steps=1)["calls"] - base
    assert added["resnet18", "grouped"] == added["resnet34", "grouped"] < 40  # a few dozen at most
    assert added["resnet34", "eager"] > 1.5 * added["resnet18", "eager"] > 3 * added["resnet18", "grouped"]


def test_gpu_benchmark_runs_on_the_cpu_quick(tmp_path):
    out = _run("gpu.py", "--device", "cpu", "--quick", "--out", str(tmp_path))
    assert "wrote" in out
    text = (tmp_path / "gpu.md").read_text()
    for method in ("batchnorm", "msr", "deep_control", "deleted", "groupnorm"):
        assert f"| {method} |" in text
    assert "the engine's added time per step" in text and "largest batch" in text
    assert (tmp_path / "gpu.png").stat().st_size > 1000


def test_gpu_benchmark_reports_a_configuration_out_of_memory_and_goes_on(tmp_path, monkeypatch):
    """A GPU too small for one configuration (resnet50 at batch 256 needs more than 16 GiB) still gets the rest."""
    import importlib

    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    gpu = importlib.import_module("gpu")
    measure = gpu.measure

    def measure_or_run_out(name, method, batch, args, device):
        if batch == 4 and method in ("groupnorm", "msr_alone"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return measure(name, method, batch, args, device)

    monkeypatch.setattr(gpu, "measure", measure_or_run_out)
    monkeypatch.setattr(gpu, "plot", lambda *args: None)
    assert gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "gpu.md").read_text()
    assert "| mobilenet_v2 | 4 | groupnorm | out of memory |" in text
    assert "| mobilenet_v2 | 4 | out of memory | - |" in text  # the engine's time needs msr_alone
    assert "| mobilenet_v2 | 2 | groupnorm | " in text and "| mobilenet_v2 | 4 | batchnorm | " in text
    assert gpu._ratio(None, 2.0) != gpu._ratio(None, 2.0)  # NaN: no bar in the plot


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present: the benchmark would run")
def test_gpu_benchmark_says_when_no_gpu_is_present():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu.py")], capture_output=True, text=True, timeout=300, cwd=BENCH.parent
    )
    assert proc.returncode == 2
    assert "no CUDA GPU is present" in proc.stdout
