"""Training-step time and saved-activation memory of BatchNorm vs MSR vs MSR + noise vs Deep Control (AGC).

torchvision's ``resnet18`` (random init, 10 classes) at batch 32 on 64x64 inputs, on the CPU, trained by a
Lightning ``Trainer`` with SGD. Each method is the same network plus the plugin's callbacks:

* ``batchnorm`` -- the network as is;
* ``msr`` -- ``MeanShiftRejection(batchnorm="replace")``: BatchNorm swapped for a per-channel scale and bias,
  zero-mean kernels, gradient projection;
* ``msr_noise`` -- the same plus ``NoiseInjection()``;
* ``agc`` -- ``DeepControl()``: BatchNorm swapped for ``AutomaticGainControl``.

All methods run in one process, alternating in rounds (``--rounds``), so that load changes on a shared machine
hit them alike; step time is the median over rounds of the per-round median of the steps after warm-up, measured
from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, callbacks' hooks, optimizer step).
Saved-activation bytes are exact: every tensor that autograd saves for backward during one training step is
seen by ``torch.autograd.graph.saved_tensors_hooks``, and the unique storages that are not parameters are
summed. Results are reported as ratios to BatchNorm in ``docs/benchmarks/speed.md`` (+ ``speed.csv``,
``speed.png``).

Usage::

    python benchmarks/speed.py                      # about a minute per round on an idle laptop CPU
    python benchmarks/speed.py --tiny --out /tmp/s  # seconds
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

import lightning_msr

METHODS = ("batchnorm", "msr", "msr_noise", "agc")
FIELDS = [
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


def _placeholder(cls: type) -> bool:
    return "placeholder" in (cls.__doc__ or "").lower()


def callbacks_for(method: str) -> list:
    """The plugin callbacks of a method (raises ``NotImplementedError`` while one is still a placeholder)."""
    if method == "batchnorm":
        return []
    if method == "agc":
        if _placeholder(lightning_msr.DeepControl):
            return [_AGCSurgery()]  # the same surgery DeepControl does, until the callback is implemented
        return [lightning_msr.DeepControl()]
    callbacks: list = [lightning_msr.MeanShiftRejection(batchnorm="replace", seed=0)]
    if method == "msr_noise":
        if _placeholder(lightning_msr.NoiseInjection):
            raise NotImplementedError("lightning_msr.NoiseInjection is still a placeholder")
        callbacks.append(lightning_msr.NoiseInjection(seed=0))
    return callbacks


class _AGCSurgery(L.Callback):
    """``replace_batchnorm(model, "agc")`` at fit setup (what ``DeepControl`` does)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        lightning_msr.replace_batchnorm(pl_module, "agc")


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


class SpeedModule(L.LightningModule):
    """resnet18 trained with SGD; records saved-activation bytes of its first training step."""

    def __init__(self, num_classes: int = 10, blocks: int = 2) -> None:
        super().__init__()
        import torchvision

        self.model = torchvision.models.resnet18(num_classes=num_classes)
        if blocks != 2:  # --tiny: one block per stage (a resnet10) for a seconds-long smoke run
            resnet = torchvision.models.resnet
            self.model = resnet.ResNet(resnet.BasicBlock, [blocks] * 4, num_classes=num_classes)
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


def measure(method: str, batch_size: int, image_size: int, steps: int, blocks: int) -> tuple[list[float], int]:
    """Per-step seconds (first step excluded) and saved-activation bytes of one fit of ``steps + 1`` steps."""
    L.seed_everything(0, verbose=False)
    module = SpeedModule(blocks=blocks)
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


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method and round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds over the methods")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests use it)")
    parser.add_argument("--report-only", action="store_true", help="rebuild speed.md and speed.png from speed.csv")
    args = parser.parse_args(argv)
    if args.report_only:
        with (args.out / "speed.csv").open(newline="") as fh:
            rows = [{k: (v if k == "method" else float(v)) for k, v in r.items()} for r in csv.DictReader(fh)]
        first = rows[0]
        args.batch_size, args.image_size = int(first["batch_size"]), int(first["image_size"])
        args.steps, args.rounds = int(first["steps"]), int(first["rounds"])
        ref = next(r["method"] for r in rows if r["step_ratio"] == 1.0)
        skipped = {m: "not in speed.csv" for m in args.methods if m not in {r["method"] for r in rows}}
        write_outputs(rows, skipped, args, ref)
        return 0
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_msr"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    blocks = 2
    if args.tiny:
        args.batch_size, args.image_size, args.steps, args.rounds, blocks = 2, 32, 2, 2, 1

    methods, skipped = [], {}
    for m in args.methods:
        try:
            callbacks_for(m)
            methods.append(m)
        except NotImplementedError as err:
            skipped[m] = str(err)
    per_round: dict[str, list[float]] = {m: [] for m in methods}
    saved: dict[str, int] = {}
    for r in range(args.rounds):
        order = methods if r % 2 == 0 else methods[::-1]  # alternate the order as well
        for m in order:
            times, nbytes = measure(m, args.batch_size, args.image_size, args.steps, blocks)
            per_round[m].append(statistics.median(times))
            saved[m] = nbytes
            print(
                f"round {r + 1}/{args.rounds} {m}: {1000 * per_round[m][-1]:.1f} ms/step, "
                f"{nbytes / 2**20:.2f} MiB saved",
                flush=True,
            )

    ref = "batchnorm" if "batchnorm" in methods else methods[0]
    ref_ms = 1000 * statistics.median(per_round[ref])
    rows = []
    for m in methods:
        ms = 1000 * statistics.median(per_round[m])
        rows.append(
            {
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
    write_outputs(rows, skipped, args, ref)
    return 0


def write_outputs(rows: list[dict], skipped: dict[str, str], args: argparse.Namespace, ref: str) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with (out / "speed.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Speed and memory: BatchNorm vs MSR vs MSR + noise vs Deep Control",
        "",
        f"Generated by `benchmarks/speed.py`: torchvision `resnet18`, batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size} inputs, CPU ({args.threads} thread), Lightning `Trainer` + SGD. "
        f"Step time: median over {args.rounds} alternating rounds of the median of {args.steps} steps "
        "(forward, backward, callback hooks, optimizer step). Saved activations: exact bytes of the unique "
        "non-parameter storages autograd saves for backward in one training step "
        "(`torch.autograd.graph.saved_tensors_hooks`). Ratios are to `" + ref + "`, measured in the same process.",
        "",
        "| method | step time (ms) | step time ratio | saved activations (MiB) | saved activations ratio |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['method']}` | {r['step_ms']:.1f} | {r['step_ratio']:.2f} | "
            f"{r['saved_bytes'] / 2**20:.2f} | {r['saved_ratio']:.3f} |"
        )
    if skipped:
        lines += ["", "Not measured: " + "; ".join(f"`{m}` ({why})" for m, why in skipped.items()) + "."]
    lines += [
        "",
        "What each method puts after every conv: `batchnorm` -- BatchNorm2d (batch statistics); `msr` -- a "
        "per-channel scale and bias (`MeanShiftRejection(batchnorm='replace')`), plus the gradient projection "
        "before each step; `msr_noise` -- the same plus `NoiseInjection()`'s per-(sample, channel) multiply-add "
        "on the conv outputs; `agc` -- `AutomaticGainControl` (a scaled per-sample spatial mean subtraction, "
        "gain and bias). On a shared machine the step times are noisy even with alternation and medians: read "
        "ratios within about 10% as equal.",
        "",
        "![step time and saved activations relative to BatchNorm](speed.png)",
        "",
    ]
    (out / "speed.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["method"] for r in rows]
    axes[0].bar(names, [r["step_ratio"] for r in rows], color="tab:blue")
    axes[0].set_title(f"step time / {ref}")
    axes[1].bar(names, [r["saved_ratio"] for r in rows], color="tab:orange")
    axes[1].set_title(f"saved activations / {ref}")
    for ax in axes:
        ax.axhline(1.0, color="k", lw=0.8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=110)
    plt.close(fig)
    print(f"wrote {out / 'speed.md'}")


if __name__ == "__main__":
    sys.exit(main())
