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


def _payload_bytes(name: str, args: tuple, kwargs: dict) -> int:
    """Bytes one rank contributes to a collective call: its (input) tensor, or the tensors of a coalesced call."""
    import torch

    values = list(args) + list(kwargs.values())
    if name in ("all_gather_into_tensor", "_all_gather_base", "reduce_scatter_tensor") and len(args) > 1:
        values = [args[1]]
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            return sum(v.numel() * v.element_size() for v in value)
    return 0


class _CallLog:
    """Every collective call of this process: its name, payload, the training phase it ran in, and its wall time
    (for a blocking call, the time this rank waited for it; an ``async_op`` call returns at once)."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.calls: list[tuple[str, int, str, bool, float]] = []


def _count_collectives(counts: Counter, log: Optional[_CallLog] = None) -> None:
    """Wrap the ``torch.distributed`` collectives of this process so every call increments ``counts`` (and is
    appended to ``log``)."""
    import functools

    import torch.distributed as dist

    for name in _COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None or getattr(original, "_counted", False):
            continue

        def wrapper(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            counts[_name] += 1
            if log is None:
                return _original(*args, **kwargs)
            start = time.perf_counter()
            result = _original(*args, **kwargs)
            seconds = time.perf_counter() - start
            is_async = bool(kwargs.get("async_op", False))
            log.calls.append((_name, _payload_bytes(_name, args, kwargs), log.phase, is_async, seconds))
            return result

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
    log = _CallLog()
    _count_collectives(counts, log)  # before Lightning imports anything from torch.distributed

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
            # per timed step: its collective calls (name, bytes, phase, async, seconds)
            self.step_calls: list[list[tuple[str, int, str, bool, float]]] = []
            self.first_call = 0

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
                self.step_calls.append(log.calls[self.first_call :])
            self.last = (now, snapshot, trainer.global_step)
            self.first_call = len(log.calls)
            log.phase = "forward"

        def on_before_backward(self, *_: Any) -> None:
            log.phase = "backward"

        def on_after_backward(self, *_: Any) -> None:
            log.phase = "optimizer"

    g = torch.Generator().manual_seed(0)
    n = args.batch_size * 2 * (args.steps + args.warmup + 1)
    data = TensorDataset(torch.randn(n, 3, args.size, args.size, generator=g), torch.randint(0, 10, (n,), generator=g))
    on_cpu = args.accelerator == "cpu"
    device = torch.device("cpu" if on_cpu else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")

    def time_compute(config: str) -> list[tuple[float, float]]:
        """(step, backward) seconds of the configuration's model trained by a plain loop on this process alone:
        forward, backward, SGD step, no DDP and no collective -- the compute the scale projection starts from.

        (a) and (b) time the BatchNorm model (SyncBatchNorm's local arithmetic is BatchNorm's), (c) and (d) the
        model with BatchNorm replaced as ``MeanShiftRejection(batchnorm="replace")`` replaces it.
        """
        _, _, _, msr = CONFIGS[config]
        torch.manual_seed(0)
        model = SmallResNet(args.width).to(device)
        if msr:
            lightning_msr.replace_batchnorm(model, "affine")
        optimizer = model.configure_optimizers()
        batches = DataLoader(data, batch_size=args.batch_size)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        times = []
        for i, (x, y) in enumerate(batches):
            if i >= args.steps + args.warmup:
                break
            x, y = x.to(device), y.to(device)
            sync()
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(model.net(x), y)
            sync()
            backward_start = time.perf_counter()
            loss.backward()
            sync()
            backward_end = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if i >= args.warmup:
                times.append((time.perf_counter() - start, backward_end - backward_start))
        return times

    def fit_once(config: str) -> dict[str, Any]:
        _, strategy, sync_batchnorm, msr = CONFIGS[config]
        torch.manual_seed(0)
        model = SmallResNet(args.width)
        timer = Timer()
        callbacks: list[Callback] = [timer]
        if msr:
            # the calibration pools one global batch here, so it ends in the untimed first step: its per-layer
            # all-reduces are a one-off start-up cost, not the per-step communication measured
            samples = args.batch_size * int(args.devices)
            callbacks.insert(0, lightning_msr.MeanShiftRejection(batchnorm="replace", calibration_samples=samples))
        trainer = L.Trainer(
            accelerator=args.accelerator,
            devices=args.devices,
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
            "step_calls": timer.step_calls,
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
            run["compute"] = time_compute(config)
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


# ------------------------------------------------------------------------------------------------ scale model

# Interconnect assumptions of the projection (an NVIDIA DGX/HGX H100 class cluster). Stated, not measured here:
#   NVLink 4 (H100 SXM): 900 GB/s per GPU, both directions together -> 450 GB/s each way (NVIDIA H100 datasheet).
#   InfiniBand NDR: 400 Gb/s = 50 GB/s each way per port, one ConnectX-7 port per GPU (NVIDIA DGX H100 datasheet).
#   Latencies: NCCL's own tuning model (NVIDIA/nccl, src/graph/tuning.cc, ring algorithm, LL protocol -- the one
#   NCCL picks for small messages): 6.6 us base per collective, 0.47 us per ring step over NVLink, 2.7 us per ring
#   step over the network.
SCALE_ASSUMPTIONS = {
    "gpus_per_node": 8,
    "nvlink_GBps": 450.0,
    "infiniband_GBps": 50.0,
    "base_latency_us": 6.6,
    "nvlink_step_latency_us": 0.47,
    "network_step_latency_us": 2.7,
}
PROJECTED_GPUS = (8, 64, 512)


def allreduce_seconds(nbytes: float, gpus: int, assumptions: dict = SCALE_ASSUMPTIONS) -> float:
    """Alpha-beta time of one hierarchical ring all-reduce of ``nbytes`` per rank over ``gpus`` GPUs.

    Within a node of ``g`` GPUs a ring reduce-scatter and all-gather over NVLink, between the ``n`` nodes a ring
    all-reduce of each GPU's ``1/g`` shard over its own InfiniBand port (NCCL's hierarchical ring): a ring
    all-reduce over ``p`` ranks takes ``2(p-1)`` steps of ``alpha`` each and moves ``2(p-1)/p`` of the bytes, so

    ``t = base + 2(g-1) alpha_nvlink + 2(g-1)/g B/beta_nvlink + 2(n-1) alpha_ib + 2(n-1)/n (B/g)/beta_ib``.
    """
    if gpus <= 1:
        return 0.0
    g = min(gpus, assumptions["gpus_per_node"])
    n = max(1, gpus // g)
    us = 1e-6
    intra = 2 * (g - 1) * assumptions["nvlink_step_latency_us"] * us + 2 * (g - 1) / g * nbytes / (
        assumptions["nvlink_GBps"] * 1e9
    )
    inter = 2 * (n - 1) * assumptions["network_step_latency_us"] * us + 2 * (n - 1) / n * (nbytes / g) / (
        assumptions["infiniband_GBps"] * 1e9
    )
    return assumptions["base_latency_us"] * us + intra + inter


def _measured_step(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step compute, backward compute and the collective calls of one configuration, measured on rank 0.

    Compute: the configuration's model trained by a plain loop (forward, backward, SGD step) in the same process,
    with no collective, so no wait for the other rank can enter it; the median step of the fastest round (the
    least disturbed by other load on a shared machine), and the backward pass of that round likewise. The calls:
    those of the most frequent kind of step of the DDP fits.
    """
    signatures = [tuple((c[0], c[1], c[2], c[3]) for c in calls) for run in runs for calls in run["step_calls"]]
    calls = Counter(signatures).most_common(1)[0][0]
    rounds = [
        (statistics.median(t[0] for t in run["compute"]), statistics.median(t[1] for t in run["compute"]))
        for run in runs
    ]
    compute, backward = min(rounds)
    return {"compute_s": compute, "backward_compute_s": backward, "calls": [list(c) for c in calls]}


def project_step(measured: dict[str, Any], gpus: int, assumptions: dict = SCALE_ASSUMPTIONS) -> dict[str, float]:
    """Projected step time on ``gpus`` GPUs (weak scaling: the same per-GPU batch) from one measured step.

    Every blocking collective (SyncBatchNorm's, in the forward *and* the backward pass; buffer broadcasts; the
    trainer's per-step flag) is on the critical path: the layer cannot go on before its statistics arrive, so its
    time adds to the step. DDP's bucketed gradient all-reduces (async, launched during the backward pass) overlap
    the backward compute; only what does not fit under it is exposed, and at least the last bucket.
    """
    blocking = sum(allreduce_seconds(c[1], gpus, assumptions) for c in measured["calls"] if not c[3])
    buckets = [allreduce_seconds(c[1], gpus, assumptions) for c in measured["calls"] if c[3]]
    exposed = max(buckets[-1], sum(buckets) - measured["backward_compute_s"]) if buckets else 0.0
    step = measured["compute_s"] + blocking + exposed
    return {
        "gpus": gpus,
        "compute_ms": 1e3 * measured["compute_s"],
        "blocking_ms": 1e3 * blocking,
        "gradient_exposed_ms": 1e3 * exposed,
        "gradient_total_ms": 1e3 * sum(buckets),
        "step_ms": 1e3 * step,
        "waiting": (blocking + exposed) / step,
    }


def _calls_by_size(calls: list[list], blocking: bool) -> str:
    sizes = Counter((c[0], c[1], c[2]) for c in calls if bool(c[3]) != blocking)
    return ", ".join(f"{n} x `{name}` {nbytes:,} B ({phase})" for (name, nbytes, phase), n in sorted(sizes.items()))


def _plot_projection(path: Path, projections: dict[str, list[dict[str, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for config, rows in projections.items():
        gpus = [r["gpus"] for r in rows]
        label = f"({config}) {CONFIGS[config][0]}".replace("`", "")
        axes[0].plot(gpus, [r["blocking_ms"] + r["gradient_exposed_ms"] for r in rows], marker="o", label=label)
        axes[1].plot(gpus, [100 * r["waiting"] for r in rows], marker="o", label=label)
    axes[0].set_yscale("log")
    ylabels = ("communication on the critical path (ms)", "waiting for collectives (% of step)")
    for ax, ylabel in zip(axes, ylabels):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs (8 per node)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("alpha-beta projection: measured compute + measured collectives, NVLink + NDR InfiniBand", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ driver


def _driver(args: argparse.Namespace) -> None:
    import tempfile

    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

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
                for k in (
                    "rounds", "steps", "warmup", "batch_size", "size", "width", "threads", "accelerator", "devices"
                )
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
    args.load = (load_start, os.getloadavg()[0]) if load_start is not None else None

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
        f"per rank, SGD with momentum; {args.devices} {'CPU processes (gloo' if on_cpu else 'GPUs (nccl'}, "
        f"{args.threads} "
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
    lines += _scale_section(args, runs, out)
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


def _scale_section(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], out: Path) -> list[str]:
    """Project the measured steps to 8, 64 and 512 GPUs; write ``<out>_scale.csv`` and ``<out>_scale.png``."""
    configs = [c for c in args.configs if c in ("a", "c")] or list(args.configs)
    measured = {c: _measured_step(runs[c]) for c in configs}
    projections = {c: [project_step(measured[c], p) for p in PROJECTED_GPUS] for c in configs}
    stem = out.with_suffix("")
    csv_path, png_path = Path(f"{stem}_scale.csv"), Path(f"{stem}_scale.png")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["config", *projections[configs[0]][0]])
        writer.writeheader()
        for config in configs:
            writer.writerows({"config": config, **{k: round(v, 4) for k, v in r.items()}} for r in projections[config])
    _plot_projection(png_path, projections)

    a = SCALE_ASSUMPTIONS
    where = (
        f"The table above is measured on {args.devices} GPUs (NCCL); the rows below start from that GPU compute time "
        "and project it to 8, 64 and 512 GPUs."
        if args.accelerator == "gpu"
        else "No GPU was used (`--accelerator cpu`): every figure below for 8, 64 and 512 GPUs is projected by the "
        "model, not measured. On a machine with CUDA GPUs, `--accelerator gpu --devices N` measures the table above "
        "on N GPUs (NCCL, torch's own SyncBatchNorm) and projects from the GPU's compute time."
    )
    lines = [
        "## At scale: a latency-bandwidth projection to 8, 64 and 512 GPUs",
        "",
        f"{where} Inputs, measured in the run above: the compute time of a step of each configuration's model "
        "(forward, backward and SGD step in a plain loop on one process, no collective, timed after each round's "
        "fit; the median step of the fastest round), the compute time of its backward pass, and "
        "the exact collective calls of one step -- kind, bytes and pass -- recorded by the same wrappers that count "
        "them. Weak scaling: the per-GPU batch stays the same, so compute and message sizes do not change with the "
        "number of GPUs; only the time of each collective does.",
        "",
        "Model (alpha-beta, hierarchical ring all-reduce as NCCL runs it: ring reduce-scatter/all-gather inside a node "
        "over NVLink, ring all-reduce of each GPU's 1/g shard between nodes over its own InfiniBand port). A ring "
        "all-reduce over p ranks takes 2(p-1) steps and moves 2(p-1)/p of the bytes, so one all-reduce of B bytes "
        "on n nodes of g GPUs takes",
        "",
        "    t(B) = base + 2(g-1)·alpha_NVLink + 2(g-1)/g · B/beta_NVLink + 2(n-1)·alpha_IB + 2(n-1)/n · (B/g)/beta_IB",
        "",
        "Every measured call is modelled as such an all-reduce of its measured bytes (SyncBatchNorm's forward "
        "all-gather and Lightning's 1-element flag broadcast included; at these sizes all are latency-bound, and a "
        "gather or broadcast takes no more steps than an all-reduce). **SyncBatchNorm's collectives are on the "
        "critical path**: a layer's forward cannot continue before the batch statistics of all ranks arrive, and "
        "its backward waits for the reduced gradient statistics, so their whole time adds to the step. **DDP's "
        "gradient all-reduce is bucketed and overlaps the backward pass**: only the part that does not fit under "
        "the measured backward compute is exposed, and at least the last bucket.",
        "",
        "Assumptions (stated, not measured here; an NVIDIA H100 SXM cluster with NDR InfiniBand):",
        "",
        "| quantity | value | source |",
        "|---|---|---|",
        f"| GPUs per node g | {a['gpus_per_node']} | DGX/HGX H100 |",
        f"| beta_NVLink (per GPU, each way) | {a['nvlink_GBps']:g} GB/s | NVLink 4 on H100 SXM: 900 GB/s total "
        "bidirectional (NVIDIA H100 Tensor Core GPU datasheet) |",
        f"| beta_IB (per GPU, each way) | {a['infiniband_GBps']:g} GB/s | NDR InfiniBand 400 Gb/s, one ConnectX-7 "
        "port per GPU (NVIDIA DGX H100 datasheet / user guide) |",
        f"| base latency per collective | {a['base_latency_us']:g} us | NCCL tuning model, ring/LL `baseLat` "
        "(NVIDIA/nccl `src/graph/tuning.cc`) |",
        f"| alpha_NVLink per ring step | {a['nvlink_step_latency_us']:g} us | NCCL tuning model, `hwLat` NVLink "
        "ring/LL |",
        f"| alpha_IB per ring step | {a['network_step_latency_us']:g} us | NCCL tuning model, `hwLat` network "
        "ring/LL |",
        "",
        "Collectives of one step (rank 0), the model's input:",
        "",
    ]
    for config in configs:
        calls = measured[config]["calls"]
        lines.append(
            f"- ({config}) {len(calls)} calls. Blocking: {_calls_by_size(calls, True) or 'none'}. "
            f"Overlapped with backward (DDP buckets): {_calls_by_size(calls, False) or 'none'}."
        )
    lines += [
        "",
        "| GPUs | nodes | config | compute (ms, measured) | blocking collectives (ms) | gradient all-reduce: total / "
        "exposed (ms) | projected step (ms) | waiting | step / (c) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, gpus in enumerate(PROJECTED_GPUS):
        nodes = max(1, gpus // a["gpus_per_node"])
        for config in configs:
            r = projections[config][i]
            ratio = r["step_ms"] / projections["c"][i]["step_ms"] if "c" in projections else float("nan")
            lines.append(
                f"| {gpus} | {nodes} | ({config}) {CONFIGS[config][0]} | {r['compute_ms']:.2f} | "
                f"{r['blocking_ms']:.3f} | {r['gradient_total_ms']:.3f} / {r['gradient_exposed_ms']:.3f} | "
                f"{r['step_ms']:.2f} | {100 * r['waiting']:.1f}% | {ratio:.2f} |"
            )
    lines += ["", f"![projected step time and waiting fraction]({png_path.name})", ""]
    if "a" in projections and "c" in projections:
        extra = [pa["blocking_ms"] - pc["blocking_ms"] for pa, pc in zip(projections["a"], projections["c"])]
        largest = projections["a"][-1]
        waits = largest["blocking_ms"] + largest["gradient_exposed_ms"]
        lines += [
            "What the projection says: the communication SyncBatchNorm adds is latency, not bandwidth -- "
            f"{len(measured['a']['calls']) - len(measured['c']['calls'])} more small blocking collectives per step, "
            + ", ".join(f"{e:.2f} ms at {g} GPUs" for e, g in zip(extra, PROJECTED_GPUS))
            + " on the critical path -- and it grows with the number of nodes (2(n-1) network steps per "
            "collective), while the gradient all-reduce that both configurations share overlaps the backward "
            "pass. The collective times do not depend on the compute time, which here is this machine's CPU time. "
            "For a faster step the same waits weigh more: at "
            f"{PROJECTED_GPUS[-1]} GPUs, a step that computed in 10 ms or 2 ms (GPU-class figures, assumed, not "
            f"measured) would spend {100 * waits / (10 + waits):.0f}% or {100 * waits / (2 + waits):.0f}% of its "
            "time waiting with SyncBatchNorm. `project_step` in `benchmarks/ddp.py` projects any measured step.",
            "",
        ]
        compute_ratio = measured["a"]["compute_s"] / measured["c"]["compute_s"]
        if abs(compute_ratio - 1) > 0.1:
            lines += [
                f"The compute of (a) measured {compute_ratio:.2f}x that of (c) in this run: the step-time column "
                "mixes that difference with the communication; the blocking and gradient columns, which do not "
                "depend on the compute, are the comparison of SyncBatchNorm with `ddp_msr`.",
                "",
            ]
    if args.load:
        lines += [
            f"Machine load (1-minute load average) at the start and end of this run: {args.load[0]:.1f} and "
            f"{args.load[1]:.1f} on {os.cpu_count()} CPU cores; a load above the core count slows every "
            "configuration and makes the compute times noisy, not the counted collectives or the model.",
            "",
        ]
    return lines


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
        "--accelerator", default="cpu", choices=["cpu", "gpu"], help="CPU processes (gloo) or GPUs (default: cpu)"
    )
    parser.add_argument("--devices", type=int, default=2, help="processes (CPU) or GPUs (default: 2)")
    parser.add_argument("--out", default="docs/benchmarks/ddp.md", help="Markdown output; the CSV goes next to it")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.configs = [c for c in dict.fromkeys(args.configs) if c in CONFIGS] or list(CONFIGS)
    if args.accelerator == "gpu" and not args.worker:
        import torch

        if torch.cuda.device_count() < args.devices:
            parser.exit(
                2,
                f"--accelerator gpu needs {args.devices} CUDA GPUs, but {torch.cuda.device_count()} are available. "
                "Without GPUs, run on CPU (the default): the steps at 8, 64 and 512 GPUs are then projected by the "
                "alpha-beta model instead of measured.\n",
            )
    if args.worker:
        _worker(args)
    else:
        _driver(args)


if __name__ == "__main__":
    main()
