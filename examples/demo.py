"""``make demo``: the same small CNN on scikit-learn's digits, with BatchNorm and with Mean Shift Rejection.

Trains :class:`examples.digits.model.SmallCNN` at each batch size with

* **BatchNorm** -- ``SmallCNN(norm="batchnorm")``, no callback;
* **no normalisation** -- ``SmallCNN(norm="none")`` (conv biases, PyTorch's default initialisation), no
  callback: what the network does without BatchNorm and without MSR;
* **MSR + noise** -- the *same* ``SmallCNN(norm="batchnorm")`` as the BatchNorm run, with the callbacks at
  their defaults: ``MeanShiftRejection(batchnorm="replace")`` (which folds each BatchNorm's per-channel scale
  into the conv before it at fit setup, calibrates the network on the first batch and then keeps every conv
  filter but the stem's zero-mean) and ``NoiseInjection()``: no batch statistics anywhere, and no change to
  the LightningModule,

then prints a table (test accuracy, epochs, wall time) and writes ``results.md``, ``results.csv`` and
``accuracy_vs_batch_size.png`` into ``--out``.

Fair settings: both methods share the network (apart from the normalisation layer), the data split, the
seed, the number of epochs (10; 2 below batch size 8, where batch 1 still makes more steps than batch 8), SGD
with momentum 0.9 and weight decay 5e-4, and a cosine schedule with a short linear warm-up. The learning
rate is chosen per method at batch size 64 from a sweep over
0.02, 0.05, 0.1, 0.2, 0.5 (best validation accuracy after 10 epochs, one seed) and scaled linearly with the
batch size below 64 (the usual linear-scaling rule) and with its square root below 8, see ``BASE_LR`` and
``learning_rate``. The test split is only used for the
reported numbers. One seed and 360 test images: differences below about one point are noise; the accuracy
benchmark (``benchmarks/accuracy.py``) has seeds, per-batch-size sweeps and a second task.

Run from the repository root::

    python examples/demo.py --out demo_results
    python examples/demo.py --out /tmp/quick --batch-sizes 64 8 --max-epochs 5
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run as a script from anywhere: make `examples` importable
    sys.path.insert(0, str(_ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

import lightning_msr  # noqa: E402
from examples.digits.data import DigitsDataModule  # noqa: E402
from examples.digits.model import SmallCNN  # noqa: E402
from lightning_msr.functional import eligible_weights, mean_shift  # noqa: E402

__all__ = ["BASE_LR", "METHODS", "DemoResult", "Method", "epochs_at", "run_demo", "train_once", "write_results"]


@dataclass(frozen=True)
class Method:
    """One column of the comparison: which normalisation the network has and which callbacks the Trainer gets."""

    name: str
    norm: str
    callbacks: Callable[[int], list[Callback]]


def _no_callbacks(seed: int) -> list[Callback]:
    return []


def _msr_callbacks(seed: int) -> list[Callback]:
    # the defaults as shipped: BatchNorm swapped for a per-channel scale folded into each conv, zero-mean
    # kernels calibrated on the first batch, adaptive clipping, and the paper's training noise
    return [
        lightning_msr.MeanShiftRejection(batchnorm="replace", seed=seed),
        lightning_msr.NoiseInjection(seed=seed),
    ]


METHODS: dict[str, Method] = {
    "BatchNorm": Method("BatchNorm", "batchnorm", _no_callbacks),
    "no normalisation": Method("no normalisation", "none", _no_callbacks),
    "MSR + noise": Method("MSR + noise", "batchnorm", _msr_callbacks),
}

# Peak learning rate at batch size 64: for each method the best of {0.02, 0.05, 0.1, 0.2, 0.5} on the
# validation split after 10 epochs (seed 0, this script's other settings). Validation accuracy, BatchNorm:
# 98.3 / 99.4 / 98.9 / 98.3 / 98.9 %; no normalisation: 12.2 / 83.3 / 85.6 / 87.8 / 10.0 % (diverges at 0.5);
# MSR + noise at the defaults: 97.2 / 97.2 / 97.8 / 97.2 / 10.0 % (diverges at 0.5; with the earlier default
# `mode="kernel"` 96.1 / 96.7 / 98.3 / 96.7 / 10.0 %, the same best). Scaled linearly below batch size 64.
BASE_LR: dict[str, float] = {"BatchNorm": 0.05, "no normalisation": 0.2, "MSR + noise": 0.1}
REFERENCE_BATCH_SIZE = 64


# Below this batch size the demo trains for fewer epochs (see `epochs_at`): at batch 1 an epoch is 1257 steps.
SMALL_BATCH = 8


def epochs_at(batch_size: int, max_epochs: int) -> int:
    """Epochs at ``batch_size``: ``max_epochs``, or at batch sizes below 8 a fifth of it (at least 1).

    Batch 1 then still takes more optimizer steps (2 epochs of 1257) than batch 8 does in 10 epochs (1570), and
    the demo finishes in a few minutes instead of spending most of its time at batch 1."""
    return max_epochs if batch_size >= SMALL_BATCH else max(1, max_epochs // 5)


def learning_rate(method: str, batch_size: int) -> float:
    """The learning rate used for ``method`` at ``batch_size``: ``BASE_LR`` scaled linearly below batch 64, and with
    the square root of the batch size below batch 8, where the shorter run (:func:`epochs_at`) would leave linear
    scaling's tiny steps undertrained (at batch 1 it gives 2.8x linear scaling's learning rate; the accuracy
    benchmark's best batch-1 learning rates on digits were of that size)."""
    if batch_size >= SMALL_BATCH:
        return BASE_LR[method] * min(1.0, batch_size / REFERENCE_BATCH_SIZE)
    return BASE_LR[method] * SMALL_BATCH / REFERENCE_BATCH_SIZE * math.sqrt(batch_size / SMALL_BATCH)


@dataclass
class DemoResult:
    """One row of the results table."""

    method: str
    batch_size: int
    lr: float
    epochs: int
    steps: int
    val_acc: float
    test_acc: float
    seconds: float
    mean_shift: float  # the worst conv kernel's |mean| / weight RMS after training (0 = on the isocline)


def train_once(
    method: str,
    batch_size: int,
    max_epochs: int,
    *,
    lr: Optional[float] = None,
    seed: int = 0,
    max_train_samples: Optional[int] = None,
    progress_bar: bool = True,
    default_root_dir: Optional[str] = None,
) -> DemoResult:
    """Train and test one method at one batch size; return the row of the results table.

    Args:
        method: a key of ``METHODS``.
        batch_size: training batch size.
        max_epochs: number of epochs.
        lr: learning rate; ``None`` uses :func:`learning_rate`.
        seed: seed of ``seed_everything`` (weights, data order, noise).
        max_train_samples: train on the first ``max_train_samples`` images only (quick runs, tests).
        progress_bar: show Lightning's progress bar.
        default_root_dir: the Trainer's ``default_root_dir`` (nothing is written there: no logger, no checkpoint).
    """
    spec = METHODS[method]
    lr = learning_rate(method, batch_size) if lr is None else lr
    L.seed_everything(seed, verbose=False)
    datamodule = DigitsDataModule(batch_size=batch_size, max_train_samples=max_train_samples)
    model = SmallCNN(norm=spec.norm, lr=lr)
    callbacks = spec.callbacks(seed)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=max_epochs,  # validate once, at the end: the demo reports the last epoch
        default_root_dir=default_root_dir,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, datamodule=datamodule)
        seconds = time.perf_counter() - start
        val_acc = float(trainer.callback_metrics["val_acc"])
        (test,) = trainer.test(model, datamodule=datamodule, verbose=False)
    msr = [c for c in callbacks if isinstance(c, lightning_msr.MeanShiftRejection)]
    if msr:  # the kernels it keeps zero-mean (the stem is left free)
        worst = float(msr[0].current_mean_shift())
    else:
        worst = max(float(mean_shift(k.parameter, **k.layout_kwargs())) for k in eligible_weights(model))
    return DemoResult(
        method=method,
        batch_size=batch_size,
        lr=lr,
        epochs=trainer.current_epoch,
        steps=trainer.global_step,
        val_acc=val_acc,
        test_acc=float(test["test_acc"]),
        seconds=seconds,
        mean_shift=worst,
    )


def _markdown(results: Sequence[DemoResult]) -> str:
    lines = [
        "| method | batch size | learning rate | epochs | steps | val accuracy | test accuracy | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {r.batch_size} | {r.lr:g} | {r.epochs} | {r.steps} | {100 * r.val_acc:.1f}% "
            f"| {100 * r.test_acc:.1f}% | {r.seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"


def write_results(results: Sequence[DemoResult], out: Path) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and ``accuracy_vs_batch_size.png`` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "md": out / "results.md", "png": out / "accuracy_vs_batch_size.png"}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        for r in results:
            writer.writerow(asdict(r))
    paths["md"].write_text(
        "# make demo: BatchNorm vs Mean Shift Rejection on scikit-learn digits\n\n"
        "Same SmallCNN, same split, seed and optimizer (SGD, momentum 0.9, weight decay 5e-4, cosine schedule), the "
        "same epochs for every method (fewer below batch size 8: `epochs_at`); learning rate per method, scaled "
        "linearly below batch size 64 (see `examples/demo.py`). "
        "One seed, 360 test images: differences below about one point are noise.\n\n" + _markdown(results)
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for method in dict.fromkeys(r.method for r in results):
        rows = sorted((r for r in results if r.method == method), key=lambda r: r.batch_size)
        ax.plot([r.batch_size for r in rows], [100 * r.test_acc for r in rows], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r.batch_size for r in results}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("batch size")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("SmallCNN on scikit-learn digits")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["png"])
    plt.close(fig)
    return paths


def run_demo(
    out: Optional[Path] = None,
    batch_sizes: Sequence[int] = (64, 8, 1),
    methods: Sequence[str] = tuple(METHODS),
    max_epochs: int = 10,
    max_train_samples: Optional[int] = None,
    seed: int = 0,
    progress_bar: bool = True,
) -> list[DemoResult]:
    """Train every method at every batch size, print the table and (if ``out`` is given) write the results.

    Args:
        out: directory for ``results.md``, ``results.csv`` and the plot; ``None`` writes nothing.
        batch_sizes: training batch sizes to compare.
        methods: keys of ``METHODS``.
        max_epochs: epochs per run at batch 8 and above (the same for every method); fewer below, see
            :func:`epochs_at`.
        max_train_samples: train on a subset (quick runs, tests).
        seed: seed of every run.
        progress_bar: show Lightning's progress bar.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Expected `methods` to be among {list(METHODS)}, but got {unknown}.")
    results = []
    for batch_size in batch_sizes:
        for method in methods:
            print(f"\n== {method}, batch size {batch_size}, lr {learning_rate(method, batch_size):g}", flush=True)
            results.append(
                train_once(
                    method,
                    batch_size,
                    epochs_at(batch_size, max_epochs),
                    seed=seed,
                    max_train_samples=max_train_samples,
                    progress_bar=progress_bar,
                    default_root_dir=str(out) if out is not None else None,
                )
            )
    print("\n" + _markdown(results))
    if out is not None:
        paths = write_results(results, Path(out))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return results


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_results"), help="output directory")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 8, 1])
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--no-progress-bar", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op CPU threads (1 is fastest for 8x8 images and small batches)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    run_demo(
        args.out,
        batch_sizes=args.batch_sizes,
        max_epochs=args.max_epochs,
        max_train_samples=args.max_train_samples,
        seed=args.seed,
        progress_bar=not args.no_progress_bar,
    )
    print(f"total time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
