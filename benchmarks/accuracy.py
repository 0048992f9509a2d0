"""Accuracy of Mean Shift Rejection against BatchNorm across batch sizes, with a learning-rate sweep per method.

Every configuration (task, network, method, batch size, learning rate, seed) is one Lightning ``Trainer.fit`` of
a small VGG-style CNN, a ResNet-20 or -8, or (for the 1-D ``waves`` task) a 1-D conv net (``--arch``); only the layer
after each conv and the callbacks differ.
Results are appended to a CSV as they finish, so an interrupted sweep resumes where it stopped (configurations
already in the CSV are skipped), and the Markdown table and plots are regenerated from the whole CSV.

Usage::

    python benchmarks/accuracy.py                                  # the default sweep (hours on a laptop CPU)
    python benchmarks/accuracy.py --tiny --out /tmp/acc            # seconds: shows the script works
    python benchmarks/accuracy.py --dataset shapes --methods batchnorm msr_affine_noise --batch-sizes 1 2
    python benchmarks/accuracy.py --methods "msr_affine[init_magnitude=2]" --batch-sizes 32 --lrs 0.05 0.1
    python benchmarks/accuracy.py --report-only                    # rebuild accuracy.md and the plots
    python benchmarks/accuracy.py --dataset fashion_mnist --arch vgg resnet20 --train-size 5000 --test-size 5000
    python benchmarks/accuracy.py --dataset waves --arch cnn1d --methods batchnorm msr_replace_noise --batch-sizes 64 1

Fashion-MNIST is read from Debian's package (``apt-get install -y dataset-fashion-mnist``) when it is installed,
else from ``--data-dir``, or downloaded by torchvision into ``--cache-dir`` with ``--download``.

``--methods`` entries are ``name`` or ``name[key=value,...]``; names and options are listed by ``--help``.
Learning rates (``--lrs``) are given for batch 32 and scaled by ``sqrt(batch / 32)`` for other batch sizes
(``--lr-scaling``). Small batches run fewer epochs (``--epochs`` is the budget of batch >= 32, see
:func:`epochs_for`): they take ``32 / batch`` times more optimizer steps per epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

from lightning_msr.functional import adaptive_clip_

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _accuracy_models import (
    ARCHS,
    BASE_METHODS,
    DEFAULT_CACHE_DIR,
    OPTIONS,
    TASKS,
    augment_batch,
    build,
    choose_lr,
    has_norm_layer,
    parse_method,
)

FIELDS = [
    "dataset",
    "arch",
    "n_train",
    "n_test",
    "method",
    "batch_size",
    "lr",
    "seed",
    "epochs",
    "steps",
    "test_acc",
    "train_loss",
    "diverged",
    "seconds",
    "norm_layers",
    "callbacks",
]
KEY = ("dataset", "arch", "n_train", "method", "batch_size", "lr", "seed", "epochs")
# the training-set sizes of the full digits and shapes tasks, to fill in `n_train` of rows written before it existed
FULL_TRAIN_SIZES = {"digits": 1437, "shapes": 1000}
DEFAULT_METHODS = ["batchnorm", "none", "msr", "msr_affine", "msr_noise", "msr_affine_noise", "agc"]
DEFAULT_LRS = [0.02, 0.05, 0.1, 0.2, 0.4]


class Classifier(L.LightningModule):
    """SGD (momentum, weight decay) with a per-step linear warm-up and cosine decay; stops on a non-finite loss."""

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        total_steps: int,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        warmup: float = 0.0,
        conv_lr: float = 1.0,
        augment: int = 0,
        seed: int = 0,
        unit_clip: Optional[float] = None,
        filter_clip: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.unit_clip = unit_clip
        self.filter_clip = filter_clip
        self.augment = augment
        self._aug_gen = torch.Generator().manual_seed(seed)
        self.lr, self.total_steps, self.momentum, self.weight_decay = lr, total_steps, momentum, weight_decay
        self.nesterov = nesterov
        self.warmup_steps = round(warmup * total_steps)
        self.conv_lr = conv_lr
        self.diverged = False
        self.epoch_losses: list[float] = []
        self._sum, self._count = 0.0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        x, y = batch
        if self.augment:
            x = augment_batch(x, self.augment, self._aug_gen)
        loss = nn.functional.cross_entropy(self.model(x), y)
        if not torch.isfinite(loss):
            self.diverged = True
            self.trainer.should_stop = True
            return None  # skip the step
        self._sum += float(loss.detach()) * len(y)
        self._count += len(y)
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.unit_clip or self.filter_clip:
            # NFNets' AGC on every parameter but the classifier's (as Brock et al. recommend); `filter_clip`: on the
            # filters only (weights of 2 or more dims), not on 1-D gains and biases
            head = [m for m in self.model.modules() if isinstance(m, nn.Linear)][-1:]
            skip = {id(p) for m in head for p in m.parameters()}
            params = [p for p in self.model.parameters() if id(p) not in skip]
            if self.unit_clip:
                adaptive_clip_(params, self.unit_clip)
            if self.filter_clip:
                adaptive_clip_([p for p in params if p.dim() > 1], self.filter_clip)

    def on_train_epoch_start(self) -> None:
        self._sum, self._count = 0.0, 0

    def on_train_epoch_end(self) -> None:
        if self._count:
            self.epoch_losses.append(self._sum / self._count)

    def configure_optimizers(self) -> Any:
        from torch.nn.utils import parametrize

        conv = [  # a Weight-Standardized conv (`gn_ws`) trains its parametrization's original weight
            m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight
            for m in self.modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d))
        ]
        ids = {id(p) for p in conv}
        rest = [p for p in self.parameters() if id(p) not in ids]
        groups = [{"params": rest}, {"params": conv, "lr": self.lr * self.conv_lr}]
        opt = torch.optim.SGD(
            groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, nesterov=self.nesterov
        )
        warm, total = self.warmup_steps, max(self.total_steps, 1)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / max(total - warm, 1)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def epochs_for(batch_size: int, epochs: int) -> int:
    """Epoch budget of a batch size: ``epochs`` for batch >= 32, ``epochs * sqrt(batch / 32)`` (at least 2) below.

    A batch-1 epoch already takes 32 times the optimizer steps of a batch-32 epoch, so small batches reach the
    same training loss in fewer epochs; this keeps batch 1 affordable on a CPU (documented in ``accuracy.md``).
    """
    if batch_size >= 32:
        return epochs
    return max(2, round(epochs * math.sqrt(batch_size / 32)))


def scaled_lr(lr: float, batch_size: int, scaling: str) -> float:
    """``lr`` given for batch 32, scaled to ``batch_size`` (``"sqrt"``, ``"linear"`` or ``"none"``)."""
    ratio = batch_size / 32
    factor = {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}[scaling]
    return float(f"{lr * factor:.4g}")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 512):
        correct += int((model(x[i : i + 512]).argmax(1) == y[i : i + 512]).sum())
    return correct / len(x)


def run_one(
    task: Any,
    method: str,
    batch_size: int,
    lr: float,
    seed: int,
    epochs: int,
    progress: bool,
    arch: str = "vgg",
    observers: tuple[L.Callback, ...] = (),
) -> dict:
    """Train one configuration and return its CSV row. ``observers``: callbacks that only watch the run (e.g.
    ``dynamics.py``'s trace); they are not part of the method and not named in the row."""
    spec = parse_method(method)
    L.seed_everything(seed, workers=False, verbose=False)
    model, callbacks, overrides = build(spec, task, seed, arch)
    data = torch.utils.data.TensorDataset(task.x_train, task.y_train)
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    total = epochs * len(loader)
    module = Classifier(
        model,
        lr,
        total,
        momentum=overrides.get("momentum", 0.9),
        weight_decay=overrides.get("wd", 5e-4),
        nesterov=overrides.get("nesterov", False),
        warmup=overrides.get("warmup", 0.0),
        conv_lr=overrides.get("conv_lr", 1.0),
        augment=task.augment,
        seed=seed,
        unit_clip=overrides.get("unit_clip"),
        filter_clip=overrides.get("filter_clip"),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        callbacks=[*callbacks, *observers],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=max(len(loader), 1),
        gradient_clip_val=overrides.get("clip"),
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    if trainer.interrupted:  # SIGTERM / Ctrl-C: never record a partly trained run
        raise KeyboardInterrupt
    acc = evaluate(module.model, task.x_test, task.y_test)
    params_finite = all(torch.isfinite(p).all() for p in module.model.parameters())
    diverged = module.diverged or not params_finite
    return {
        "dataset": task.name,
        "arch": arch,
        "n_train": len(task.y_train),
        "n_test": len(task.y_test),
        "method": method,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "epochs": epochs,
        "steps": trainer.global_step,
        "test_acc": round(acc if not diverged else 1.0 / task.num_classes, 5),
        "train_loss": round(module.epoch_losses[-1], 5) if module.epoch_losses and not diverged else float("nan"),
        "diverged": int(diverged),
        "seconds": round(seconds, 2),
        "norm_layers": int(has_norm_layer(module.model)),
        "callbacks": "+".join(type(c).__name__ for c in callbacks) or "-",
    }


# ----------------------------------------------------------------------------------------------- CSV


def _key(row: dict) -> tuple:
    return (
        row["dataset"],
        row["arch"],
        int(row["n_train"]) if row["n_train"] not in ("", None) else None,
        row["method"],
        int(row["batch_size"]),
        float(row["lr"]),
        int(row["seed"]),
        int(row["epochs"]),
    )


def _upgrade(row: dict) -> dict:
    """A row of a CSV written before the ``arch``/``n_train``/``n_test`` columns: the VGG net on the full task."""
    row = dict(row)
    if not row.get("arch"):
        row["arch"] = "vgg"
    if row.get("n_train") in ("", None):
        full = FULL_TRAIN_SIZES.get(row["dataset"])
        per_epoch = math.ceil(full / int(row["batch_size"])) if full else None
        # when the recorded steps show that the run went through the full training set (a diverged run stopped
        # early: its steps can only be at most the full count)
        steps, planned = int(row["steps"]), int(row["epochs"]) * per_epoch if full else -1
        ok = full and (steps == planned or (int(row["diverged"]) and steps <= planned))
        row["n_train"] = full if ok else ""
    row.setdefault("n_test", "")
    return row


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return [_upgrade(r) for r in csv.DictReader(fh)]


def append_row(path: Path, row: dict) -> None:
    """Append one row under an exclusive lock (several sweeps may share one CSV).

    A CSV with an older header is first rewritten with the current columns (old rows keep every value).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", newline="") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.seek(0)
            header = fh.readline().strip().split(",")
            if header != [""] and header != FIELDS:
                fh.seek(0)
                old = [_upgrade(r) for r in csv.DictReader(fh)]
                fh.seek(0)
                fh.truncate()
                writer = csv.DictWriter(fh, fieldnames=FIELDS)
                writer.writeheader()
                writer.writerows({k: r.get(k, "") for k in FIELDS} for r in old)
            fh.seek(0, os.SEEK_END)
            writer = csv.DictWriter(fh, fieldnames=FIELDS)
            if fh.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
            fh.flush()
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------- report


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def section(row: dict) -> str:
    """The table a row belongs to: the task, plus the network and the training-set size when they are not the
    VGG net on the full digits/shapes task (e.g. ``"fashion_mnist, resnet20, 10000 train images"``)."""
    label, full = row["dataset"], FULL_TRAIN_SIZES.get(row["dataset"])
    if row["arch"] != "vgg" or full is None:
        label += f", {row['arch']}"
    if row["n_train"] not in ("", None) and int(row["n_train"]) != full:
        label += f", {row['n_train']} train images"
    return label


def summarize(rows: list[dict]) -> dict:
    """``{(section, method, batch): {"best": (lr, mean, std, n), "sweep": {lr: (mean, std, n, diverged)}}}``."""
    groups: dict[tuple, dict[float, list[dict]]] = {}
    seen = set()
    for r in rows:
        if _key(r) in seen:  # the same configuration finished twice by parallel sweeps: count it once
            continue
        seen.add(_key(r))
        key = (section(r), r["method"], int(r["batch_size"]))
        groups.setdefault(key, {}).setdefault(float(r["lr"]), []).append(r)
    out = {}
    for key, by_lr in groups.items():
        sweep = {}
        for lr, rs in sorted(by_lr.items()):
            mean, std = _stats([100 * float(r["test_acc"]) for r in rs])
            sweep[lr] = (mean, std, len(rs), sum(int(r["diverged"]) for r in rs))
        # best LR: highest mean over seeds; among LRs with fewer seeds prefer the fully-seeded ones
        most = max(v[2] for v in sweep.values())
        best_lr = max((lr for lr, v in sweep.items() if v[2] == most), key=lambda lr: sweep[lr][0])
        out[key] = {"best": (best_lr, *sweep[best_lr][:3]), "sweep": sweep}
    return out


def write_report(rows: list[dict], out: Path, title_note: str = "", ablation_rows: Optional[list[dict]] = None) -> None:
    """Write ``accuracy.md``, ``accuracy_vs_batch.png`` and ``accuracy_vs_lr.png`` from all rows.

    ``ablation_rows`` (e.g. from ``ablation.csv``) add the ablation table at the end.
    """
    summary = summarize(rows)
    datasets = sorted({k[0] for k in summary})
    lines = [
        "# Accuracy: Mean Shift Rejection vs BatchNorm across batch sizes",
        "",
        "Generated by `benchmarks/accuracy.py` from `accuracy.csv` (every run, the whole learning-rate sweep). "
        "Test accuracy in %, mean ± std over seeds at the best learning rate of each method and batch size "
        "(LR chosen by mean test accuracy over seeds, the same rule for every method; `n` = seeds). "
        "See [settings](../concepts/settings.md) for what the numbers mean for your choice of settings.",
        "",
    ]
    if title_note:
        lines += [title_note, ""]
    lines += _protocol(rows)
    lines += [
        "![test accuracy vs batch size](accuracy_vs_batch.png)",
        "",
        "![test accuracy vs learning rate at batch 32](accuracy_vs_lr.png)",
        "",
    ]
    for ds in datasets:
        keys = [k for k in summary if k[0] == ds]
        methods = sorted({k[1] for k in keys}, key=lambda m: (m.split("[")[0] not in BASE_METHODS, m))
        batches = sorted({k[2] for k in keys})
        lines += [f"## {ds}", "", "| method | " + " | ".join(f"batch {b}" for b in batches) + " |"]
        lines.append("|---|" + "---|" * len(batches))
        for m in methods:
            cells = []
            for b in batches:
                s = summary.get((ds, m, b))
                if s is None:
                    cells.append("–")
                    continue
                lr, mean, std, n = s["best"]
                cells.append(f"{mean:.2f} ± {std:.2f} (lr {lr:g}, n={n})")
            lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
        bn = {b: summary[(ds, "batchnorm", b)]["best"][1] for b in batches if (ds, "batchnorm", b) in summary}
        if bn:
            lines += ["", "Difference to `batchnorm` (points, best LR each):", ""]
            lines.append("| method | " + " | ".join(f"batch {b}" for b in batches) + " |")
            lines.append("|---|" + "---|" * len(batches))
            for m in methods:
                if m == "batchnorm":
                    continue
                cells = []
                for b in batches:
                    s = summary.get((ds, m, b))
                    cells.append(f"{s['best'][1] - bn[b]:+.2f}" if s is not None and b in bn else "–")
                lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
        lines += ["", f"Full learning-rate sweep ({ds}): mean ± std (diverged runs count as chance)", ""]
        lines += ["| method | batch | " + "lr: acc |", "|---|---|---|"]
        for m in methods:
            for b in batches:
                s = summary.get((ds, m, b))
                if s is None:
                    continue
                cells = ", ".join(
                    f"{lr:g}: {v[0]:.1f}±{v[1]:.1f}" + (f" ({v[3]} div.)" if v[3] else "")
                    for lr, v in s["sweep"].items()
                )
                lines.append(f"| `{m}` | {b} | {cells} |")
        lines.append("")
    if ablation_rows:
        lines += _ablation(ablation_rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    _plots(summary, datasets, out)


METHOD_NOTES = {
    "batchnorm": "BatchNorm2d after every conv (batch statistics in training, running statistics in evaluation)",
    "groupnorm": "`nn.GroupNorm` after every conv, groups of 4 channels (at most 32 groups): per-sample statistics",
    "gn_ws": "`groupnorm` after Weight-Standardized convs (each filter to zero mean and unit variance before use; "
    "Qiao et al. 2019), the strongest published small-batch fix",
    "frn": "Filter Response Normalization + TLU (Singh & Krishnan 2020) in place of every BatchNorm + ReLU: "
    "`max(gamma * x / sqrt(mean_HW(x^2) + 1e-6) + beta, tau)`; per sample, no batch statistics (before a "
    "residual sum without TLU; the ReLU after the sum stays)",
    "msr_replace": "the BatchNorm network adopted by `MeanShiftRejection(batchnorm='replace')` (defaults): every "
    "BatchNorm becomes a per-channel scale and bias",
    "msr_replace_noise": "`msr_replace` + `NoiseInjection()` (defaults): what a user of a BatchNorm model gets from "
    "the two callbacks as they ship",
    "none": "no normalisation, PyTorch's default conv init, conv biases",
    "affine": "a learnable per-channel scale and bias after every conv (no statistics), default init",
    "msr": "`MeanShiftRejection()` with its defaults, no normalisation, conv biases",
    "msr_noise": "`MeanShiftRejection()` + `NoiseInjection()` (its defaults), no normalisation",
    "msr_affine": "`MeanShiftRejection()` + a learnable per-channel scale and bias after every conv (the "
    "authors' per-filter gain; what `batchnorm='replace'` leaves of a BatchNorm)",
    "msr_affine_noise": "`msr_affine` + `NoiseInjection()`",
    "agc": "Deep Control: `AutomaticGainControl` (default arguments) after every conv, the layer `DeepControl()` "
    "puts in place of BatchNorm",
    "msr_agc": "`agc` + `MeanShiftRejection()`",
    "msr_agc_noise": "`agc` + `MeanShiftRejection()` + `NoiseInjection()`",
}


def _protocol(rows: list[dict]) -> list[str]:
    epochs: dict[str, dict[int, set]] = {}
    for r in rows:
        epochs.setdefault(section(r), {}).setdefault(int(r["batch_size"]), set()).add(int(r["epochs"]))
    budget = "; ".join(
        f"{ds}: " + ", ".join(f"batch {b}: {'/'.join(map(str, sorted(e)))}" for b, e in sorted(by_b.items()))
        for ds, by_b in sorted(epochs.items())
    )
    bases = sorted({r["method"].split("[")[0] for r in rows})
    lines = [
        "## Protocol",
        "",
        "* **Networks** (the same per table for every method): `vgg` -- a small VGG-style CNN, two 3x3 convs "
        "per stage, max-pool after each stage, global average pool and a linear head; digits 8x8: 2 stages, "
        "convs 16,16,32,32; shapes 12x12: 3 stages, convs 8,8,16,16,32,32; Fashion-MNIST 28x28: 4 stages, "
        "convs 16,16,32,32,64,64,64,64. `resnet20` -- the CIFAR-style ResNet-20 of He et al. (3x3 stem, 3 stages "
        "of 3 basic blocks, 16/32/64 channels, 1x1 conv + BatchNorm projection shortcuts, global average pool, "
        "linear head), written with BatchNorm and ReLU as users write it; `resnet8` -- the same with one block per "
        "stage. Only the layer after each conv "
        "and the callbacks differ between methods; the MSR variants have no normalisation "
        "layer anywhere when they train (checked per run: column `norm_layers` of the CSV; the `msr_replace*` "
        "rows start from the BatchNorm network and `MeanShiftRejection(batchnorm='replace')` swaps it).",
        "* **Training**: SGD, momentum 0.9, weight decay 5e-4 on all parameters, cross-entropy, per-step cosine "
        "decay to 0, no warm-up (except where an ablation says so). Learning rates are given for batch 32 and "
        "scaled by sqrt(batch / 32); every method gets the same base grid, some also extra LRs where a "
        "method's best LR was at the edge of the grid (see the full sweep below). Epochs per batch size "
        f"(smaller batches take more steps per epoch, so they get fewer epochs; `epochs_for`): {budget}.",
        "* **Evaluation**: test accuracy after the last step (no early stopping). The LR is picked by the mean "
        "test accuracy over seeds -- optimistic in the same way for every method. A run whose loss turns "
        "non-finite is stopped and counts as chance.",
        "* **Tasks**: `digits` -- scikit-learn's 1797 8x8 handwritten digits, fixed stratified 80/20 split; "
        "`shapes` -- generated 12x12 images of 10 shape and texture classes (disk, ring, square, outline, "
        "triangle, plus, cross, horizontal/vertical stripes, checker) at random position, size and angle, each "
        "image with its own brightness offset U(-2, 2), a random illumination ramp, a contrast U(0.25, 1) "
        "and white noise (std 0.25); 1000 train / 1000 test images from disjoint seeds. Why it is a fair "
        "test: the nuisances are per image, not per batch, so BatchNorm's batch statistics cannot remove them "
        "and every method has to learn to ignore them; they are the spatial *common-mode* MSR claims to "
        "reject, so the task tests that claim directly (and is by construction friendly to zero-mean "
        "kernels -- read it next to `digits`, which is neutral); `fashion_mnist` -- Zalando's Fashion-MNIST "
        "(28x28 grey, 10 classes) read by `torchvision.datasets.FashionMNIST`, standardised, a fixed random "
        "subset (seed 0) of the 60k training and 10k test images where the table says so (`N train images`), "
        "training batches randomly cropped after zero padding by 2 pixels and flipped horizontally. Its tables "
        "are a short budget that fits a shared 2-core CPU (a few thousand images, the epochs above: 80 steps at "
        "batch 128): they rank how fast each method trains as much as where it would end; `waves` -- the one "
        "1-D task, for `--arch cnn1d`: generated sequences of 128 samples, 12 classes (sine or square wave, 6 "
        "frequency bands), each with its own phase, amplitude, DC offset N(0, 0.5) and white noise of unit std; "
        "3000 train / 2000 test sequences from disjoint seeds, no augmentation.",
        "* **Methods**:",
    ]
    lines += [f"    * `{b}`: {METHOD_NOTES.get(b, '')}" for b in bases]
    lines += [
        "    * `name[key=value,...]`: the method with changed settings (`init_magnitude`, `alpha`, `mode`, "
        "`keep_magnitude`, `calibrate`, `residual_scale`, `adaptive_clip` (`none`: off), `include_stem` of "
        "`MeanShiftRejection`; "
        "`noise_scale`, `noise_shift`, `noise_schedule` and "
        "`noise_position` (`conv`: conv outputs, `affine`: after the per-channel affine, `relu`: after the "
        "activation) of `NoiseInjection`; `warmup`: fraction of the steps with linear LR warm-up; `clip`: the "
        "Trainer's `gradient_clip_val` (norm); `unit_clip`: NFNets' unit-wise adaptive gradient clipping with "
        "this factor (every parameter but the classifier's; Brock et al. 2021), `filter_clip` the same on the "
        "filters only (weights of 2 or more dims); `conv_lr`: LR multiplier of "
        "the conv weights (a second param group); `wd`, `momentum`, `nesterov` (1: on): SGD's; `lsuv`: after "
        "zero-mean init, "
        "scale each conv so that its output has unit RMS on 256 training images (1: per layer, 2: per filter; "
        "data-dependent, LSUV-like)).",
        "",
    ]
    return lines


def _ablation(rows: list[dict]) -> list[str]:
    summary = summarize(rows)
    lines = [
        "## Ablation: the paper's ingredients",
        "",
        "From `ablation.csv` (same protocol; one task and batch size per table, sorted by the best mean). "
        "Δ is the difference to `batchnorm` in points at the best LR of each.",
        "",
    ]
    for ds, b in sorted({(k[0], k[2]) for k in summary}):
        keys = sorted((k for k in summary if k[0] == ds and k[2] == b), key=lambda k: -summary[k]["best"][1])
        ref = summary.get((ds, "batchnorm", b))
        lines += [
            f"### {ds}, batch {b}",
            "",
            "| variant | best lr | acc (%) | Δ vs batchnorm | sweep |",
            "|---|---|---|---|---|",
        ]
        for k in keys:
            lr, mean, std, n = summary[k]["best"]
            delta = f"{mean - ref['best'][1]:+.2f}" if ref else "–"
            sweep = ", ".join(f"{x:g}: {v[0]:.1f}" for x, v in summary[k]["sweep"].items())
            lines.append(f"| `{k[1]}` | {lr:g} | {mean:.2f} ± {std:.2f} (n={n}) | {delta} | {sweep} |")
        lines.append("")
    return lines


def _style(methods: list[str]) -> dict[str, dict]:
    """A distinct colour and marker per method (tab20 + markers); BatchNorm in black, so it stands out."""
    import matplotlib

    colors = matplotlib.colormaps["tab20"].colors
    markers = "osD^vP*Xh<>"
    others = [m for m in methods if m != "batchnorm"]
    style = {m: {"color": colors[i % len(colors)], "marker": markers[i % len(markers)]} for i, m in enumerate(others)}
    style["batchnorm"] = {"color": "black", "marker": "o", "linewidth": 2.2}
    return style


def _zoom(ax: Any, values: list[float]) -> None:
    """Y range that keeps most points readable: from just below the 10th percentile; says what is off-scale."""
    if not values:
        return
    ordered = sorted(values)
    low = max(0.0, ordered[len(ordered) // 10] - 3.0)
    ax.set_ylim(low, min(100.5, ordered[-1] + 2.0))
    hidden = sum(v < low for v in values)
    if hidden:
        ax.text(0.01, 0.01, f"{hidden} point(s) below the axis", transform=ax.transAxes, fontsize=7, va="bottom")


def _plots(summary: dict, datasets: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(datasets), 1)
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 5.6), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        methods = sorted({k[1] for k in summary if k[0] == ds})
        style = _style(methods)
        shown: list[float] = []
        for m in methods:
            batches = sorted(k[2] for k in summary if k[0] == ds and k[1] == m)
            means = [summary[(ds, m, b)]["best"][1] for b in batches]
            stds = [summary[(ds, m, b)]["best"][2] for b in batches]
            ax.errorbar(batches, means, yerr=stds, capsize=3, label=m, **style[m])
            shown += means
        _zoom(ax, shown)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("test accuracy (%) at best LR")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_batch.png", dpi=110)
    plt.close(fig)

    # accuracy vs LR at one batch size per dataset (the largest with most methods), all methods
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 5.6), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        batches = sorted({k[2] for k in summary if k[0] == ds})
        batch = 32 if 32 in batches else batches[-1]
        methods = sorted({k[1] for k in summary if k[0] == ds and k[2] == batch})
        style = _style(methods)
        for m in methods:
            sweep = summary[(ds, m, batch)]["sweep"]
            lrs = sorted(sweep)
            ax.errorbar(
                lrs, [sweep[lr][0] for lr in lrs], yerr=[sweep[lr][1] for lr in lrs], capsize=3, label=m, **style[m]
            )
        ax.set_ylim(0, min(100.5, ax.get_ylim()[1]))  # an accuracy never exceeds 100 %, whatever the error bar
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{ds}, batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_lr.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"methods: {', '.join(BASE_METHODS)}\noptions in name[...]: {', '.join(OPTIONS)}",
    )
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 8, 32, 128])
    parser.add_argument("--lrs", nargs="+", type=float, default=DEFAULT_LRS, help="learning rates at batch 32")
    parser.add_argument("--lr-scaling", choices=["sqrt", "linear", "none"], default="sqrt")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--best-lr-seeds",
        nargs="+",
        type=int,
        default=[],
        help="more seeds, run only at the best LR of each finished sweep (e.g. --seeds 0 --best-lr-seeds 1 2)",
    )
    parser.add_argument("--epochs", type=int, default=30, help="epochs at batch >= 32 (fewer below, see epochs_for)")
    parser.add_argument("--dataset", nargs="+", choices=sorted(TASKS), default=["digits", "shapes"])
    parser.add_argument(
        "--arch",
        nargs="+",
        choices=ARCHS,
        default=["vgg"],
        help="network(s): VGG-style, ResNet-20, ResNet-8 (one block per stage); cnn1d for the 1-D task (waves)",
    )
    data = parser.add_argument_group("Fashion-MNIST data (install: apt-get install -y dataset-fashion-mnist)")
    data.add_argument("--data-dir", type=Path, default=None, help="folder with the idx files or a torchvision root")
    data.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where the files are unpacked")
    data.add_argument("--download", action="store_true", help="let torchvision download the files into --cache-dir")
    data.add_argument("--train-size", type=int, default=None, help="fixed random subset of the 60k training images")
    data.add_argument("--test-size", type=int, default=None, help="fixed random subset of the 10k test images")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks")
    parser.add_argument("--csv", type=Path, default=None, help="result file (default: OUT/accuracy.csv)")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests use it)")
    parser.add_argument("--progress-bar", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--report-only", action="store_true", help="only rebuild accuracy.md and the plots")
    parser.add_argument("--no-report", action="store_true", help="do not rebuild accuracy.md and the plots")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return parser.parse_args(argv)


def _run_plan(plan: list[tuple], tasks: dict, csv_path: Path, progress: bool) -> None:
    """Run every configuration of ``plan`` not in the CSV yet, appending each row as it finishes."""
    done = {_key(r) for r in read_rows(csv_path)}
    todo = [p for p in plan if p not in done]
    print(f"{len(plan)} configurations, {len(plan) - len(todo)} already in {csv_path}, {len(todo)} to run", flush=True)
    for i, p in enumerate(todo):
        if p in {_key(r) for r in read_rows(csv_path)}:
            continue  # finished meanwhile by a parallel sweep on the same CSV
        ds, arch, _, m, b, lr, s, ep = p
        try:
            row = run_one(tasks[ds], m, b, lr, s, ep, progress, arch=arch)
        except NotImplementedError as err:
            print(f"[{i + 1}/{len(todo)}] skip {p}: {err}")
            continue
        append_row(csv_path, row)
        print(f"[{i + 1}/{len(todo)}] " + json.dumps(row), flush=True)


def best_lr_plan(plan: list[tuple], rows: list[dict], seeds: list[int]) -> list[tuple]:
    """More seeds at the best learning rate of every setting of ``plan`` whose whole LR sweep is in ``rows``.

    The best LR is chosen on the sweep's own seed (:func:`_accuracy_models.choose_lr`); a setting whose sweep is not
    finished yet is left out (and said so), so a later call picks it up.
    """
    by_setting: dict[tuple, set] = {}
    for ds, arch, n, m, b, lr, _, ep in plan:
        by_setting.setdefault((ds, arch, n, m, b, ep), set()).add(lr)
    results: dict[tuple, dict[float, dict[int, float]]] = {}
    for r in rows:
        k = _key(r)
        setting = (k[0], k[1], k[2], k[3], k[4], k[7])
        if setting in by_setting:  # a configuration two sweeps both ran counts once
            results.setdefault(setting, {}).setdefault(k[5], {}).setdefault(int(r["seed"]), float(r["test_acc"]))
    extra = []
    for setting, lrs in by_setting.items():
        swept = results.get(setting, {})
        if not lrs <= set(swept):
            print(f"best-LR seeds: the sweep of {setting} is not finished ({len(lrs & set(swept))}/{len(lrs)} LRs)")
            continue
        best = choose_lr(swept)
        ds, arch, n, m, b, ep = setting
        extra += [(ds, arch, n, m, b, best, s, ep) for s in seeds]
    return extra


def load_task(name: str, args: argparse.Namespace, max_train: Optional[int]) -> Any:
    """The task ``name`` with the data options of the command line (``--data-dir`` etc. for Fashion-MNIST)."""
    if name != "fashion_mnist":
        return TASKS[name](max_train=max_train)
    try:
        return TASKS[name](
            max_train=max_train,
            train_size=args.train_size,
            test_size=args.test_size,
            data_dir=args.data_dir,
            cache_dir=args.cache_dir,
            download=args.download,
        )
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_msr"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    csv_path = args.csv or args.out / "accuracy.csv"
    max_train = None
    if args.tiny:
        max_train = 64
        args.epochs = min(args.epochs, 2)
    if not args.report_only:
        for spec in args.methods:
            parse_method(spec)  # fail early on a typo
        tasks = {ds: load_task(ds, args, max_train) for ds in args.dataset}
        plan = [
            (ds, arch, len(tasks[ds].y_train), m, b, scaled_lr(lr, b, args.lr_scaling), s, epochs_for(b, args.epochs))
            for s in args.seeds  # seed outermost: a sweep stopped early has every setting with fewer seeds
            for ds in args.dataset
            for arch in args.arch
            for b in args.batch_sizes
            for m in args.methods
            for lr in args.lrs
        ]
        _run_plan(plan, tasks, csv_path, args.progress_bar)
        if args.best_lr_seeds:  # the second stage: more seeds at the best LR of every finished sweep
            _run_plan(best_lr_plan(plan, read_rows(csv_path), args.best_lr_seeds), tasks, csv_path, args.progress_bar)
    if not args.no_report:
        rows = read_rows(csv_path)
        ablation = args.out / "ablation.csv"
        if rows:
            write_report(rows, args.out, ablation_rows=read_rows(ablation) if ablation != csv_path else None)
            print(f"wrote {args.out / 'accuracy.md'}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
