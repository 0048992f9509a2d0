"""How many operator calls Mean Shift Rejection adds to a training step, per model and per-step path.

On a GPU every operator call is a kernel launch that costs a few microseconds of host time whatever its size, so a
per-step cost that grows with the number of weights grows with depth. This counts, with ``torch.profiler`` on the
CPU (no GPU needed), the operator calls of one training step of a torchvision model adopted with
``MSREngine(model, optimizer, batchnorm="replace")`` -- forward, backward, the per-step work and SGD's update --
minus those of the same step of the same converted model without the engine, for each ``implementation``:
``eager`` (per weight), ``grouped`` (:class:`~lightning_msr.functional.KernelBank`: a constant number per kind of
kernel) and ``fused`` (one C pass, CPU only). A call is counted once, at the outermost operator (what Python or
autograd dispatches); the operators it calls inside are not counted again. It also times the step (CPU, medians).

Usage::

    python benchmarks/op_count.py                   # the models below; writes docs/benchmarks/op_count.md
    python benchmarks/op_count.py --models resnet18 --tiny
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lightning_msr import MSREngine, replace_batchnorm

MODELS = ("resnet18", "resnet50", "resnet101", "resnet152", "mobilenet_v2", "efficientnet_b0", "efficientnet_b3")
PATHS = ("eager", "grouped", "fused")


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def _outermost_calls(prof: profile) -> int:
    """Operator calls not made from inside another operator (nested ``aten::`` events are one call's parts)."""
    count = 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count


def measure(name: str, path: Optional[str], size: int, batch: int, steps: int) -> dict[str, float]:
    """Operator calls and median step time of ``name`` with the engine on ``path`` (``None``: no engine)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    engine = None
    if path is None:
        replace_batchnorm(model, "fold", optimizers=[optimizer])
    else:
        engine = MSREngine(model, optimizer, batchnorm="replace", implementation=path, calibration_samples=batch)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    _step(model, optimizer, x, y)  # the calibrating step, and the lazy caches
    _step(model, optimizer, x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(model, optimizer, x, y)
    calls = _outermost_calls(prof)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _step(model, optimizer, x, y)
        times.append(time.perf_counter() - start)
    result = {"calls": calls, "ms": 1000 * statistics.median(times), "weights": len(engine.weights) if engine else 0}
    if engine is not None:
        engine.detach()
    del model, optimizer, engine
    gc.collect()
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--tiny", action="store_true", help="one timed step (the test suite)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps = 1 if args.tiny else args.steps
    rows = []
    for name in args.models:
        base = measure(name, None, args.size, args.batch, steps)
        row = {"model": name, "weights": 0, "base_calls": base["calls"], "base_ms": base["ms"]}
        for path in PATHS:
            result = measure(name, path, args.size, args.batch, steps)
            row["weights"] = result["weights"]
            row[f"{path}_added"] = result["calls"] - base["calls"]
            row[f"{path}_ms"] = result["ms"]
        rows.append(row)
        print(row, flush=True)
    lines = [
        "# Operator calls Mean Shift Rejection adds to a step",
        "",
        f"Produced by `python benchmarks/op_count.py` (torchvision models with `num_classes=10`, batch {args.batch}, "
        f"{args.size}x{args.size} inputs, SGD with momentum, one CPU thread). Each model is adopted with "
        "`MSREngine(model, optimizer, batchnorm=\"replace\", implementation=...)`; the count is the outermost "
        "operator calls of one training step (forward, backward, the per-step work, SGD's update) minus those of "
        "the same converted model trained without the engine. On a GPU each call is a kernel launch of a few "
        "microseconds of host time.",
        "",
        "| model | weights MSR acts on | calls per step without the engine | added: `eager` (per weight) | added: "
        "`grouped` (KernelBank) | added: `fused` (CPU) | step ms: none / eager / grouped / fused |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['weights']} | {r['base_calls']} | {r['eager_added']} | **{r['grouped_added']}** | "
            f"{r['fused_added']} | {r['base_ms']:.0f} / {r['eager_ms']:.0f} / {r['grouped_ms']:.0f} / "
            f"{r['fused_ms']:.0f} |"
        )
    lines += [
        "",
        "`eager` grows with the number of weights (depth); `grouped` stays flat: one `KernelBank` buffer holds every "
        "gradient the step projects or clips (kernels, the free stem, Linear weights, scales and biases), copied in "
        "and out with one `torch._foreach_copy_` each; the projection is three operations per kind of kernel (3x3, "
        "5x5, whole filters) and the clipping of every unit about fifteen segment operations over the whole buffer. "
        "The `fused` path needs no operator for the per-step work at all (its count is below 0: it also does SGD's "
        "update of the kernels, whose per-parameter calls SGD then skips), but exists on the CPU only. Step times "
        "are on a shared 2-core CPU. There the grouped step is slower than the per-weight one -- its segment "
        "reductions and the copies into its buffers cost more than the calls they save -- so "
        "`implementation=\"auto\"` takes the grouped path only off the CPU, where each call is a kernel launch; "
        "what it saves on a GPU is what `benchmarks/gpu.py` measures (not run yet: no GPU here).",
    ]
    if not args.tiny:
        (args.out / "op_count.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out / 'op_count.md'}")
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
