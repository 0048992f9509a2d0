"""Step-time overhead of MeanShiftRejection on a norm-free torchvision resnet18 (issue: target ratio <= 1.02).

Runs real ``Trainer.fit`` calls with and without the callback, alternating them in one process so that
machine load affects both alike, times every training step (``on_train_batch_start`` to
``on_train_batch_end``: forward, backward, projection, optimizer step) and reports the ratio of the medians.
It also times the projection of one full set of resnet18 gradients on its own, for each implementation
(``projection_timing="backward"`` hooks vs the single pass at the optimizer step).

Usage::

    python benchmarks/overhead.py                # batch 16, 64x64, 5 rounds of 12 steps
    python benchmarks/overhead.py --tiny         # seconds, for the test suite
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_msr import MeanShiftRejection
from lightning_msr.functional import _groups, _project_one_, eligible_weights


class Classifier(L.LightningModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=10, norm_layer=lambda c: nn.Identity())
        if width != 64:  # --tiny: a narrower network of the same structure
            self.net = torchvision.models.ResNet(
                torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10, norm_layer=lambda c: nn.Identity()
            )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


class StepTimer(L.Callback):
    """Wall-clock and CPU time (all threads of this process) of every training step.

    CPU time is what the step costs this process; it is far less disturbed than wall time when other
    processes share the machine, so both are reported.
    """

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []
        self._start = (0.0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))


CONFIGS: dict[str, Optional[dict]] = {
    "without the callback": None,
    "`MeanShiftRejection()` (projection during backward)": {},
    "`MeanShiftRejection(projection_timing='optimizer_step')`": {"projection_timing": "optimizer_step"},
    "`MeanShiftRejection(keep_magnitude=True)` (+ filter norms held after each step)": {"keep_magnitude": True},
}


def run(
    model: Classifier, loader: DataLoader, steps: int, kwargs: Optional[dict], warmup: int
) -> list[tuple[float, float]]:
    timer = StepTimer()
    callbacks: list[L.Callback] = [MeanShiftRejection(init="none", **kwargs)] if kwargs is not None else []
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps + warmup,
        callbacks=[*callbacks, timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    return timer.times[warmup:]


def projection_alone(model: nn.Module, repeats: int) -> dict[str, float]:
    """Time the projection of one full set of gradients by itself (median of ``repeats``), per implementation."""
    weights = [w for w in eligible_weights(model) if w.centrable]
    grads = [torch.randn_like(w.parameter) for w in weights]
    layouts = [_groups(w.parameter.shape, "kernel", w.transposed, w.groups) for w in weights]
    out = {}

    def lib() -> None:
        for g, layout in zip(grads, layouts):
            _project_one_(g, layout, 1.0)

    def naive() -> None:
        for g in grads:
            dims = tuple(range(2, g.dim())) if g[0, 0].numel() > 1 else (1,)
            g.sub_(g.mean(dims, keepdim=True))

    for name, fn in (("lightning_msr", lib), ("naive per-tensor mean", naive)):
        times = []
        for _ in range(repeats):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        out[name] = statistics.median(times) * 1e3
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=5, help="alternating (without, with) run pairs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (narrow net, few steps)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch_size, args.image_size, args.steps, args.rounds = 2, 32, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    width = 16 if args.tiny else 64
    data = TensorDataset(
        torch.randn(args.batch_size * 4, 3, args.image_size, args.image_size),
        torch.randint(0, 10, (args.batch_size * 4,)),
    )
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in CONFIGS}
    model = Classifier(width)
    order = list(CONFIGS)
    for round_ in range(args.rounds):
        for name in order if round_ % 2 == 0 else order[::-1]:
            times[name] += run(model, loader, args.steps, CONFIGS[name], warmup=2)

    def median(name: str, clock: int) -> float:
        return statistics.median(t[clock] for t in times[name]) * 1e3

    alone = projection_alone(model.net, repeats=5 if args.tiny else 30)
    base = order[0]
    rows = [
        f"| {name} | {median(name, 0):.1f} ms | {median(name, 1):.1f} ms | "
        f"{median(name, 0) / median(base, 0):.3f} | {median(name, 1) / median(base, 1):.3f} |"
        for name in order
    ]
    result = {
        "wall_ratio": median(order[1], 0) / median(base, 0),
        "cpu_ratio": median(order[1], 1) / median(base, 1),
        "cpu_ratio_optimizer_step": median(order[2], 1) / median(base, 1),
        "cpu_ratio_keep_magnitude": median(order[3], 1) / median(base, 1),
        **{f"projection_cpu_ms[{k}]": v for k, v in alone.items()},
    }
    lines = [
        "# MeanShiftRejection step-time overhead",
        "",
        f"Norm-free torchvision resnet18, batch {args.batch_size}, {args.image_size}x{args.image_size}, SGD with "
        f"momentum, CPU ({torch.get_num_threads()} threads), {args.rounds} alternating rounds of {args.steps} steps; "
        "medians over all timed steps. Produced by `python benchmarks/overhead.py`.",
        "",
        "| training step | wall clock | CPU time (all threads) | wall ratio | CPU-time ratio (target <= 1.02) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "| projection of all 11.2 M conv gradients on its own (CPU time) | |",
        "|---|---|",
        *[f"| {k} | {v:.2f} ms |" for k, v in alone.items()],
        "",
        "CPU time is what the step costs this process; it is much less disturbed than wall time when other "
        "processes share the machine. The default projection runs in each kernel's post-accumulate-grad hook "
        "during backward; on one process it costs about the same as the single pass at the optimizer step. "
        "Both are memory-bound: eager PyTorch reads each gradient twice and writes it once (group means, then "
        "the subtraction), so on resnet18 at 64x64, whose 9.4 MB layer4 kernels dominate, the 1.02 target is "
        "out of reach without a fused kernel.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.tiny:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "overhead.md").write_text(text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
