"""The model population: every torchvision classifier, adopted with the one-line defaults, at batch 1, 2 and 8.

A list of models in a test is a sample; this sweep is the population. For every classification constructor of
``torchvision.models.list_models(module=torchvision.models)`` (random weights, 10 classes), at every batch size,
on real images (scikit-learn's digits upsampled to 3 x 64 x 64, standardised):

1. **BatchNorm reference.** The unchanged model is trained with SGD (momentum 0.9) for ``--steps`` steps at each
   learning rate of ``--lrs``, largest first; the reference rate is the largest at which every loss is finite
   (``bn_lr``; empty when none is, e.g. BatchNorm at batch 1 on 1x1 maps). Its classifier-input RMS on the first
   batch, in training mode, is the reference signal.
2. **Each adoption** -- ``msr_replace_noise``: ``MeanShiftRejection(batchnorm="replace")`` + ``NoiseInjection()``;
   ``deep_control_msr``: ``DeepControl()`` + ``MeanShiftRejection()`` -- trains a copy of the same model at the
   reference rate (the smallest rate of the grid where BatchNorm has none) through a ``Trainer``, for at least
   ``--steps`` steps and at least 5 past the calibrating batches, and is checked for:

   * ``signal``: classifier-input RMS on the first batch after the calibration finished (a batch it did not
     see), in a run of forward passes only (the calibration alone), relative to BatchNorm's -- within 10x (0.1-10)
     passes; ``first_signal`` the same on the first calibrating batch. A model without BatchNorm (AlexNet, VGG
     without BN, SqueezeNet, the transformers) has no BatchNorm signal to match: its ratio is to the unchanged
     model at its default initialisation, reported, not required;
   * ``finite``: every loss finite (required where BatchNorm is finite at that rate);
   * ``max_loss``: the largest loss of the run, at most ``LOSS_FACTOR`` (100) times BatchNorm's largest at the
     same rate (``bn_max_loss``): a run whose losses stay finite but reach 1e3-1e10 has blown up all the same
     (rows from before that column was recorded are judged without it);
   * ``unmoved``: conv weights that did not change (0 passes);
   * ``eval_diff``: in eval mode, the largest difference between the outputs for 8 images passed as one batch
     and one by one, relative to the outputs' scale, on a float64 copy of the model (below 1e-3 passes: nothing
     depends on the batch; float64, so that the rounding of a run with huge activations does not pass for a batch
     dependence).

Every training run is seeded (``fit``'s ``seed``), so a row is reproduced by running its model again. Models are
built one at a time and freed. Models that cannot be adopted or trained here are listed with the reason
(e.g. above ``--max-params`` parameters, or an input size they refuse). Results are appended to ``--csv`` as they
finish, so an interrupted sweep resumes where it stopped; ``--table`` is rewritten from the CSV at the end::

    python benchmarks/zoo.py                      # the whole population (hours on 2 cores; resumable)
    python benchmarks/zoo.py --models resnet18 efficientnet_b3 --batch-sizes 2
    python benchmarks/zoo.py --table-only         # rewrite docs/benchmarks/zoo.md from the CSV
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import inspect
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torchvision
from torch import nn

import lightning_msr

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("msr_replace_noise", "deep_control_msr")
FIELDS = [
    "model", "family", "params_m", "size", "batch", "recipe", "lr", "bn_lr", "bn_max_loss", "steps",
    "calibration_steps", "signal", "first_signal", "finite", "max_loss", "unmoved", "convs", "eval_diff", "passed",
    "seconds", "note",
]  # fmt: skip
# Inputs some architectures need instead of 64x64 (they refuse smaller ones).
_SIZES = (64, 96, 128, 224)
# A run fails whose largest loss is above this many times BatchNorm's largest at the same rate: finite, but blown up.
# At the population's rates BatchNorm's own losses reach 10-100 (up to 650) at batch 1-2 and most of the defaults'
# runs stay within 10x of it; the runs that blew up (a looser clip, or batch 8 on some SE nets) reached 1e3-1e10.
LOSS_FACTOR = 100.0


def recipe_callbacks(recipe: str, msr_options: Optional[dict[str, Any]] = None) -> list[L.Callback]:
    """The callbacks of one adoption, at their defaults (``msr_options``: arguments for ``MeanShiftRejection``)."""
    options = msr_options or {}
    if recipe == "msr_replace_noise":
        return [lightning_msr.MeanShiftRejection(batchnorm="replace", **options), lightning_msr.NoiseInjection()]
    if recipe == "deep_control_msr":
        return [lightning_msr.DeepControl(), lightning_msr.MeanShiftRejection(**options)]
    raise ValueError(f"Expected `recipe` to be one of {RECIPES}, but got {recipe!r}.")


def _option(text: str) -> tuple[str, Any]:
    """``"key=value"`` with ``value`` read as a Python literal where it is one (``0.3``, ``True``), else a string."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"Expected `--msr-option` as KEY=VALUE (e.g. mode=filter), but got {text!r}.")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def classification_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def family(name: str) -> str:
    """The module a constructor lives in (``resnet``, ``efficientnet``, ``vision_transformer``, ...; timm's models,
    named ``timm/<name>``, as ``timm/<module>``)."""
    if name.startswith("timm/"):
        return "timm/" + _timm_module(name[5:])
    return torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]


def _timm_module(name: str) -> str:
    import timm

    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def digits(size: int, count: int = 600) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as 3 x size x size images (bilinear upsampling, standardised), shuffled with seed 0."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:count]
    return x[order].contiguous(), y[order].contiguous()


def build(name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("timm/"):  # timm's models, without weights (nothing is downloaded)
        import timm

        return timm.create_model(name[5:], pretrained=False, num_classes=10)
    if name == "maxvit_t" and size < 224:
        # maxvit_t's layers with 2x2 attention windows: its 7x7 windows need 224x224 inputs, 12x the compute
        return torchvision.models.MaxVit(
            input_size=(size, size), stem_channels=64, block_channels=[64, 128, 256, 512], block_layers=[2, 2, 5, 2],
            head_dim=32, stochastic_depth_prob=0.2, partition_size=2, num_classes=10,
        )  # fmt: skip
    kwargs: dict[str, Any] = {"num_classes": 10}
    if family(name) in ("vision_transformer",):
        kwargs["image_size"] = size
    if name in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    return torchvision.models.get_model(name, **kwargs)


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


class Classifier(L.LightningModule):
    """Records every loss and the classifier-input RMS of every training step."""

    def __init__(self, net: nn.Module, lr: float, forward_only: bool = False) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.forward_only = forward_only  # no backward, no step: the callbacks' first-batch work alone
        self.losses: list[float] = []
        self.head_rms: list[float] = []
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        self._head = linears[-1] if linears else None

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        self._seen = float(args[0].detach().double().square().mean().sqrt())

    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        x, y = batch
        self._seen = math.nan
        handle = self._head.register_forward_hook(self._record) if self._head is not None else None
        with torch.set_grad_enabled(not self.forward_only):
            logits = _logits(self.net(x))
        if handle is not None:
            handle.remove()
        if self._head is None:  # a conv head (squeezenet): the logits are what the classifier gives
            self._seen = float(logits.detach().double().square().mean().sqrt())
        loss = nn.functional.cross_entropy(logits, y)
        self.losses.append(float(loss))
        self.head_rms.append(self._seen)
        return None if self.forward_only else loss  # None: Lightning skips backward and the optimizer step

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def fit(
    net: nn.Module,
    lr: float,
    batch: int,
    steps: int,
    data: tuple,
    callbacks: Sequence[L.Callback],
    forward_only: bool = False,
    seed: int = 0,
) -> Classifier:
    """Train ``net`` for ``steps`` steps through a ``Trainer``, seeded with ``seed`` (the noise) and on one thread,
    so that running a model again reproduces its row (in a process set up the same way: the sum order of the CPU
    kernels chosen at start-up, e.g. under ``OMP_NUM_THREADS=1``, can differ). At these learning rates a run's tail
    amplifies last-bit differences: inception_v3 with Deep Control at batch 2 peaked at a loss of 28 in one process
    and 8e4 in another, same seed."""
    torch.manual_seed(seed)
    model = Classifier(net, lr, forward_only)
    x, y = data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=list(callbacks),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel sweeps: --shard
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, loader)
    finally:
        torch.set_num_threads(threads)
    return model


def blew_up(row: dict) -> bool:
    """The run's largest loss is above ``LOSS_FACTOR`` times BatchNorm's at the same rate (where that was recorded)."""
    reference = row.get("bn_max_loss") or ""
    return bool(reference and row.get("max_loss")) and float(row["max_loss"]) > LOSS_FACTOR * float(reference)


def failed_checks(row: dict, normalised: bool) -> list[str]:
    """The checks one adoption's row fails, by the table's marks: ``signal`` (not within 10x of BatchNorm's; a model
    without BatchNorm has none to match, only its default initialisation's), ``nan`` (a loss not finite where
    BatchNorm's are), ``loss`` (blown up past ``LOSS_FACTOR`` times BatchNorm's largest), ``moved`` (a conv did not
    move), ``eval`` (eval output depends on the batch)."""
    checks = {
        "signal": normalised and not 0.1 <= float(row["signal"]) <= 10,
        "nan": str(row["finite"]) != "True" and bool(row["bn_lr"]),
        "loss": blew_up(row),
        "moved": int(row["unmoved"] or 0) > 0,
        "eval": float(row["eval_diff"] or 0) >= 1e-3,
    }
    return [name for name, failed in checks.items() if failed]


def passes(row: dict, normalised: bool) -> bool:
    """The verdict on one adoption's row: no check of :func:`failed_checks` failed."""
    return not failed_checks(row, normalised)


def _finite(losses: Sequence[float]) -> bool:
    return bool(losses) and all(math.isfinite(v) for v in losses)


def eval_difference(net: nn.Module, x: torch.Tensor) -> float:
    """Largest |batched - one by one| output difference in eval mode, relative to the outputs' RMS, on a float64 copy
    of ``net``: the check is whether anything depends on the batch, not float32's rounding, which the activations of
    a blown-up run (1e3-1e4) raise to 10-20 % of its outputs (regnet_y_1_6gf at batch 8: 0.18 in float32, 1e-9 in
    float64)."""
    net = copy.deepcopy(net).double().eval()
    x = x.double()
    with torch.no_grad():
        whole = _logits(net(x))
        single = torch.cat([_logits(net(x[i : i + 1])) for i in range(len(x))])
    scale = float(whole.double().square().mean().sqrt()) or 1.0
    return float((whole - single).abs().max()) / scale


def input_size(name: str) -> int:
    """The smallest of ``_SIZES`` the model takes (a forward pass in eval mode)."""
    last: Optional[Exception] = None
    for size in _SIZES:
        try:
            net = build(name, size).eval()
            with torch.no_grad():
                net(torch.zeros(1, 3, size, size))
            return size
        except Exception as error:  # refuses the size: try a larger one
            last = error
    raise RuntimeError(f"takes none of the sizes {_SIZES}: {last}")


def calibration_steps(batch: int) -> int:
    samples = inspect.signature(lightning_msr.MeanShiftRejection).parameters["calibration_samples"].default
    return -(-samples // batch)


def run_model(name: str, batch_sizes: Sequence[int], args: argparse.Namespace, done: set) -> list[dict]:
    rows: list[dict] = []
    fam = family(name)
    try:
        size = input_size(name)
        base = build(name, size)
    except Exception as error:
        return [dict(model=name, family=fam, note=f"not built: {error}"[:200], passed="skip")]
    params = sum(p.numel() for p in base.parameters()) / 1e6
    if params > args.max_params:
        note = f"{params:.0f}M parameters, above --max-params {args.max_params:g}M for this machine"
        return [dict(model=name, family=fam, params_m=f"{params:.1f}", size=size, passed="skip", note=note)]
    data = digits(size)
    normalised = bool(lightning_msr.find_batchnorm(base))
    for batch in batch_sizes:
        if all((name, str(batch), r) in done for r in RECIPES):
            continue
        calib = calibration_steps(batch)
        steps = max(args.steps, calib + 5)
        start = time.perf_counter()
        bn_lr, bn_rms, bn_max = None, math.nan, math.nan
        for lr in sorted(args.lrs, reverse=True):
            try:
                reference = fit(copy.deepcopy(base), lr, batch, steps, data, [])
            except Exception:  # BatchNorm itself cannot train here (e.g. 1 value per channel at batch 1)
                break
            bn_rms, losses = reference.head_rms[0], reference.losses
            del reference
            if _finite(losses):
                bn_lr, bn_max = lr, max(losses)
                break
        if math.isnan(bn_rms):  # BatchNorm refused every batch: its signal from a larger batch (training mode)
            probe = copy.deepcopy(base).train()
            ref = Classifier(probe, 0.0)
            with torch.no_grad():
                ref.training_step((data[0][: max(batch, 2)], data[1][: max(batch, 2)]), 0)
            bn_rms = ref.head_rms[0]
        bn_seconds = time.perf_counter() - start
        for recipe in RECIPES:
            if (name, str(batch), recipe) in done:
                continue
            lr = bn_lr if bn_lr is not None else min(args.lrs)
            row = dict(model=name, family=fam, params_m=f"{params:.1f}", size=size, batch=batch, recipe=recipe,
                       lr=lr, bn_lr="" if bn_lr is None else bn_lr, steps=steps, calibration_steps=calib,
                       bn_max_loss="" if bn_lr is None else f"{bn_max:.3g}")  # fmt: skip
            start = time.perf_counter()
            try:
                net = copy.deepcopy(base)
                convs = {n: m.weight.detach().clone() for n, m in net.named_modules()
                         if isinstance(m, nn.modules.conv._ConvNd)}  # fmt: skip
                # the calibration alone: forward passes only, the batch after the calibrating ones is read
                callbacks = recipe_callbacks(recipe, args.msr_options)
                probe = fit(copy.deepcopy(base), 0.0, batch, calib + 1, data, callbacks, True)
                signal = probe.head_rms[calib] / bn_rms
                first_signal = probe.head_rms[0] / bn_rms
                del probe
                model = fit(net, lr, batch, steps, data, recipe_callbacks(recipe, args.msr_options))
                after = dict(model.net.named_modules())
                unmoved = [n for n, w in convs.items() if torch.equal(w, after[n].weight.detach())]
                finite = _finite(model.losses)
                eval_diff = eval_difference(model.net, data[0][:8])
                row.update(
                    signal=f"{signal:.3g}", first_signal=f"{first_signal:.3g}", finite=finite,
                    max_loss=f"{max(model.losses):.3g}", unmoved=len(unmoved), convs=len(convs),
                    eval_diff=f"{eval_diff:.2g}",
                )  # fmt: skip
                row["passed"] = "yes" if passes(row, normalised) else "NO"
                if unmoved:
                    row["note"] = f"unmoved: {unmoved[:3]}"
                del model, net, convs, after
            except Exception as error:
                row.update(passed="NO", note=f"error: {type(error).__name__}: {error}"[:300])
            row["seconds"] = f"{time.perf_counter() - start + bn_seconds / len(RECIPES):.1f}"
            rows.append(row)
            _append(args.csv, row)
            print(_line(row), flush=True)
            gc.collect()
    del base
    gc.collect()
    return rows


def _line(row: dict) -> str:
    keys = ("model", "batch", "recipe", "lr", "signal", "finite", "max_loss", "bn_max_loss", "unmoved", "eval_diff",
            "passed", "seconds", "note")  # fmt: skip
    return "  ".join(f"{k}={row.get(k, '')}" for k in keys)


def _append(path: Path, row: dict) -> None:
    new = not path.exists()
    if not new and read_header(path) != FIELDS:  # a file from before a column was added: rewrite it with FIELDS
        old = read_rows(path)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows({k: r.get(k) or "" for k in FIELDS} for r in old)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in FIELDS})


def read_header(path: Path) -> list[str]:
    with path.open() as f:
        return next(csv.reader(f), [])


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def write_table(
    rows: list[dict], path: Path, wall: Optional[float] = None, msr_options: Optional[dict[str, Any]] = None
) -> str:
    """The Markdown table: one line a model, one column per recipe and batch (signal ratio; a mark if it failed).
    ``msr_options``: the ``--msr-option`` arguments the rows were run with, named under the title."""
    batches = sorted({int(r["batch"]) for r in rows if r.get("batch")})
    by = {(r["model"], r.get("batch"), r.get("recipe")): r for r in rows}
    models = sorted({r["model"] for r in rows}, key=lambda n: (family(n), n))
    tested = [r for r in rows if r.get("recipe")]
    passed = sum(r["passed"] == "yes" for r in tested)
    lines = [
        f"# Model population: every torchvision classifier at {_batch_words(batches)}",
        "",
        "Written by `benchmarks/zoo.py` (see its docstring for the method). Each cell is the classifier-input signal",
        "on the first batch after calibration, relative to BatchNorm's in training mode (10x either way passes; in",
        "parentheses for models without BatchNorm, where it is not required), then the largest training loss of the",
        "run, then the checks that failed: `nan` (a loss not finite where BatchNorm's were), `loss` (the largest",
        f"loss above {LOSS_FACTOR:g}x BatchNorm's largest at the same rate: blown up, though finite; only where",
        "BatchNorm's largest was recorded), `moved` (a conv that",
        "did not move), `eval` (eval output depends on the batch), or the error; ✗ marks a run that fails. `lr` is",
        "BatchNorm's largest finite learning rate of the grid {0.1, 0.03, 0.01} at that batch (`-`: BatchNorm finite",
        "at none, e.g. one value per channel at batch 1; the adoptions then ran at the smallest). At that rate",
        "BatchNorm itself barely learns at batch 1-2 (its losses reach 10-100): the largest losses say how far from",
        "finite each run was, not how well it learned.",
        "",
        *(
            [
                "Both recipes ran with `MeanShiftRejection("
                + ", ".join(f"{k}={v!r}" for k, v in msr_options.items())
                + ")` in place of its defaults (`--msr-option`): a setting tried on the population, not the defaults.",
                "",
            ]
            if msr_options
            else []
        ),
        f"**{passed} of {len(tested)} runs pass** over {len(models)} models"
        + (f"; the sweep took {wall / 60:.0f} minutes on this project's 2-core CPU." if wall else "."),
        "",
    ]
    header = ["model", "family"] + [f"{rec} b{b}" for rec in RECIPES for b in batches] + [f"lr b{b}" for b in batches]
    population = [n for n in classification_models() if not (by.get((n, "", "")) or {}).get("passed") == "skip"]
    for b in batches:
        at = [r for r in tested if r["batch"] == str(b)]
        run = {r["model"] for r in at if not r["model"].startswith("timm/")}
        missing = len([n for n in population if n not in run])
        lines.append(
            f"- batch {b}: {sum(r['passed'] == 'yes' for r in at)} of {len(at)} runs pass"
            + (f"; {missing} torchvision models not run yet at this batch size (resumable)" if missing else "")
        )
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in models:
        skip = by.get((name, "", ""))
        if skip is not None:
            lines.append(f"| {name} | {skip['family']} | " + f"skipped: {skip['note']} |" + " |" * (len(header) - 3))
            continue
        cells = [name, family(name)]
        for recipe in RECIPES:
            for b in batches:
                r = by.get((name, str(b), recipe))
                cells.append(_cell(r) if r else "")
        for b in batches:
            r = by.get((name, str(b), RECIPES[0]))
            cells.append((r["bn_lr"] or "-") if r else "")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def _batch_words(batches: list[int]) -> str:
    """``[2]`` -> ``"batch 2"``, ``[1, 2, 8]`` -> ``"batch 1, 2 and 8"``: the batch sizes a table has rows for."""
    words = [str(b) for b in batches]
    if len(words) < 2:
        return "batch " + "".join(words) if words else "no batch size yet"
    return "batch " + ", ".join(words[:-1]) + " and " + words[-1]


def _cell(r: dict) -> str:
    if r["note"].startswith("error"):
        return "error: " + r["note"][7:60].replace("|", "/")
    marks = failed_checks(r, normalised=False)  # the signal is marked by its own formatting below
    signal = float(r["signal"]) if r["signal"] else math.nan
    text = f"{signal:.2g}x · {float(r['max_loss']):.3g}" if r["max_loss"] else f"{signal:.2g}x"
    if not 0.1 <= signal <= 10:
        text = f"({text})" if r["passed"] == "yes" else f"**{text}**"  # (): no BatchNorm to match
    return text + (" " + " ".join(marks) if marks else "") + ("" if r["passed"] == "yes" else " ✗")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="*", help="constructor names (default: every torchvision classifier); timm/<name> for timm's"
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 1, 8])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.1, 0.03, 0.01])
    parser.add_argument("--max-params", type=float, default=150.0, help="skip models above this many million params")
    parser.add_argument("--csv", type=Path, default=ROOT / "docs" / "benchmarks" / "zoo.csv")
    parser.add_argument("--table", type=Path, default=ROOT / "docs" / "benchmarks" / "zoo.md")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the table from the CSV")
    parser.add_argument("--wall-minutes", type=float, help="the sweep's wall clock, for the table")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th model from the i-th (parallel processes)")
    parser.add_argument(
        "--msr-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an argument for MeanShiftRejection in both recipes (e.g. mode=filter): a default tried on the population",
    )
    args = parser.parse_args(argv)
    args.msr_options = dict(_option(text) for text in args.msr_option)
    for recipe in RECIPES:  # a misspelt or bad option fails here, with MeanShiftRejection's message, not hours in
        try:
            recipe_callbacks(recipe, args.msr_options)
        except TypeError as error:
            parser.error(f"--msr-option: {error}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not args.table_only:
        done = {(r["model"], r["batch"], r["recipe"]) for r in read_rows(args.csv)}
        skipped = {r["model"] for r in read_rows(args.csv) if r["passed"] == "skip"}
        index, count = (int(v) for v in args.shard.split("/"))
        names = (args.models or classification_models())[index::count]
        for batch in args.batch_sizes:  # the whole population at one batch size before the next
            for name in names:
                if name in skipped:
                    continue
                for row in run_model(name, [batch], args, done):
                    if row.get("passed") == "skip":
                        skipped.add(name)
                        _append(args.csv, row)
                        print(_line(row), flush=True)
    rows = read_rows(args.csv)
    if rows:
        wall = args.wall_minutes * 60 if args.wall_minutes else None
        write_table(rows, args.table, wall=wall, msr_options=args.msr_options)
    failed = [r for r in rows if r["passed"] == "NO" and (not args.models or r["model"] in args.models)]
    print(f"{sum(r['passed'] == 'yes' for r in rows)} passed, {len(failed)} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
