"""Step time, saved-activation memory and the largest batch in a memory budget: BatchNorm vs MSR vs Deep Control.

torchvision's ``resnet18`` and ``mobilenet_v2`` (random init, 10 classes) at batch 32 on 64x64 inputs, on the CPU,
trained by a Lightning ``Trainer`` with SGD. Each method is the same network plus the plugin's callbacks:

* ``batchnorm`` -- the network as is;
* ``msr`` -- ``MeanShiftRejection(batchnorm="replace")``: BatchNorm's scale folded into the conv feeding it
  (``replace_batchnorm(model, "fold")``), zero-mean kernels, gradient projection;
* ``msr_affine`` -- ``MeanShiftRejection(batchnorm="affine")``: the same function with the scale and bias as a
  separate ``ChannelAffine`` layer after each conv (what ``"replace"`` did before the fold);
* ``msr_noise`` -- ``msr`` plus ``NoiseInjection()``;
* ``agc`` -- ``DeepControl()``: the gain folded into the conv, ``AutomaticGainControl`` (beta, bias) after it;
* ``agc_unfolded`` -- ``DeepControl(fold_gain=False)``: the gain inside the gain control;
* ``folded`` -- ``replace_batchnorm(model, "fold")`` alone: MSR's model without MSR's per-step work, so that the
  cost of ``msr`` over the floor splits into the model's (``folded / no_norm``) and the callback's (``msr / folded``);
* ``no_norm`` -- every BatchNorm replaced by ``nn.Identity`` (the floor: BatchNorm deleted, no scale at all).

All methods of a model run in one process, alternating in rounds (``--rounds``), so that load changes on a shared
machine hit them alike; step time is the median over rounds of the per-round median of the steps after warm-up,
measured from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, callbacks' hooks, optimizer
step). Saved-activation bytes are exact: every tensor that autograd saves for backward during one training step is
seen by ``torch.autograd.graph.saved_tensors_hooks``, and the unique storages that are not parameters are summed.

The largest batch in a memory budget (``--budget-mib``, on the peak resident memory of the whole process, what a
container limit or ``ulimit`` sees) is measured on ``--budget-model`` for ``--budget-methods``: a fresh process per
method and batch size of ``--budget-batches`` trains one step and reports its peak RSS (the kernel's ``VmHWM``
high-water mark), in increasing order up to the first over the budget; the largest batch size whose peak stays
within the budget is reported. (One process for all the batch sizes of a method inflated the peaks of the larger
ones by the allocator's leftovers from the smaller: about 370 MiB at batch 320 on resnet18.)
Results go to ``docs/benchmarks/speed.md`` (+ ``speed.csv``, ``speed.png``, ``speed_budget.csv``,
``speed_budget.png``), as ratios to BatchNorm.

Usage::

    python benchmarks/speed.py                      # a few minutes on an idle laptop CPU
    python benchmarks/speed.py --tiny --out /tmp/s  # seconds
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

import lightning_msr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _accuracy_models import swap_batchnorm

METHODS = (
    "batchnorm", "msr", "msr_affine", "msr_noise", "agc", "agc_unfolded", "folded", "no_norm", "groupnorm", "frn",
)  # fmt: skip
MODELS = ("resnet18", "mobilenet_v2")
FIELDS = [
    "model",
    "method",
    "batch_size",
    "image_size",
    "step_ms",
    "step_ratio",
    "saved_bytes",
    "saved_ratio",
    "steps",
    "rounds",
]
BUDGET_FIELDS = ["model", "method", "batch_size", "image_size", "peak_rss_mib", "baseline_rss_mib"]
WHAT = {
    "batchnorm": "BatchNorm2d (batch statistics)",
    "msr": "nothing: the scale is folded into the conv (`ScaledConv2d`), the bias is the conv's; plus the gradient "
    "projection before each step",
    "msr_affine": "a separate per-channel scale and bias (`ChannelAffine`), plus the gradient projection",
    "msr_noise": "as `msr`, plus `NoiseInjection()`'s per-(sample, channel) multiply-add on the conv outputs",
    "agc": "the gain folded into the conv, then `AutomaticGainControl` without gain (a scaled per-sample spatial "
    "mean subtraction and a bias), which saves only its map means",
    "agc_unfolded": "`AutomaticGainControl` with its gain, which needs the conv output for the gain's gradient",
    "folded": "MSR's model without MSR: `replace_batchnorm(model, \"fold\")` alone (the folded scale and the "
    "bias, no per-step work)",
    "no_norm": "nothing at all (`nn.Identity`): the floor, BatchNorm deleted without a replacement",
    "groupnorm": "`nn.GroupNorm` (up to 32 groups) in place of every BatchNorm: per-sample statistics, the peer "
    "small-batch users pick",
    "frn": "Filter Response Normalization + TLU in place of every BatchNorm (the ReLU after it stays)",
}


class _ReplaceBatchNorm(L.Callback):
    """At fit setup: ``replace_batchnorm(model, "identity")`` for the ``no_norm`` floor, or a peer normalisation
    (``"gn"``, ``"frn"``) where every BatchNorm was."""

    def __init__(self, replacement: str) -> None:
        self._replacement = replacement

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._replacement in ("gn", "frn"):
            swap_batchnorm(pl_module, self._replacement)
        else:
            lightning_msr.replace_batchnorm(pl_module, self._replacement)


def callbacks_for(method: str) -> list:
    """The plugin callbacks of a method."""
    if method == "batchnorm":
        return []
    if method in ("no_norm", "folded"):
        return [_ReplaceBatchNorm("identity" if method == "no_norm" else "fold")]
    if method in ("groupnorm", "frn"):
        return [_ReplaceBatchNorm("gn" if method == "groupnorm" else "frn")]
    if method in ("agc", "agc_unfolded"):
        return [lightning_msr.DeepControl(fold_gain=method == "agc")]
    batchnorm = "affine" if method == "msr_affine" else "replace"
    # the calibration pools one batch here, so it ends in the first (warm-up) step: pooling more batches is a
    # one-off start-up cost, not the per-step cost measured
    callbacks: list = [lightning_msr.MeanShiftRejection(batchnorm=batchnorm, seed=0, calibration_samples=1)]
    if method == "msr_noise":
        callbacks.append(lightning_msr.NoiseInjection(seed=0))
    return callbacks


def saved_activation_bytes(fn: Any, exclude: list[torch.Tensor]) -> int:
    """Bytes of the unique storages autograd saves while ``fn()`` runs, without those of ``exclude`` (parameters)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and ptr != 0:
            storages[ptr] = max(storages.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def build_model(name: str, tiny: bool = False, num_classes: int = 10) -> nn.Module:
    """A torchvision model with random weights; ``tiny`` gives a seconds-long smoke-run variant."""
    import torchvision

    if name == "resnet18":
        if tiny:  # one block per stage (a resnet10)
            resnet = torchvision.models.resnet
            return resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
        return torchvision.models.resnet18(num_classes=num_classes)
    if name == "mobilenet_v2":
        return torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=0.25 if tiny else 1.0)
    raise ValueError(f"Expected a model in {MODELS}, but got {name!r}.")


class SpeedModule(L.LightningModule):
    """A torchvision model trained with SGD; records saved-activation bytes of its first training step."""

    def __init__(self, model: str = "resnet18", tiny: bool = False) -> None:
        super().__init__()
        self.model = build_model(model, tiny)
        self.saved_bytes: Optional[int] = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.saved_bytes is None:
            out: dict[str, torch.Tensor] = {}

            def forward() -> None:
                out["loss"] = nn.functional.cross_entropy(self.model(x), y)

            self.saved_bytes = saved_activation_bytes(forward, list(self.parameters()))
            return out["loss"]
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


class StepTimer(L.Callback):
    """Wall time of every training batch, from ``on_train_batch_start`` to ``on_train_batch_end``."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


def measure(
    method: str, batch_size: int, image_size: int, steps: int, model: str = "resnet18", tiny: bool = False
) -> tuple[list[float], int]:
    """Per-step seconds (first step excluded) and saved-activation bytes of one fit of ``steps + 1`` steps."""
    L.seed_everything(0, verbose=False)
    module = SpeedModule(model, tiny)
    x = torch.randn(batch_size * (steps + 1), 3, image_size, image_size)
    y = torch.randint(0, 10, (len(x),))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps + 1,
        logger=False,
        callbacks=[*callbacks_for(method), timer],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    return timer.times[1:], int(module.saved_bytes or 0)


def _rss_mib() -> float:
    """The resident memory of this process now (Linux ``/proc/self/statm``), in MiB."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_rss_mib() -> float:
    """The high-water mark of this process's resident memory, in MiB.

    Linux's ``VmHWM`` belongs to the address space, which ``exec`` replaces; ``getrusage``'s ``ru_maxrss`` survives
    ``exec``, so a worker started from a large parent would report the parent's size (``fork`` + ``exec``).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_worker(method: str, model: str, batch_sizes: list[int], image_size: int, tiny: bool, budget: float) -> None:
    """Train one step at each batch size (increasing) and print one JSON line with the peak RSS after each.

    One step is the peak: its backward holds the saved activations and the gradients, and SGD's momentum buffers
    are created in it.
    """
    baseline = _rss_mib()
    for batch_size in sorted(batch_sizes):
        measure(method, batch_size, image_size, 0, model, tiny)
        peak = _peak_rss_mib()
        print(json.dumps({"batch_size": batch_size, "peak_rss_mib": peak, "baseline_rss_mib": baseline}), flush=True)
        if peak > budget:
            return  # the high-water mark only grows: no larger batch fits either


def measure_budget(args: argparse.Namespace) -> list[dict]:
    """Peak RSS per batch size of each budget method, each batch size in a fresh process (increasing, up to the
    first one over the budget): in one process the high-water mark of a smaller batch's fit is not reused by a larger
    one's (the allocator's fragmentation), which added about 370 MiB at batch 320 on resnet18 to both methods."""
    rows = []
    for method in args.budget_methods:
        for batch_size in sorted(args.budget_batches):
            record = _peak_in_fresh_process(args, method, batch_size)
            rows.append({"model": args.budget_model, "method": method, "image_size": args.image_size, **record})
            print(f"budget {method}: batch {record['batch_size']}: {record['peak_rss_mib']:.0f} MiB", flush=True)
            if record["peak_rss_mib"] > args.budget_mib:
                break
    return rows


def _peak_in_fresh_process(args: argparse.Namespace, method: str, batch_size: int) -> dict:
    """One peak-memory worker (``--peak-worker``) training ``method`` one step at ``batch_size``."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--peak-worker",
        method,
        "--budget-model",
        args.budget_model,
        "--image-size",
        str(args.image_size),
        "--threads",
        str(args.threads),
        "--budget-mib",
        str(args.budget_mib),
        "--budget-batches",
        str(batch_size),
    ] + (["--tiny"] if args.tiny else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the peak-memory worker for {method!r} failed:\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def largest_batch(rows: list[dict], method: str, budget: float) -> Optional[int]:
    """The largest measured batch size of ``method`` whose peak RSS stays within ``budget`` MiB."""
    fits = [int(r["batch_size"]) for r in rows if r["method"] == method and r["peak_rss_mib"] <= budget]
    return max(fits) if fits else None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None, choices=MODELS, help="default: both (resnet18 if --tiny)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method and round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds over the methods")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget-mib", type=float, default=1536.0, help="peak-RSS budget of the whole process")
    parser.add_argument("--budget-model", default="resnet18", choices=MODELS)
    parser.add_argument(
        "--budget-methods", nargs="*", default=None, choices=METHODS, help="default: batchnorm, msr, agc if measured"
    )
    parser.add_argument(
        "--budget-batches", nargs="+", type=int, default=[32, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]
    )
    parser.add_argument("--peak-worker", default=None, choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests use it)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the tables and plots from the CSVs")
    parser.add_argument("--note", default="", help="a sentence about the run (e.g. the machine's load) for speed.md")
    args = parser.parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_msr"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.peak_worker:
        batches, budget = args.budget_batches, args.budget_mib
        peak_worker(args.peak_worker, args.budget_model, batches, args.image_size, args.tiny, budget)
        return 0
    if args.report_only:
        rows = _read_csv(args.out / "speed.csv")
        budget_rows = _read_csv(args.out / "speed_budget.csv") if (args.out / "speed_budget.csv").exists() else []
        first = rows[0]
        args.batch_size, args.image_size = int(first["batch_size"]), int(first["image_size"])
        args.steps, args.rounds = int(first["steps"]), int(first["rounds"])
        write_outputs(rows, budget_rows, args)
        return 0
    if args.tiny:
        args.batch_size, args.image_size, args.steps, args.rounds = 2, 32, 2, 2
        args.budget_batches = [2, 4]
    models = args.models or (["resnet18"] if args.tiny else list(MODELS))
    if args.budget_methods is None:
        args.budget_methods = [m for m in ("batchnorm", "msr", "agc") if m in args.methods]

    rows = []
    for model in models:
        per_round: dict[str, list[float]] = {m: [] for m in args.methods}
        saved: dict[str, int] = {}
        for r in range(args.rounds):
            order = args.methods if r % 2 == 0 else args.methods[::-1]  # alternate the order as well
            for m in order:
                times, nbytes = measure(m, args.batch_size, args.image_size, args.steps, model, args.tiny)
                per_round[m].append(statistics.median(times))
                saved[m] = nbytes
                print(
                    f"{model} round {r + 1}/{args.rounds} {m}: {1000 * per_round[m][-1]:.1f} ms/step, "
                    f"{nbytes / 2**20:.2f} MiB saved",
                    flush=True,
                )
        ref = "batchnorm" if "batchnorm" in args.methods else args.methods[0]
        ref_ms = 1000 * statistics.median(per_round[ref])
        for m in args.methods:
            ms = 1000 * statistics.median(per_round[m])
            rows.append(
                {
                    "model": model,
                    "method": m,
                    "batch_size": args.batch_size,
                    "image_size": args.image_size,
                    "step_ms": round(ms, 2),
                    "step_ratio": round(ms / ref_ms, 3),
                    "saved_bytes": saved[m],
                    "saved_ratio": round(saved[m] / saved[ref], 4) if saved[ref] else float("nan"),
                    "steps": args.steps,
                    "rounds": args.rounds,
                }
            )
    budget_rows = measure_budget(args) if args.budget_methods else []
    write_outputs(rows, budget_rows, args)
    return 0


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return [{k: (v if k in ("model", "method") else float(v)) for k, v in r.items()} for r in csv.DictReader(fh)]


def write_outputs(rows: list[dict], budget_rows: list[dict], args: argparse.Namespace) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with (out / "speed.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    if budget_rows:
        with (out / "speed_budget.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=BUDGET_FIELDS)
            writer.writeheader()
            writer.writerows(budget_rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        "# Speed and memory: BatchNorm vs MSR vs Deep Control",
        "",
        f"Generated by `benchmarks/speed.py`: torchvision {', '.join(f'`{m}`' for m in models)}, batch "
        f"{int(args.batch_size)}, {int(args.image_size)}x{int(args.image_size)} inputs, CPU ({args.threads} thread), "
        f"Lightning `Trainer` + SGD. Step time: median over {int(args.rounds)} alternating rounds of the median of "
        f"{int(args.steps)} steps (forward, backward, callback hooks, optimizer step). Saved activations: exact bytes "
        "of the unique non-parameter storages autograd saves for backward in one training step "
        "(`torch.autograd.graph.saved_tensors_hooks`). Ratios are to `batchnorm`, measured in the same process."
        + (f" {args.note}" if args.note else ""),
        "",
    ]
    for model in models:
        lines += [
            f"## {model}",
            "",
            "| method | step time (ms) | step time ratio | saved activations (MiB) | saved activations ratio |",
            "|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["model"] == model):
            lines.append(
                f"| `{r['method']}` | {r['step_ms']:.1f} | {r['step_ratio']:.2f} | "
                f"{r['saved_bytes'] / 2**20:.2f} | {r['saved_ratio']:.3f} |"
            )
        lines.append("")
        ms = {r["method"]: r["step_ms"] for r in rows if r["model"] == model}
        if {"msr", "folded", "no_norm"} <= set(ms):
            lines += [
                f"MSR over the floor: **{ms['msr'] / ms['no_norm']:.2f}x** = the model (folded scales and biases) "
                f"{ms['folded'] / ms['no_norm']:.2f}x × the callback's per-step work {ms['msr'] / ms['folded']:.2f}x.",
                "",
            ]
    lines += ["What each method puts after every conv:", ""]
    lines += [f"- `{m}`: {WHAT[m]};" for m in methods]
    lines += [
        "",
        "Where the memory goes: BatchNorm (and a separate scale layer) keeps the conv output for its backward, and "
        "the in-place ReLU after it keeps its own output; folded, the conv output is not kept by anyone (a conv's "
        "backward needs its input and weight), and the in-place ReLU rewrites it, so a conv -> scale -> ReLU stack "
        "saves what conv -> ReLU saves. The scaled conv recomputes `scale * weight` in backward instead of keeping "
        "a weight-sized copy. On a shared machine the step times are noisy even with alternation and medians: read "
        "ratios within about 10% as equal.",
        "",
        "![step time and saved activations relative to BatchNorm](speed.png)",
        "",
    ]
    budget_methods = list(dict.fromkeys(r["method"] for r in budget_rows))
    if budget_rows:
        budget = args.budget_mib
        model = budget_rows[0]["model"]
        batches = sorted({int(r["batch_size"]) for r in budget_rows})
        peak = {(r["method"], int(r["batch_size"])): r["peak_rss_mib"] for r in budget_rows}
        lines += [
            f"## Largest batch in a {budget:.0f} MiB budget ({model})",
            "",
            f"Peak resident memory (MiB) of a fresh process per batch size training `{model}` at "
            f"{int(args.image_size)}x{int(args.image_size)} for one step (the `VmHWM` high-water mark; the process "
            f"holds about {budget_rows[0]['baseline_rss_mib']:.0f} MiB before training: Python, torch, Lightning). A "
            "method stops at the first batch size over the budget.",
            "",
            "| batch size | " + " | ".join(f"{m} peak (MiB)" for m in budget_methods) + " |",
            "|---" * (len(budget_methods) + 1) + "|",
        ]
        for b in batches:
            cells = [f"{peak[(m, b)]:.0f}" if (m, b) in peak else "-" for m in budget_methods]
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        largest = {m: largest_batch(budget_rows, m, budget) for m in budget_methods}
        lines += [
            "",
            "| method | largest batch within budget | ratio to batchnorm |",
            "|---|---|---|",
        ]
        ref = largest.get("batchnorm")
        for m in budget_methods:
            ratio = f"{largest[m] / ref:.2f}" if ref and largest[m] else "-"
            lines.append(f"| {m} | {largest[m] if largest[m] else 'none'} | {ratio} |")
        lines += [
            "",
            f"The batch sizes are a grid ({', '.join(map(str, batches))}): the true limit lies between a listed "
            "size and the next.",
            "",
            "![peak memory vs batch size](speed_budget.png)",
            "",
        ]
    (out / "speed.md").write_text("\n".join(lines))
    _plot(rows, budget_rows, args, out)
    print(f"wrote {out / 'speed.md'}")


def _plot(rows: list[dict], budget_rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        by_method = {r["method"]: r for r in rows if r["model"] == model}
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(methods))]
        axes[0].bar(xs, [by_method[m]["step_ratio"] for m in methods], width, label=model)
        axes[1].bar(xs, [by_method[m]["saved_ratio"] for m in methods], width, label=model)
    axes[0].set_title("step time / batchnorm")
    axes[1].set_title("saved activations / batchnorm")
    for ax in axes:
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=110)
    plt.close(fig)
    if not budget_rows:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method in dict.fromkeys(r["method"] for r in budget_rows):
        points = sorted((int(r["batch_size"]), r["peak_rss_mib"]) for r in budget_rows if r["method"] == method)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    ax.axhline(args.budget_mib, color="k", lw=0.8, ls="--", label=f"budget {args.budget_mib:.0f} MiB")
    ax.set_xlabel("batch size")
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_title(f"{budget_rows[0]['model']}, {int(args.image_size)}x{int(args.image_size)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speed_budget.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
