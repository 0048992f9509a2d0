"""One command for a GPU: BatchNorm against Mean Shift Rejection and its peers, side by side in one process.

On ``resnet50`` and ``mobilenet_v2`` (torchvision, 224x224, ``bf16-mixed`` autocast, SGD with momentum) at batch 32
and 256, for each of

* ``batchnorm`` -- the model as built;
* ``msr`` -- ``MSREngine(model, optimizer, batchnorm="replace")`` + ``NoiseEngine(model)`` (what the callbacks do);
* ``deep_control`` -- ``DeepControlEngine`` + ``MSREngine``;
* ``deleted`` -- every BatchNorm deleted (``replace_batchnorm(model, "identity")``): the floor of a BN-free model;
* ``groupnorm`` -- every BatchNorm replaced by ``GroupNorm`` (groups of up to 32), the small-batch peer;

it measures the median step time (CUDA events, warm-up excluded), the peak memory
(``torch.cuda.max_memory_allocated``), the engine's added time per step (``msr`` without noise against the same
converted model trained without the engine), and the largest batch that fits a memory budget (``--budget-gib``,
from the peaks at the two batch sizes, which grow linearly with the batch). It prints the ratios to BatchNorm and
writes ``docs/benchmarks/gpu.md`` and ``gpu.png``. About 3 minutes on one recent GPU.

Without a GPU it says so and stops, unless asked for the CPU: ``--device cpu --quick`` runs the same code on tiny
inputs in seconds (the test suite does, so the script cannot rot); its numbers say nothing about GPUs.

Usage::

    python benchmarks/gpu.py                              # on the first CUDA GPU
    python benchmarks/gpu.py --device cpu --quick --out /tmp/gpu
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torchvision
from torch import nn

from lightning_msr import DeepControlEngine, MSREngine, NoiseEngine, replace_batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _accuracy_models import swap_batchnorm

METHODS = ("batchnorm", "msr", "deep_control", "deleted", "groupnorm")
# not reported as a method: the converted model without the engine, the reference of the engine's added time
REFERENCE = "converted"


def build(name: str, method: str, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer, list[Any]]:
    """The model, its optimizer and the engines of ``method`` (kept alive while the model trains)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=1000).to(device)  # ImageNet's head
    if method == "groupnorm":
        swap_batchnorm(model, "gn")
    if method == "deleted":
        replace_batchnorm(model, "identity")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)
    engines: list[Any] = []
    if method == REFERENCE:
        replace_batchnorm(model, "fold", optimizers=[optimizer])
    elif method in ("msr", "msr_alone"):
        engines.append(MSREngine(model, optimizer, batchnorm="replace", calibration_samples=1))
        if method == "msr":
            engines.append(NoiseEngine(model))
    elif method == "deep_control":
        engines.append(DeepControlEngine(model, optimizer))
        engines.append(MSREngine(model, optimizer, calibration_samples=1))
    return model, optimizer, engines


class Clock:
    """CUDA events on a GPU (the device's time, not the host's), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, fn: Callable[[], None]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return 1000 * (time.perf_counter() - start)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end)


def measure(
    name: str, method: str, batch: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Optional[float]]:
    model, optimizer, engines = build(name, method, device)
    x = torch.randn(batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    bf16 = args.precision == "bf16-mixed"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> None:
        optimizer.zero_grad()
        with autocast:
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    clock = Clock(device)
    for _ in range(args.warmup):  # the calibration, the caches, cuDNN's algorithm search
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    times = [clock.time(step) for _ in range(args.steps)]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    for engine in engines:
        engine.detach()
    return {"ms": statistics.median(times), "peak_mib": peak}


def _free(device: torch.device) -> None:
    """Once a configuration's model, optimizer and batch are out of scope: give their memory back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def largest_batch(peaks: dict[int, Optional[float]], budget_mib: float) -> Optional[int]:
    """The largest batch whose peak fits ``budget_mib``, from the peaks at two batch sizes (linear in the batch)."""
    (b1, p1), (b2, p2) = sorted(peaks.items())[:1] + sorted(peaks.items())[-1:]
    if p1 is None or p2 is None or b1 == b2 or p2 <= p1:
        return None
    per_sample = (p2 - p1) / (b2 - b1)
    fixed = p1 - per_sample * b1
    return max(0, int((budget_mib - fixed) / per_sample))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="'cuda' (default), 'cuda:1', or 'cpu' (with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny inputs and steps: seconds, for the test suite")
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 256])
    parser.add_argument("--precision", choices=["bf16-mixed", "32"], default="bf16-mixed")
    parser.add_argument("--budget-gib", type=float, default=16.0, help="memory budget for the largest batch")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py: no CUDA GPU is present on this machine (torch.cuda.is_available() is False), so "
            "there is nothing to measure. Run it on a machine with a GPU, or `--device cpu --quick` to check that "
            "the script works (its CPU numbers say nothing about GPUs)."
        )
        return 2
    if device.type == "cpu" and not args.quick:
        print("benchmarks/gpu.py: --device cpu is for checking the script; pass --quick too.")
        return 2
    args.size, args.warmup, args.steps = (32, 1, 2) if args.quick else (224, 5, 20)
    if args.quick:
        args.models, args.batch_sizes = ["resnet18", "mobilenet_v2"], [2, 4]
        if device.type == "cpu":
            args.precision = "32"  # bfloat16 autocast is slow on most CPUs, and this run only checks the script
    started = time.perf_counter()
    rows = []
    for name in args.models:
        for batch in args.batch_sizes:
            for method in (*METHODS, REFERENCE, "msr_alone"):
                try:
                    result = measure(name, method, batch, args, device)
                except torch.OutOfMemoryError:  # e.g. resnet50 at batch 256 on a 16 GiB GPU: reported, not fatal
                    result = {"ms": None, "peak_mib": None}
                _free(device)
                rows.append({"model": name, "batch": batch, "method": method, **result})
                print(rows[-1], flush=True)
    seconds = time.perf_counter() - started
    text = report(rows, args, device, seconds)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.md").write_text(text)
    plot(rows, args, args.out / "gpu.png")
    print(f"wrote {args.out / 'gpu.md'} and gpu.png ({seconds:.0f} s)")
    return 0


def report(rows: list[dict], args: argparse.Namespace, device: torch.device, seconds: float) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (a check of the script, not a GPU)"
    by = {(r["model"], r["batch"], r["method"]): r for r in rows}
    lines = [
        "# BatchNorm, Mean Shift Rejection and their peers on a GPU",
        "",
        f"Produced by `python benchmarks/gpu.py` on **{name}** in {seconds:.0f} s: {args.size}x{args.size} inputs, "
        f"{args.precision}, SGD with momentum, {args.steps} timed steps after {args.warmup} warm-up steps (medians). "
        "Ratios are to BatchNorm's. The engine's added time is `MSREngine` alone against the same converted "
        "model trained without it.",
        "",
        "| model | batch | method | step ms | step / BatchNorm's | peak MiB | peak / BatchNorm's |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in args.models:
        for batch in args.batch_sizes:
            base = by[(model, batch, "batchnorm")]
            for method in METHODS:
                r = by[(model, batch, method)]
                if r["ms"] is None:
                    lines.append(f"| {model} | {batch} | {method} | out of memory | - | - | - |")
                    continue
                ratio = "-" if base["ms"] is None else f"{r['ms'] / base['ms']:.2f}"
                peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
                missing = r["peak_mib"] is None or base["peak_mib"] is None
                peak_ratio = "n/a" if missing else f"{r['peak_mib'] / base['peak_mib']:.2f}"
                lines.append(f"| {model} | {batch} | {method} | {r['ms']:.1f} | {ratio} | {peak} | {peak_ratio} |")
    lines += ["", "| model | batch | the engine's added time per step | as a share of the step |", "|---|---|---|---|"]
    for model in args.models:
        for batch in args.batch_sizes:
            alone, reference = by[(model, batch, "msr_alone")]["ms"], by[(model, batch, REFERENCE)]["ms"]
            if alone is None or reference is None:
                lines.append(f"| {model} | {batch} | out of memory | - |")
                continue
            added = alone - reference
            lines.append(f"| {model} | {batch} | {added:.2f} ms | {100 * added / alone:.1f} % |")
    lines += [
        "",
        f"| model | largest batch in {args.budget_gib:g} GiB: " + " | ".join(METHODS) + " |",
        "|---|" + "---|" * len(METHODS),
    ]
    for model in args.models:
        cells = []
        for method in METHODS:
            peaks = {b: by[(model, b, method)]["peak_mib"] for b in args.batch_sizes}
            best = largest_batch(peaks, args.budget_gib * 1024)
            cells.append("n/a" if best is None else str(best))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ratio(value: Optional[float], base: Optional[float]) -> float:
    """``value / base``, or NaN (no bar) where either ran out of memory."""
    return float("nan") if value is None or base is None else value / base


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["model"], r["batch"], r["method"]): r for r in rows}
    settings = [(m, b) for m in args.models for b in args.batch_sizes]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        ratios = [_ratio(by[(m, b, method)]["ms"], by[(m, b, "batchnorm")]["ms"]) for m, b in settings]
        ax.bar([k + i * width for k in range(len(settings))], ratios, width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(settings))], [f"{m}\nbatch {b}" for m, b in settings])
    ax.set_ylabel("step time / BatchNorm's")
    ax.legend(fontsize=7, ncol=len(METHODS))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
