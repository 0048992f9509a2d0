"""The long run and the small-batch sweep on Fashion-MNIST, and the 1-D task, summarised from their result files.

All are ``benchmarks/accuracy.py`` sweeps (resumable; the commands are in the page this writes):

* ``docs/benchmarks/longrun.csv`` -- all 60 000 training images, 10 epochs, batch 128, a ResNet-8 (the ResNet-20 with
  one block per stage), BatchNorm against the MSR defaults, each method's LR swept on seed 0 and seed 1 run at the best;
* ``docs/benchmarks/smallbatch.csv`` -- 5 000 images, 2 epochs, batch 8, 4 and 2, a ResNet-20: BatchNorm, GroupNorm,
  GroupNorm + Weight Standardization, FRN and the MSR defaults, each at the best LR of its own sweep (and the same
  on the small VGG);
* ``docs/benchmarks/mechanism.csv`` -- the tests of issue 26's hypotheses (scale-invariant filters, the noise, the
  residual branches' start) against the defaults and BatchNorm, per task;
* ``docs/benchmarks/waves.csv`` -- the 1-D task (``--dataset waves --arch cnn1d``), batch 64, 8 and 1: the same
  peers and the MSR defaults, each at the best LR of its own sweep. No default was chosen on it.

Writes ``docs/benchmarks/long-run-small-batch.md``: each method at its best learning rate (mean over the seeds run
there) and every swept learning rate, with the number of seeds, so what is missing shows.

Usage::

    python benchmarks/accuracy_summary.py
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _accuracy_models import choose_lr

ARCH_NAMES = {
    "resnet8": "ResNet-8 (one block per stage)",
    "resnet20": "ResNet-20",
    "vgg": "VGG (the small VGG of `--arch vgg`)",
}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
ORDER = (
    "msr_replace_noise",
    "msr_replace_noise[residual_scale=1]",
    "msr_replace_noise[mode=kernel]",
    "batchnorm",
    "groupnorm",
    "gn_ws",
    "frn",
)
# the small-batch sweeps' command lines: methods, batch sizes, learning rates (for batch 32)
SMALL_SWEEPS = {
    "resnet20": ("msr_replace_noise batchnorm groupnorm gn_ws frn", "8 4 2", "0.0125 0.025 0.05 0.1 0.2 0.4"),
    "vgg": ("msr_replace_noise batchnorm groupnorm gn_ws frn", "8 4 2", "0.0125 0.025 0.05 0.1 0.2 0.4"),
    "resnet8": (
        '"msr_replace_noise" "msr_replace_noise[residual_scale=1]" batchnorm groupnorm gn_ws',
        "8 2",
        "0.00625 0.0125 0.025 0.05 0.1",
    ),
}
NAMES = {
    "msr_replace_noise": "MSR defaults",
    "msr_replace_noise[residual_scale=1]": "MSR defaults + `residual_scale=1`",
    "msr_replace_noise[mode=kernel]": "MSR defaults + `mode=kernel` (the defaults before 2026-12-07)",
    "batchnorm": "BatchNorm",
    "groupnorm": "GroupNorm",
    "gn_ws": "GroupNorm + WS",
    "frn": "FRN",
    "msr_replace": "MSR defaults without `NoiseInjection`",
    "msr_agc_noise": "MSR + noise + Deep Control (`AutomaticGainControl` after every conv, built in)",
}


def best_by_setting(path: Path) -> dict[tuple, dict]:
    """``(arch, batch, method) -> {lr, mean, std, n, sweep: {lr: (mean, n)}, seconds}``.

    The best LR is chosen on the sweep's own seed (:func:`_accuracy_models.choose_lr`) and reported as the mean over
    every seed run there.
    """
    runs: dict[tuple, dict[float, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    seconds: dict[tuple, float] = defaultdict(float)
    for row in csv.DictReader(path.open()):
        key = (row["arch"], int(row["batch_size"]), row["method"])
        lr, seed = float(row["lr"]), int(row["seed"])
        if seed in runs[key][lr]:  # two sweeps sharing the file ran the same configuration: counted once
            continue
        runs[key][lr][seed] = 100 * float(row["test_acc"])
        seconds[key] += float(row["seconds"])
    result = {}
    for key, sweep in runs.items():
        best = choose_lr(sweep)
        values = list(sweep[best].values())
        result[key] = {
            "lr": best,
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values),
            "sweep": {lr: (statistics.mean(v.values()), len(v)) for lr, v in sorted(sweep.items())},
            "seconds": seconds[key],
        }
    return result


def _methods(found: Any) -> list[str]:
    """The methods found, the peers of :data:`ORDER` first, then variants (``msr_replace_noise[...]``) by name."""
    found = set(found)
    return [m for m in ORDER if m in found] + sorted(found - set(ORDER))


def _name(method: str) -> str:
    """The display name of a method: a peer's name, or a variant's options on the MSR defaults."""
    if method in NAMES:
        return NAMES[method]
    base, _, options = method.partition("[")
    if "keep_bn=1" in options:  # BatchNorm kept: MSR's zero-mean constraint is the only change
        rest = [o for o in options[:-1].split(",") if o != "keep_bn=1"]
        held = "kernels" if "mode=kernel" in rest else "filters"  # the filter-wise default since 2026-12-07
        return f"BatchNorm + zero-mean {held} (`keep_bn=1`" + (f", `{','.join(rest)}`)" if rest else ")")
    return f"{NAMES.get(base, base)} + `{options[:-1]}`" if options else method


def _cell(entry: Optional[dict], grid: int = 0) -> str:
    """The best LR's accuracy; ``grid``: how many LRs the usual sweep has (a shorter one -- another grid, or a sweep
    still running -- says how many it has)."""
    if entry is None:
        return "--"
    spread = f" ± {entry['std']:.2f}" if entry["std"] is not None else ""
    partial = f", a {len(entry['sweep'])}-LR sweep" if len(entry["sweep"]) < grid else ""
    lrs = list(entry["sweep"])
    edge = ", at the grid's edge" if len(lrs) > 1 and entry["lr"] in (lrs[0], lrs[-1]) else ""
    return f"{entry['mean']:.2f}{spread} (lr {entry['lr']:g}, n={entry['n']}{partial}{edge})"


def _mechanism(path: Path) -> list[str]:
    """The hypothesis tests of issue 26: every method of ``path`` per task, at its best LR and at every LR."""
    tasks: dict[tuple, list[dict]] = defaultdict(list)
    for row in csv.DictReader(path.open()):
        tasks[(row["arch"], int(row["n_train"]), int(row["epochs"]), int(row["batch_size"]))].append(row)
    lines = [
        "## Hypothesis tests: what closes the gap (issue 26)",
        "",
        "`python benchmarks/accuracy.py --dataset fashion_mnist --arch <arch> --train-size <n> --test-size 5000 "
        "--methods <methods> --batch-sizes <batch> --lrs <grid> --seeds 0 --best-lr-seeds 1 --epochs <epochs> "
        "--csv docs/benchmarks/mechanism.csv` (batch 128: `--lr-scaling none`, learning rates as given; below 32: "
        "given for batch 32 and scaled by sqrt(batch / 32)). `spherical=1`: every folded-scale filter, the free "
        "stem's too, trained as a weight-normalised one (the benchmark's own implementation, which trains the same "
        "weights as `MeanShiftRejection(scale_invariant=True)`); `residual_scale`: the calibrated scale of the "
        "residual branches' last layers; `deep_control=1`: `DeepControl()` before `MeanShiftRejection` on the "
        "BatchNorm network, the user's path to the gain control the Deep Control row builds in; `adaptive_clip`: "
        "the clip's bound (default 0.1); `gain_reparam=1`: every folded scale trained as BatchNorm's gamma, a "
        "trained factor starting at 1 on top of the calibrated scale; `keep_bn=1`: the BatchNorm network kept, "
        "with MSR's zero-mean filters (kernels with `mode=kernel`; the stem free) and nothing else "
        "(`calibrate=False, adaptive_clip=None`); "
        "`mode=kernel`: the mean over each kernel, the paper's constraint, instead of each whole filter (Gradient "
        "Centralization's group, the default since 2026-12-07; rows run before then are labelled `mode=kernel`); "
        "`alpha=0`: no projection (the kernels drawn zero-mean, then free); `msr_exclude=<classifier>`: the "
        "classifier not clipped; `wd`: SGD's weight decay (5e-4 otherwise); `nesterov=1,warmup=0.3`: a second "
        "training recipe, not used to choose the defaults -- Nesterov momentum and a linear warm-up over the first "
        "30 % of the steps before the cosine decay (one-cycle-like); `noise_scale`, `noise_shift`: `NoiseInjection`'s "
        "multiplicative and additive spread (0.1 and 0 by default; `noise_scale=0`: no noise). Below 32 the peers' "
        "rows, and the defaults', are those of the "
        "small-batch sweep above.",
        "",
    ]
    for (arch, n, epochs, batch), rows in sorted(tasks.items(), key=lambda item: (-item[0][3], item[0][0])):
        sweep: dict[str, dict[float, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
        for row in rows:
            sweep[row["method"]][float(row["lr"])].setdefault(int(row["seed"]), 100 * float(row["test_acc"]))
        lines += [
            f"### {arch}, {n} images, {epochs} epochs, batch {batch}",
            "",
            "| method | at its best LR | every LR (mean, seeds) |",
            "|---|---|---|",
        ]
        for method in _methods(sweep):
            by_lr = sweep[method]
            best = choose_lr(by_lr)
            values = list(by_lr[best].values())
            entry = {
                "lr": best,
                "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "n": len(values),
                "sweep": {lr: (statistics.mean(v.values()), len(v)) for lr, v in sorted(by_lr.items())},
            }
            every = ", ".join(f"{lr:g}: {m:.1f} (n={k})" for lr, (m, k) in entry["sweep"].items())
            lines.append(f"| {_name(method)} | {_cell(entry)} | {every} |")
        lines.append("")
    return lines


def _sweep_tables(
    runs: dict[tuple, dict], arch: str, methods: list[str], batches: list[int], chance: int, grid: int = 0
) -> list[str]:
    """The tables of a sweep over batch sizes: each method at its best LR per batch size, then every LR it ran, then
    the runs' wall clock. ``chance``: the accuracy in % a diverged run counts as; ``grid`` as in :func:`_cell`."""
    lines = ["| method | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for method in methods:
        cells = [_cell(runs.get((arch, b, method)), grid) for b in batches]
        lines.append(f"| {_name(method)} | " + " | ".join(cells) + " |")
    lines += ["", f"Every learning rate (mean, seeds; a diverged run counts as chance, about {chance} %):", ""]
    lines += ["| method | batch | lr: accuracy |", "|---|---|---|"]
    for method in methods:
        for b in batches:
            entry = runs.get((arch, b, method))
            if entry is not None:
                sweep = ", ".join(f"{lr:g}: {m:.1f} (n={n})" for lr, (m, n) in entry["sweep"].items())
                lines.append(f"| {_name(method)} | {b} | {sweep} |")
    total = sum(e["seconds"] for key, e in runs.items() if key[0] == arch) / 60
    return [*lines, "", f"Wall clock of these runs: {total:.0f} min on a shared 2-core CPU.", ""]


def _waves(runs: dict[tuple, dict]) -> list[str]:
    """The 1-D task's table: each method at its best LR per batch size, then every LR."""
    batches = sorted({b for _, b, _ in runs}, reverse=True)
    methods = _methods(m for _, _, m in runs)
    lines = [
        "## A 1-D task: `waves`, a 1-D conv net (`cnn1d`), batch 64, 8 and 1 (not used to choose any default)",
        "",
        "`python benchmarks/accuracy.py --dataset waves --arch cnn1d --methods batchnorm msr_replace_noise groupnorm "
        'gn_ws "msr_replace_noise[mode=kernel]" --batch-sizes 64 8 1 --lrs 0.0125 0.025 0.05 0.1 0.2 0.4 --seeds 0 '
        "--best-lr-seeds 1 2 --epochs 10 --csv docs/benchmarks/waves.csv` (3 000 generated sequences of 128 samples, "
        "12 classes, 2 000 test sequences; four Conv1d + BatchNorm1d + ReLU layers; learning rates given for batch "
        "32, scaled by sqrt(batch / 32); 10 epochs at batch 64, 5 at batch 8, 2 at batch 1). Where a peer was best at "
        "a grid's edge its grid was extended: at batch 1 down to 0.003125, at batch 64 up to 1.6 (BatchNorm, "
        "GroupNorm + WS). The rows with one setting changed (`adaptive_clip`, `noise_scale`) are hypothesis tests "
        "at batch 8, the same protocol.",
        "",
    ]
    return lines + _sweep_tables(runs, "cnn1d", methods, batches, chance=8)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DOCS / "long-run-small-batch.md")
    parser.add_argument("--csv-dir", type=Path, default=DOCS, help="where longrun.csv and smallbatch.csv are")
    args = parser.parse_args(argv)
    lines = [
        "# The long run and small batches on Fashion-MNIST, and a 1-D task",
        "",
        "Written by `python benchmarks/accuracy_summary.py` from `longrun.csv`, `smallbatch.csv`, `waves.csv` and "
        "`mechanism.csv`. "
        "Test accuracy "
        "in %, each method at the best learning rate of its own sweep (chosen on seed 0; the mean over the seeds run "
        "there, `n` being that number of seeds). Learning rates are the ones used at that batch size. Protocol as in "
        "[accuracy](accuracy.md): SGD with momentum 0.9, weight decay 5e-4, cosine decay, random-crop augmentation.",
        "",
    ]
    long_path = args.csv_dir / "longrun.csv"
    if long_path.exists():
        runs = best_by_setting(long_path)
        lines += [
            "## The long run: all 60 000 images, 10 epochs, batch 128 (4 690 steps), ResNet-8",
            "",
            "`python benchmarks/accuracy.py --dataset fashion_mnist --arch resnet8 --methods <method> "
            "--batch-sizes 128 --lrs <grid> --lr-scaling none --seeds 0 --best-lr-seeds 1 --epochs 10 "
            "--csv docs/benchmarks/longrun.csv` (BatchNorm's grid 0.05 0.1 0.2, MSR's 0.1 0.2 0.4; the full "
            "10 000-image test set).",
            "",
            "| method | at its best LR | every LR (mean, seeds) | wall clock of its runs |",
            "|---|---|---|---|",
        ]
        for method in _methods(m for _, _, m in runs):
            entry = runs.get(("resnet8", 128, method))
            if entry is None:
                continue
            sweep = ", ".join(f"{lr:g}: {m:.2f} (n={n})" for lr, (m, n) in entry["sweep"].items())
            lines.append(f"| {_name(method)} | {_cell(entry)} | {sweep} | {entry['seconds'] / 60:.0f} min |")
        bn = runs.get(("resnet8", 128, "batchnorm"))
        for method in _methods(m for _, _, m in runs):
            msr = runs.get(("resnet8", 128, method))
            if msr and bn and method.startswith("msr"):
                gap = msr["mean"] - bn["mean"]
                lines += ["", f"{_name(method)} against BatchNorm at convergence: **{gap:+.2f} points**."]
        lines.append("")
    small_path = args.csv_dir / "smallbatch.csv"
    if small_path.exists():
        runs = best_by_setting(small_path)
        archs = [a for a in ("resnet8", "resnet20", "vgg") if any(key[0] == a for key in runs)]
        for arch in archs:
            batches = sorted({b for a, b, _ in runs if a == arch}, reverse=True)
            methods, sizes, lrs = SMALL_SWEEPS.get(arch, SMALL_SWEEPS["resnet20"])
            lines += [
                f"## Small batches: 5 000 images, 2 epochs, {ARCH_NAMES[arch]}",
                "",
                f"`python benchmarks/accuracy.py --dataset fashion_mnist --arch {arch} --train-size 5000 "
                f"--test-size 5000 --methods {methods} --batch-sizes {sizes} --lrs {lrs} --seeds 0 --best-lr-seeds 1 "
                "--epochs 2 --csv docs/benchmarks/smallbatch.csv` (learning rates given for batch 32, scaled by "
                "sqrt(batch / 32)).",
                "",
            ]
            lengths = [len(e["sweep"]) for key, e in runs.items() if key[0] == arch]
            grid = max(set(lengths), key=lengths.count)  # the usual grid; a sweep extended further is not "so far"
            shown = [m for m in ORDER if any((arch, b, m) in runs for b in batches)]
            lines += _sweep_tables(runs, arch, shown, batches, chance=10, grid=grid)
    waves_path = args.csv_dir / "waves.csv"
    if waves_path.exists():
        lines += _waves(best_by_setting(waves_path))
    mechanism_path = args.csv_dir / "mechanism.csv"
    if mechanism_path.exists():
        lines += _mechanism(mechanism_path)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
