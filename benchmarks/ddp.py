"""DDP step time and collective calls: BatchNorm + SyncBatchNorm vs. BatchNorm vs. MSR + ``ddp_msr``.

The same small ResNet (BatchNorm after every conv) trains on 2 CPU processes (gloo) in three configurations:

* ``a``: ``strategy="ddp", sync_batchnorm=True`` -- every BatchNorm becomes SyncBatchNorm;
* ``b``: ``strategy="ddp"`` -- per-rank BatchNorm statistics, DDP broadcasts the buffers before each forward;
* ``c``: ``strategy="ddp_msr"`` with ``MeanShiftRejection(batchnorm="replace")`` -- BatchNorm replaced by a
  per-channel scale and bias at fit setup, no buffer broadcast;
* ``d``: the model of ``c`` with plain ``strategy="ddp"`` -- separates what the strategy saves from what the
  model change costs or saves.

On CPU, torch's SyncBatchNorm does not run (its kernels are CUDA-only), so ``a`` converts the BatchNorm layers to
a CPU SyncBatchNorm defined here, with the same statistics and the same collective pattern (one blocking
collective per layer in the forward pass and one in the backward pass); with ``--accelerator gpu`` it is
``sync_batchnorm=True`` itself.

One subprocess runs all configurations in the same two processes (Lightning's ``popen`` launcher starts the
second rank once, by re-running that subprocess's command line), one short ``Trainer.fit`` after the other, in
``--rounds`` rounds that alternate the order, because the CPU is shared: a changing load then hits every
configuration alike. A step is the interval between two ``on_train_batch_start`` calls on rank 0 (batch fetch,
forward, backward with the gradient all-reduce, optimizer step, Lightning's loop), timed after ``--warmup``
steps; the tables report the median over rounds of each round's median step, and the fastest round.

Collectives are counted in every process by wrapping the ``torch.distributed`` functions (``all_reduce``,
``broadcast``, ``all_gather*``, ``_broadcast_coalesced`` -- DDP's buffer broadcast --, ``barrier``, ...). DDP's
gradient all-reduce runs in C++, so every configuration registers the same communication hook, a counting
wrapper around torch's ``default_hooks.allreduce_hook`` (DDP's built-in behaviour, bucket by bucket), so that its
bucket all-reduces go through ``torch.distributed.all_reduce`` and are counted too.

Usage::

    python benchmarks/ddp.py                        # writes docs/benchmarks/ddp.md and ddp.csv
    python benchmarks/ddp.py --rounds 12 --steps 40 --batch-size 32
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

CONFIGS = {
    "a": ("BatchNorm + `ddp`, `sync_batchnorm=True`", "ddp", True, False),
    "b": ("BatchNorm + `ddp`", "ddp", False, False),
    "c": ('MSR (`batchnorm="replace"`) + `ddp_msr`', "ddp_msr", False, True),
    "d": ('MSR (`batchnorm="replace"`) + `ddp`', "ddp", False, True),
}
_COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "broadcast",
    "broadcast_object_list",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "_all_gather_base",
    "all_gather_object",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "barrier",
    "monitored_barrier",
    "_broadcast_coalesced",
)
_ENV_TO_DROP = ("PL_GLOBAL_SEED", "LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ------------------------------------------------------------------------------------------------ worker


def _count_collectives(counts: Counter) -> None:
    """Wrap the ``torch.distributed`` collectives of this process so every call increments ``counts``."""
    import functools

    import torch.distributed as dist

    for name in _COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None or getattr(original, "_counted", False):
            continue

        def wrapper(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            counts[_name] += 1
            return _original(*args, **kwargs)

        functools.update_wrapper(wrapper, original)
        wrapper._counted = True  # type: ignore[attr-defined]
        setattr(dist, name, wrapper)


def _most_common_step(steps: list[Counter]) -> tuple[tuple[str, int], ...]:
    """The collectives of the most frequent kind of step (steps normally all make the same calls)."""
    return Counter(tuple(sorted(step.items())) for step in steps).most_common(1)[0][0]


def _by_kind(kinds: dict[str, int]) -> str:
    return ", ".join(f"`{name}` {count:g}" for name, count in sorted(kinds.items()))


def _worker(args: argparse.Namespace) -> None:
    counts: Counter = Counter()
    _count_collectives(counts)  # before Lightning imports anything from torch.distributed

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins.layer_sync import LayerSync
    from torch import nn
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_msr

    torch.set_num_threads(args.threads)

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    class SmallResNet(L.LightningModule):
        """A CIFAR-style ResNet: stem + 3 stages of 2 BasicBlocks (widths w, 2w, 4w), BatchNorm after every conv."""

        def __init__(self, width: int, classes: int = 10) -> None:
            super().__init__()
            layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            cin = width
            for i, cout in enumerate((width, 2 * width, 4 * width)):
                layers += [Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)]
                cin = cout
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
            self.net = nn.Sequential(*layers)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    class AllReduceSum(torch.autograd.Function):
        """Sum over ranks, differentiable: the gradient of a rank's input is the sum of all ranks' gradients."""

        @staticmethod
        def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor)
            return tensor

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            torch.distributed.all_reduce(grad)
            return grad

    class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
        """SyncBatchNorm for CPU processes (torch's SyncBatchNorm kernels are CUDA-only).

        Same statistics and the same collective pattern per layer as torch's SyncBatchNorm: one blocking
        collective in the forward pass (the batch sums of every rank) and one in the backward pass.
        """

        def _check_input_dim(self, x: torch.Tensor) -> None:
            if x.dim() < 2:
                raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                return nn.functional.batch_norm(
                    x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
                )
            dims = [0, *range(2, x.dim())]
            channels = x.shape[1]
            count = x.new_full((1,), x.numel() / channels)
            local = torch.cat([x.sum(dims), (x * x).sum(dims), count])
            total = AllReduceSum.apply(local)  # one all_reduce in forward, one in backward
            n = total[-1]
            mean = total[:channels] / n
            var = total[channels : 2 * channels] / n - mean * mean
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1), self.momentum)
                self.num_batches_tracked += 1
            shape = (1, channels) + (1,) * (x.dim() - 2)
            y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
            return y * self.weight.view(shape) + self.bias.view(shape)

    class CPUSyncBatchNormPlugin(LayerSync):
        """``Trainer(sync_batchnorm=True)`` for CPU: converts every BatchNorm to :class:`CPUSyncBatchNorm`."""

        def apply(self, model: nn.Module) -> nn.Module:
            for parent in list(model.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.modules.batchnorm._BatchNorm):
                        sync = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum)
                        sync.load_state_dict(child.state_dict())
                        setattr(parent, name, sync)
            return model

        def revert(self, model: nn.Module) -> nn.Module:
            return model

    def python_allreduce_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks any annotations
        return default_hooks.allreduce_hook(state, bucket)  # -> torch.distributed.all_reduce, counted

    class Timer(Callback):
        """Step = from one ``on_train_batch_start`` to the next: everything the training loop does per step."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.step_collectives: list[Counter] = []
            self.last: Optional[tuple[float, Counter, int]] = None
            self.batchnorm_layers = 0
            self.sync_batchnorm_layers = 0

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            trainer.strategy.model.register_comm_hook(state=None, hook=python_allreduce_hook)
            modules = list(pl_module.modules())
            self.batchnorm_layers = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
            self.sync_batchnorm_layers = sum(isinstance(m, (nn.SyncBatchNorm, CPUSyncBatchNorm)) for m in modules)

        def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
            now, snapshot = time.perf_counter(), Counter(counts)
            if self.last is not None and self.last[2] >= args.warmup:
                self.times.append(now - self.last[0])
                self.step_collectives.append(snapshot - self.last[1])
            self.last = (now, snapshot, trainer.global_step)

    g = torch.Generator().manual_seed(0)
    n = args.batch_size * 2 * (args.steps + args.warmup + 1)
    data = TensorDataset(torch.randn(n, 3, args.size, args.size, generator=g), torch.randint(0, 10, (n,), generator=g))
    on_cpu = args.accelerator == "cpu"

    def fit_once(config: str) -> dict[str, Any]:
        _, strategy, sync_batchnorm, msr = CONFIGS[config]
        torch.manual_seed(0)
        model = SmallResNet(args.width)
        timer = Timer()
        callbacks: list[Callback] = [timer]
        if msr:
            callbacks.insert(0, lightning_msr.MeanShiftRejection(batchnorm="replace"))
        trainer = L.Trainer(
            accelerator=args.accelerator,
            devices=2,
            strategy=strategy,
            sync_batchnorm=sync_batchnorm and not on_cpu,
            plugins=[CPUSyncBatchNormPlugin()] if sync_batchnorm and on_cpu else None,
            max_steps=args.steps + args.warmup + 1,  # the last step only closes the interval of the one before
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(Path(args.result).parent),
        )
        before = Counter(counts)
        trainer.fit(model, DataLoader(data, batch_size=args.batch_size))
        return {
            "times": timer.times,
            "collectives_per_step": statistics.median(sum(c.values()) for c in timer.step_collectives),
            "collectives_per_step_by_kind": dict(_most_common_step(timer.step_collectives)),
            "collectives_total": dict(Counter(counts) - before),
            "batchnorm_layers": timer.batchnorm_layers,
            "sync_batchnorm_layers": timer.sync_batchnorm_layers,
            "strategy": type(trainer.strategy).__name__,
            "rank": trainer.global_rank,
        }

    # Every rank runs the same sequence of fits in the same processes and process group (Lightning's popen
    # launcher starts the other rank once, for the first fit). Alternating the configurations round by round
    # spreads a shared machine's changing load evenly over them.
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in args.configs}
    for round_ in range(args.rounds):
        for config in args.configs if round_ % 2 == 0 else args.configs[::-1]:
            run = fit_once(config)
            runs[config].append(run)
            if run["rank"] == 0:
                print(
                    f"round {round_} config {config}: median step {1e3 * statistics.median(run['times']):.1f} ms, "
                    f"{run['collectives_per_step']:g} collectives/step",
                    file=sys.stderr,
                    flush=True,
                )
    if all(run["rank"] == 0 for config_runs in runs.values() for run in config_runs):
        Path(args.result).write_text(json.dumps(runs))


# ------------------------------------------------------------------------------------------------ driver


def _driver(args: argparse.Namespace) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "runs.json"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            f"--result={result}",
            f"--configs={''.join(args.configs)}",
            *(
                f"--{k.replace('_', '-')}={getattr(args, k)}"
                for k in ("rounds", "steps", "warmup", "batch_size", "size", "width", "threads", "accelerator")
            ),
        ]
        env = {k: v for k, v in os.environ.items() if k not in _ENV_TO_DROP}
        env.update(OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
        with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp) as process:
            assert process.stderr is not None
            tail: list[str] = []
            for line in process.stderr:
                if line.startswith("round "):
                    print(line, end="", flush=True)
                tail = [*tail[-60:], line]
        if process.returncode != 0 or not result.exists():
            raise RuntimeError("the benchmark worker failed:\n" + "".join(tail))
        runs: dict[str, list[dict[str, Any]]] = json.loads(result.read_text())

    rows = []
    medians = {c: statistics.median(statistics.median(r["times"]) for r in runs[c]) for c in args.configs}
    fastest = {c: min(statistics.median(r["times"]) for r in runs[c]) for c in args.configs}
    reference = medians.get("c")
    # paired: each round's fits ran seconds apart, so the ratio within a round cancels most of the drifting load
    paired = {
        c: statistics.median(
            statistics.median(r["times"]) / statistics.median(ref["times"]) for r, ref in zip(runs[c], runs["c"])
        )
        for c in args.configs
        if reference
    }
    for config in args.configs:
        label = CONFIGS[config][0]
        first = runs[config][0]
        rows.append(
            {
                "config": config,
                "setup": label,
                "strategy": first["strategy"],
                "batchnorm_layers": first["batchnorm_layers"],
                "sync_batchnorm_layers": first["sync_batchnorm_layers"],
                "median_step_ms": round(1e3 * medians[config], 2),
                "round_medians_ms": " ".join(f"{1e3 * statistics.median(r['times']):.1f}" for r in runs[config]),
                "ratio_to_c": round(paired[config], 3) if reference else "",
                "fastest_run_ms": round(1e3 * fastest[config], 2),
                "fastest_ratio_to_c": round(fastest[config] / fastest["c"], 3) if reference else "",
                "collectives_per_step": first["collectives_per_step"],
                "collectives_per_step_by_kind": _by_kind(first["collectives_per_step_by_kind"]).replace("`", ""),
            }
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    on_cpu = args.accelerator == "cpu"
    lines = [
        "# DDP without SyncBatchNorm: step time and collectives",
        "",
        f"Generated by `{' '.join(['python benchmarks/ddp.py', *sys.argv[1:]])}`.",
        "",
        f"Small CIFAR-style ResNet (width {args.width}, 3 stages x 2 BasicBlocks, "
        f"{rows[0]['batchnorm_layers']} BatchNorm layers), input {args.size}x{args.size}, batch {args.batch_size} "
        f"per rank, SGD with momentum; 2 {'CPU processes (gloo' if on_cpu else 'GPUs (nccl'}, {args.threads} "
        f"thread(s) per process). {args.rounds} fits per configuration of {args.steps} timed steps after "
        f"{args.warmup} warm-up steps, all in the same two processes, configurations alternating round by round. A "
        "step is the interval between two `on_train_batch_start` calls on rank 0 (batch fetch, forward, backward "
        "with the gradient all-reduce, optimizer step, Lightning's loop). Median step: the median over the rounds of "
        "each round's median step; / (c), paired: the median over rounds of the ratio of the round medians within "
        "a round (the fits of a round ran seconds apart); fastest round: the smallest round median, the least "
        "disturbed by other load. "
        "Collectives per step: calls of `torch.distributed` collectives in one process during one step, DDP's "
        "gradient buckets included (counted through a communication hook that wraps torch's default all-reduce "
        "hook, in every configuration). The `broadcast` in every row is Lightning's own per-step broadcast of "
        "its SIGTERM flag.",
        "",
    ]
    if on_cpu and "a" in args.configs:
        lines += [
            "Configuration (a) on CPU: torch's `SyncBatchNorm` kernels are CUDA-only, so the benchmark converts the "
            "BatchNorm layers to a CPU SyncBatchNorm (a `LayerSync` plugin, the mechanism behind "
            "`sync_batchnorm=True`) with the same statistics and the same collective pattern: one blocking "
            "collective per layer in the forward pass and one in the backward pass.",
            "",
        ]
    summary = [
        f"**({c})/(c) = {rows[args.configs.index(c)]['ratio_to_c']:.2f}** "
        f"({rows[args.configs.index(c)]['fastest_ratio_to_c']:.2f} between the fastest rounds)"
        for c in args.configs
        if c != "c" and "c" in args.configs
    ]
    if summary:
        lines += ["Step-time ratios (median over rounds of the ratio within a round): " + ", ".join(summary) + ".", ""]
    lines += [
        "| config | setup | BN layers | SyncBN layers | median step (ms) | / (c), paired | fastest round (ms) | / (c) "
        "| collectives per step | of which |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['setup']} | {row['batchnorm_layers']} | {row['sync_batchnorm_layers']} | "
            f"{row['median_step_ms']:.1f} | {row['ratio_to_c']} | {row['fastest_run_ms']:.1f} | "
            f"{row['fastest_ratio_to_c']} | "
            f"{row['collectives_per_step']:g} | {_by_kind(runs[row['config']][0]['collectives_per_step_by_kind'])} |"
        )
    lines += ["", "Collective calls in one whole fit, setup and teardown included (rank 0):", ""]
    for config in args.configs:
        lines.append(f"- ({config}) {_by_kind(runs[config][0]['collectives_total'])}")
    lines += [
        "",
        "Reading the table: SyncBatchNorm adds two blocking collectives per BatchNorm layer to every step; plain "
        "DDP with BatchNorm adds the broadcast of the running statistics before every forward pass "
        '(`_broadcast_coalesced`). Once `MeanShiftRejection(batchnorm="replace")` has taken the BatchNorm out, '
        "the model has no buffers left, so (c) and (d) communicate alike: what `ddp_msr` adds is the guarantee -- "
        "it refuses `sync_batchnorm=True` and any remaining BatchNorm, and skips the per-step broadcast of any "
        "other buffers -- while the saving itself comes from the model having no batch statistics.",
        "",
        "Timings on a shared machine are noisy; the ratios and the collective counts, not the absolute times, are "
        "the result. On GPUs, where a layer computes in microseconds, each blocking collective of SyncBatchNorm "
        "weighs relatively more than on CPU.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="abcd", help="configurations to run, e.g. 'ac' (default: abcd)")
    parser.add_argument("--rounds", type=int, default=10, help="fits per configuration, alternating (default: 10)")
    parser.add_argument("--steps", type=int, default=25, help="timed steps per fit (default: 25)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps per fit (default: 3)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size per rank (default: 16)")
    parser.add_argument("--size", type=int, default=32, help="input height and width (default: 32)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage (default: 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    parser.add_argument(
        "--accelerator", default="cpu", choices=["cpu", "gpu"], help="2 CPU processes (gloo) or 2 GPUs (default: cpu)"
    )
    parser.add_argument("--out", default="docs/benchmarks/ddp.md", help="Markdown output; the CSV goes next to it")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.configs = [c for c in dict.fromkeys(args.configs) if c in CONFIGS] or list(CONFIGS)
    if args.worker:
        _worker(args)
    else:
        _driver(args)


if __name__ == "__main__":
    main()
