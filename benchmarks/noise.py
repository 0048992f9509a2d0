"""Step-time cost of NoiseInjection on a norm-free torchvision resnet18 (issue: target ratio <= 1.05).

A plain training loop (forward, cross-entropy, backward, SGD-with-momentum step) on random data, run for
three set-ups that alternate in one process, so that machine load affects them alike:

* ``no callback`` -- the reference;
* ``NoiseInjection(scale=0, shift=0)`` -- the hooks are attached but add nothing (must cost nothing);
* ``NoiseInjection(scale, shift)`` -- multiplicative and additive noise at all 20 conv outputs.

The callback is driven through its own Lightning hooks (``setup``, ``on_train_batch_start`` /
``on_train_batch_end``, ``teardown``) with a minimal stand-in for the Trainer, so what is timed is exactly
the callback's per-step work and its forward hooks, without the Trainer's own per-step overhead diluting
the ratio. Every step is timed in wall-clock and in CPU time of this process (far less disturbed by other
processes on a shared machine); the table reports the median step times and the median of the per-round
ratios to the reference.

Usage::

    python benchmarks/noise.py                        # batch 16, 64x64, 40 interleaved steps per set-up
    python benchmarks/noise.py --threads 1            # steadier on a shared machine
    python benchmarks/noise.py --tiny --out /tmp/n.md    # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
import torchvision
from torch import nn

from lightning_msr import NoiseInjection


class Classifier(L.LightningModule):
    """resnet18 without normalisation (every BatchNorm is an identity), as the MSR paper trains it."""

    def __init__(self, tiny: bool = False) -> None:
        super().__init__()
        layers = [1, 1, 1, 1] if tiny else [2, 2, 2, 2]
        self.net = torchvision.models.ResNet(
            torchvision.models.resnet.BasicBlock, layers, num_classes=10, norm_layer=lambda c: nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Setup:
    """One model, its optimizer and (optionally) a NoiseInjection callback driven like the Trainer would."""

    def __init__(self, name: str, model: Classifier, callback: NoiseInjection | None, args) -> None:
        self.name = name
        self.model = model.to(args.device)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.callback = callback
        # What the callback reads from the Trainer; `barebones` turns its `pl_module.log` calls off.
        self.trainer = SimpleNamespace(global_rank=0, global_step=0, max_epochs=-1, max_steps=10**9, barebones=True)
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.hooked = 0
        if callback is not None:
            callback.setup(self.trainer, self.model, "fit")
            callback.on_train_start(self.trainer, self.model)
            self.hooked = len(callback.hooked_modules)

    def step(self, x: torch.Tensor, y: torch.Tensor, batch_idx: int) -> float:
        if self.callback is not None:
            self.callback.on_train_batch_start(self.trainer, self.model, (x, y), batch_idx)
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.callback is not None:
            self.callback.on_train_batch_end(self.trainer, self.model, loss, (x, y), batch_idx)
        self.trainer.global_step += 1
        return float(loss.detach())

    def close(self) -> None:
        if self.callback is not None:
            self.callback.teardown(self.trainer, self.model, "fit")


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(args) -> tuple[list[Setup], list[float]]:
    torch.manual_seed(0)
    reference = Classifier(args.tiny)
    setups = [
        Setup("no callback", copy.deepcopy(reference), None, args),
        Setup("NoiseInjection(scale=0, shift=0)", copy.deepcopy(reference), NoiseInjection(0.0, 0.0), args),
        Setup(
            f"NoiseInjection(scale={args.scale:g}, shift={args.shift:g})",
            copy.deepcopy(reference),
            NoiseInjection(args.scale, args.shift),
            args,
        ),
    ]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, args.size, args.size, generator=g).to(args.device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(args.device)
    losses = []
    for setup in setups:  # warm-up: allocator, kernels, first-call costs
        for i in range(args.warmup):
            losses.append(setup.step(x, y, i))
    # One step of each set-up per round, in a rotating order: load changes hit all set-ups alike, and each
    # round gives one paired ratio per set-up.
    for i in range(args.steps):
        for setup in setups[i % len(setups) :] + setups[: i % len(setups)]:
            _synchronize(args.device)
            wall, cpu = time.perf_counter(), time.process_time()
            losses.append(setup.step(x, y, i))
            _synchronize(args.device)
            setup.wall.append(time.perf_counter() - wall)
            setup.cpu.append(time.process_time() - cpu)
    for setup in setups:
        setup.close()
    return setups, losses


def _paired_ratio(times: list[float], reference: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios ``times[i] / reference[i]``."""
    ratios = [t / r for t, r in zip(times, reference)]
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return median, q1, q3


def table(setups: list[Setup], args) -> str:
    reference = setups[0]
    model = "resnet18" if not args.tiny else "resnet10 (--tiny)"
    lines = [
        "# NoiseInjection: step-time overhead",
        "",
        f"Generated by `python benchmarks/noise.py {' '.join(sys.argv[1:])}`".rstrip() + ".",
        "",
        f"Norm-free torchvision {model} (`norm_layer=nn.Identity`), batch {args.batch_size}, "
        f"{args.size}x{args.size}, SGD with momentum, plain forward + backward + step loop on `{args.device}`"
        f"{' (channels_last)' if args.channels_last else ''}; {args.steps} rounds of one step per set-up "
        f"(rotating order) after {args.warmup} warm-up steps each. The ratio is the median over rounds of "
        "(step time / step time without the callback in the same round), with the quartiles in brackets. "
        "CPU time is the process time of all threads: it is the better measure when other processes share "
        "the machine.",
        "",
        "| set-up | hooked modules | median step, wall (ms) | ratio (wall) | median step, CPU (ms) | ratio (CPU) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for setup in setups:
        wall, cpu = statistics.median(setup.wall), statistics.median(setup.cpu)
        wall_ratio = _paired_ratio(setup.wall, reference.wall)
        cpu_ratio = _paired_ratio(setup.cpu, reference.cpu)
        lines.append(
            f"| {setup.name} | {setup.hooked} | {wall * 1e3:.1f} | {wall_ratio[0]:.3f} "
            f"[{wall_ratio[1]:.3f}, {wall_ratio[2]:.3f}] | {cpu * 1e3:.1f} | {cpu_ratio[0]:.3f} "
            f"[{cpu_ratio[1]:.3f}, {cpu_ratio[2]:.3f}] |"
        )
    lines += [
        "",
        f"Target: ratio <= 1.05 with noise, 1.00 (within timing noise) with `scale=shift=0`. "
        f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f} at the end of the run, "
        f"{platform.machine()} {platform.system()}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per set-up (one per round)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per set-up before the rounds")
    parser.add_argument("--scale", type=float, default=0.1, help="NoiseInjection scale of the noisy set-up")
    parser.add_argument("--shift", type=float, default=0.1, help="NoiseInjection shift of the noisy set-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="a small network, 32x32, 3 rounds: a smoke run")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/benchmarks/noise.md")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.warmup, args.size = 3, 1, 32
    if args.threads:
        torch.set_num_threads(args.threads)
    setups, losses = measure(args)
    if not all(torch.isfinite(torch.tensor(losses))):
        print("warning: non-finite losses during the benchmark", file=sys.stderr)
    text = table(setups, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
