"""Training dynamics, traced step by step: what BatchNorm holds during training that MSR does not (issue 26).

Every configuration (method, learning rate, seed) is one run of ``accuracy.py``'s protocol (same task, network,
optimizer and schedule) with a :class:`Trace` callback that only watches. Every ``--every`` optimizer steps it
records, from that step's training batch:

* ``loss``: the training loss;
* ``dead``: the share of ReLU channels with no positive output anywhere in the batch (a dead channel passes no
  signal and gets no gradient), and ``dead_max`` for the worst ReLU layer;
* ``last_rms``: the RMS of the last ReLU's output, and ``feature_rms`` of the classifier's input;
* ``logit_std``: the standard deviation of the logits;
* ``filter_norm``: the conv filters' norms relative to the start of training (mean over filters and layers);
* ``grad_ratio``: the median over every conv filter of its gradient's norm relative to its own norm, the gradient
  centred per filter first (what MSR's projection keeps), and ``clipped``: the share of filters whose ratio is
  above the run's ``adaptive_clip`` -- the filters whose step the clip cuts (for a method without
  ``MeanShiftRejection``, above the default clip, for comparison). A share near 1 means the clip, not the
  gradient's size, sets every filter's step.

All of them are of the weights the step's forward pass used, before its update (the gradients: of that batch,
before the optimizer step).

BatchNorm re-centres and re-scales every channel on every batch, so its ``dead`` stays at 0 and its ``last_rms``
near its affine scale; a network without normalisation has only its parameters to hold them. The traces are
appended to ``--csv`` as each run finishes (an interrupted sweep resumes), and the Markdown table and plot are
rewritten from the whole CSV::

    python benchmarks/dynamics.py --dataset fashion_mnist --arch resnet8 --train-size 20000 \\
        --methods batchnorm msr_replace_noise --lrs 0.1 0.4
    python benchmarks/dynamics.py --tiny --out /tmp/dyn      # seconds: shows the script works
"""

from __future__ import annotations

import argparse
import csv
import inspect
import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

import lightning_msr
from lightning_msr.functional import filter_norms, project_mean_

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy
from _accuracy_models import ARCHS, DEFAULT_CACHE_DIR, TASKS, parse_method

ROOT = Path(__file__).resolve().parents[1]
FIELDS = [
    "dataset",
    "arch",
    "method",
    "batch_size",
    "lr",
    "seed",
    "test_acc",
    "step",
    "loss",
    "dead",
    "dead_max",
    "last_rms",
    "feature_rms",
    "logit_std",
    "filter_norm",
    "grad_ratio",
    "clipped",
]
DEFAULT_CLIP = inspect.signature(lightning_msr.MeanShiftRejection).parameters["adaptive_clip"].default


def dead_share(output: torch.Tensor) -> float:
    """The share of channels (dim 1) of a ReLU's ``output`` that are zero for every sample and position.

    Example::

        >>> x = torch.tensor([[[1.0], [0.0], [0.0]], [[0.0], [0.0], [2.0]]])  # 2 samples, 3 channels
        >>> round(dead_share(torch.relu(x)), 3)
        0.333
    """
    dims = [d for d in range(output.dim()) if d != 1]
    return float((output.detach().amax(dim=dims) <= 0).float().mean())


def gradient_ratios(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Each output filter's gradient norm relative to its weight norm, the gradient centred per filter first.

    The centring and the norms are the library's own (:func:`lightning_msr.functional.project_mean_` and
    :func:`~lightning_msr.functional.filter_norms`, filter-wise); the weight norm is floored at 1e-3, as
    :func:`~lightning_msr.functional.adaptive_clip_` floors it.

    Example::

        >>> w = torch.ones(2, 1, 2, 2)  # two filters of norm 2
        >>> g = torch.tensor([[1.0, -1.0, 1.0, -1.0], [3.0, 3.0, 3.0, 3.0]]).view(2, 1, 2, 2)
        >>> gradient_ratios(w, g)  # the second gradient is all mean: nothing left once centred
        tensor([1., 0.])
    """
    centred = project_mean_(grad.detach().float().clone(), mode="filter")
    norms = filter_norms(weight.detach(), dtype=torch.float32).flatten()
    return filter_norms(centred).flatten() / norms.clamp_min(1e-3)


class Trace(L.Callback):
    """Records the quantities of the module docstring every ``every`` steps (and at the first) into ``rows``."""

    def __init__(self, every: int = 10) -> None:
        self.every = every
        self.rows: list[dict[str, float]] = []
        self._armed = False
        self._step = 0
        self._filter_norm = math.nan
        self._dead: list[float] = []
        self._last_rms = math.nan
        self._feature_rms = math.nan
        self._logit_std = math.nan
        self._grad_ratio = math.nan
        self._clipped = math.nan
        self._clip = DEFAULT_CLIP
        self._start: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._clip = DEFAULT_CLIP
        for callback in trainer.callbacks:
            if isinstance(callback, lightning_msr.MeanShiftRejection):
                self._clip = callback.settings()["adaptive_clip"]
        for module in pl_module.modules():
            if isinstance(module, nn.ReLU):
                self._handles.append(module.register_forward_hook(self._relu))
        linears = [m for m in pl_module.modules() if isinstance(m, nn.Linear)]
        if linears:
            self._handles.append(linears[-1].register_forward_hook(self._head))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _relu(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self._armed:
            self._dead.append(dead_share(output))
            self._last_rms = float(output.detach().pow(2).mean().sqrt())

    def _head(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self._armed:
            self._feature_rms = float(args[0].detach().pow(2).mean().sqrt())
            self._logit_std = float(output.detach().std())

    def _filters(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {
            name: p.detach().flatten(1).norm(dim=1).clone() for name, p in pl_module.named_parameters() if p.dim() >= 3
        }

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._armed:
            return
        convs = [p for p in pl_module.parameters() if p.dim() >= 3 and p.grad is not None]
        if convs:
            ratios = torch.cat([gradient_ratios(p, p.grad) for p in convs])
            self._grad_ratio = float(ratios.median())
            self._clipped = float((ratios > self._clip).float().mean()) if self._clip is not None else 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._armed = trainer.global_step % self.every == 0
        self._step = trainer.global_step
        self._dead = []
        self._grad_ratio = self._clipped = math.nan
        if not self._start:
            self._start = self._filters(pl_module)
        if self._armed:  # the weights this batch's forward pass uses
            now = self._filters(pl_module)
            ratios = [float((now[n] / self._start[n].clamp_min(1e-12)).mean()) for n in now if n in self._start]
            self._filter_norm = sum(ratios) / len(ratios) if ratios else math.nan

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if not self._armed:
            return
        self._armed = False
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.rows.append(
            {
                "step": self._step,
                "loss": float(loss) if loss is not None else math.nan,
                "dead": sum(self._dead) / len(self._dead) if self._dead else math.nan,
                "dead_max": max(self._dead) if self._dead else math.nan,
                "last_rms": self._last_rms,
                "feature_rms": self._feature_rms,
                "logit_std": self._logit_std,
                "filter_norm": self._filter_norm,
                "grad_ratio": self._grad_ratio,
                "clipped": self._clipped,
            }
        )


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to the trace file; a file written before a column existed is rewritten first with every
    column (its rows keep their values, the new columns empty), so old and new traces share one header."""
    if path.exists():
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != FIELDS:
            old = read_rows(path)
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FIELDS, restval="")
                writer.writeheader()
                writer.writerows(old)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def run_key(row: dict) -> tuple:
    return (row["dataset"], row["arch"], row["method"], int(row["batch_size"]), float(row["lr"]), int(row["seed"]))


def trace_run(task: Any, arch: str, method: str, batch: int, lr: float, seed: int, epochs: int, every: int) -> list:
    """One run with a :class:`Trace`; its rows, each with the run's test accuracy."""
    trace = Trace(every)
    result = accuracy.run_one(task, method, batch, lr, seed, epochs, False, arch=arch, observers=(trace,))
    keys = dict(
        dataset=task.name, arch=arch, method=method, batch_size=batch, lr=lr, seed=seed, test_acc=result["test_acc"]
    )
    return [{**keys, **{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()}} for r in trace.rows]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _cell(value: float, fmt: str) -> str:
    """A table cell; traces written before a column existed have no value for it."""
    return "—" if math.isnan(value) else format(value, fmt)


def _summary(rows: list[dict]) -> list[dict]:
    runs: dict[tuple, list[dict]] = {}
    for r in rows:
        runs.setdefault(run_key(r), []).append(r)
    out = []
    for key, trace in sorted(runs.items()):
        trace.sort(key=lambda r: int(r["step"]))

        def col(name: str, trace: list = trace) -> list[float]:
            return [
                float(r[name]) for r in trace if r.get(name) not in (None, "", "nan") and math.isfinite(float(r[name]))
            ]

        end = trace[-max(1, len(trace) // 10) :]  # the last tenth of the run
        out.append(
            {
                "key": key,
                "acc": float(trace[0]["test_acc"]),
                "dead_end": sum(float(r["dead"]) for r in end) / len(end),
                "dead_peak": max(col("dead"), default=math.nan),
                "feature_start": (col("feature_rms") or [math.nan])[0],
                "feature_end": sum(float(r["feature_rms"]) for r in end) / len(end),
                "feature_peak": max(col("feature_rms"), default=math.nan),
                "logit_peak": max(col("logit_std"), default=math.nan),
                "loss_peak": max(col("loss"), default=math.nan),
                "filter_end": sum(float(r["filter_norm"]) for r in end) / len(end),
                "clipped": _mean(col("clipped")),
                "ratio_start": (col("grad_ratio") or [math.nan])[0],
                "ratio_end": _mean(col("grad_ratio", end)),
            }
        )
    return out


def write_report(rows: list[dict], out: Path) -> None:
    """``dynamics.md`` (one line per run) and ``dynamics.png`` (the traces) from the CSV rows."""
    lines = [
        "# Training dynamics: dead channels and the signal's scale, step by step",
        "",
        "Written by `benchmarks/dynamics.py` (its docstring defines every column). `dead`: share of ReLU channels",
        "with no positive output in the batch, at the end (mean of the last tenth of the run) and at its peak;",
        "`classifier input RMS`: at the first step, at the end and at its peak; `filter norm`: at the end,",
        "relative to the start; `clipped`: the share of conv filters whose gradient the run's `adaptive_clip` cuts",
        "(mean over the traced steps; for a method without MSR, above the default clip); `grad ratio`: the median",
        "filter's centred-gradient norm over its weight norm, at the first step and at the end (— : traced before",
        "these two columns existed).",
        "",
        "![dead channels, classifier input RMS and training loss per step](dynamics.png)",
        "",
        "| dataset | arch | method | batch | lr | seed | test acc | dead end / peak | classifier input RMS "
        "start / end / peak | logit std peak | loss peak | filter norm | clipped | grad ratio start / end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in _summary(rows):
        ds, arch, method, batch, lr, seed = s["key"]
        lines.append(
            f"| {ds} | {arch} | {method} | {batch} | {lr:g} | {seed} | {100 * s['acc']:.1f} | "
            f"{s['dead_end']:.2f} / {s['dead_peak']:.2f} | {s['feature_start']:.2g} / {s['feature_end']:.2g} / "
            f"{s['feature_peak']:.2g} | {s['logit_peak']:.3g} | {s['loss_peak']:.3g} | {s['filter_end']:.2f} | "
            f"{_cell(s['clipped'], '.2f')} | {_cell(s['ratio_start'], '.2g')} / {_cell(s['ratio_end'], '.2g')} |"
        )
    (out / "dynamics.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "dynamics.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[tuple, list[dict]] = {}
    for r in rows:
        runs.setdefault(run_key(r), []).append(r)
    panels = [
        ("dead", "dead ReLU channels (share)"),
        ("feature_rms", "classifier input RMS"),
        ("loss", "training loss"),
        ("clipped", "filters the clip cuts (share)"),
    ]
    # one row of panels per task and batch size: runs of different lengths on one axis hide each other
    tasks = sorted({key[:2] + key[3:4] for key in runs})
    fig, grid = plt.subplots(len(tasks), len(panels), figsize=(5 * len(panels), 3.2 * len(tasks)), squeeze=False)
    for (ds, arch, method, batch, lr, seed), trace in sorted(runs.items()):
        trace.sort(key=lambda r: int(r["step"]))
        steps = [int(r["step"]) for r in trace]
        style = "-" if method.startswith("batchnorm") else "--"
        for ax, (name, _) in zip(grid[tasks.index((ds, arch, batch))], panels):
            values = [float(r.get(name) or "nan") for r in trace]
            ax.plot(steps, values, style, label=f"{method} lr {lr:g} s{seed}")
    for axes, (ds, arch, batch) in zip(grid, tasks):
        for ax, (name, title) in zip(axes, panels):
            ax.set_title(f"{title}\n{ds} {arch} batch {batch}", fontsize=9)
            ax.set_xlabel("step")
            if name not in ("dead", "clipped"):
                ax.set_yscale("log")
        axes[-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["batchnorm", "msr_replace_noise"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.1, 0.4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every", type=int, default=10, help="trace every this many optimizer steps")
    parser.add_argument("--dataset", choices=sorted(TASKS), default="fashion_mnist")
    parser.add_argument("--arch", choices=ARCHS, default="resnet8")
    parser.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST: folder with the idx files")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--test-size", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--csv", type=Path, default=None, help="trace file (default: OUT/dynamics.csv)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run on digits (tests use it)")
    args = parser.parse_args(argv)
    args.download = False
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_msr"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    for method in args.methods:
        parse_method(method)  # a typo fails before any run
    if args.tiny:
        args.dataset, args.epochs, args.every = "digits", 1, 1
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.csv or args.out / "dynamics.csv"
    task = accuracy.load_task(args.dataset, args, 64 if args.tiny else None)
    done = {run_key(r) for r in read_rows(path)}
    for seed in args.seeds:
        for method in args.methods:
            for lr in args.lrs:
                key = (task.name, args.arch, method, args.batch_size, lr, seed)
                if key in done:
                    continue
                rows = trace_run(task, args.arch, method, args.batch_size, lr, seed, args.epochs, args.every)
                append_rows(path, rows)
                print(f"{method} lr {lr:g} seed {seed}: test acc {rows[0]['test_acc'] if rows else 'n/a'}", flush=True)
    write_report(read_rows(path), args.out)
    print(f"wrote {args.out / 'dynamics.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
