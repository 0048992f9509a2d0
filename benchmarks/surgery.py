"""What taking BatchNorm out costs or saves: step time and saved activations of resnet18.

Compares a torchvision resnet18 (random weights) with BatchNorm against the same network after
``replace_batchnorm(model, "affine")`` (MSR's per-channel scale and bias), after ``"agc"`` (Deep Control)
and, as the lower bound, after ``"identity"``. For each variant it measures, on the CPU, in training mode:

* the time of one forward + backward step (cross-entropy loss; median over ``--repeats`` runs; the
  variants are run alternately, in a rotating order, in one process, so machine load affects all alike),
  as CPU time of the process (robust on a shared machine; 1 thread by default) and as wall-clock time;
* the bytes autograd saves for the backward pass, counted exactly with
  ``torch.autograd.graph.saved_tensors_hooks``: every saved tensor's storage, each storage once, without
  the parameters' storages (those exist anyway).

Writes ``surgery.md`` (a Markdown table) and ``surgery.csv`` to ``--out`` (default ``docs/benchmarks``)::

    python benchmarks/surgery.py --batch 32 --size 64 --repeats 20
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from lightning_msr.surgery import replace_batchnorm

VARIANTS = ("batchnorm", "affine", "agc", "identity")
LAYER = {"batchnorm": "BatchNorm2d", "affine": "ChannelAffine", "agc": "AutomaticGainControl", "identity": "Identity"}


def build(variant: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    if variant != "batchnorm":
        replace_batchnorm(model, variant)
    return model.train()


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """Bytes and count of the distinct storages autograd saves for backward, parameters excluded."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()  # frees the graph (and checks the variant can train)
    model.zero_grad(set_to_none=True)
    return sum(storages.values()), len(storages)


def step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """One forward + backward step: (wall-clock seconds, CPU seconds of this process)."""
    model.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter(), time.process_time()
    nn.functional.cross_entropy(model(x), target).backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per variant (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 keeps torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="output directory")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    target = torch.randint(0, 1000, (args.batch,), generator=generator)
    models = {variant: build(variant, args.seed) for variant in VARIANTS}

    memory = {variant: saved_activation_bytes(model, x, target) for variant, model in models.items()}
    for model in models.values():
        for _ in range(args.warmup):
            step(model, x, target)
    wall: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    cpu: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for repeat in range(args.repeats):
        shift = repeat % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            wall_seconds, cpu_seconds = step(models[variant], x, target)
            wall[variant].append(wall_seconds)
            cpu[variant].append(cpu_seconds)

    base_cpu = statistics.median(cpu["batchnorm"])
    base_wall = statistics.median(wall["batchnorm"])
    base_bytes = memory["batchnorm"][0]
    rows = []
    for variant in VARIANTS:
        median = statistics.median(cpu[variant])
        quartiles = statistics.quantiles(cpu[variant], n=4)
        rows.append(
            {
                "variant": variant,
                "layer": LAYER[variant],
                "cpu_ms_median": round(median * 1e3, 2),
                "cpu_ms_q1": round(quartiles[0] * 1e3, 2),
                "cpu_ms_q3": round(quartiles[2] * 1e3, 2),
                "cpu_time_vs_batchnorm": round(median / base_cpu, 3),
                "wall_ms_median": round(statistics.median(wall[variant]) * 1e3, 2),
                "wall_time_vs_batchnorm": round(statistics.median(wall[variant]) / base_wall, 3),
                "saved_activation_mib": round(memory[variant][0] / 2**20, 2),
                "saved_storages": memory[variant][1],
                "memory_vs_batchnorm": round(memory[variant][0] / base_bytes, 3),
            }
        )

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "surgery.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    setup = (
        f"resnet18 (torchvision {torchvision.__version__}, random weights), batch {args.batch}, "
        f"{args.size}x{args.size}, training mode, CPU ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s)), torch {torch.__version__}, {args.repeats} alternating repeats "
        f"after {args.warmup} warm-up steps."
    )
    lines = [
        "# BatchNorm replacement: step time and saved activations",
        "",
        f"Generated by `python benchmarks/surgery.py --batch {args.batch} --size {args.size} "
        f"--repeats {args.repeats} --warmup {args.warmup} --threads {args.threads}`.",
        "",
        setup,
        "",
        "| variant | layer | CPU ms per step (median [q1, q3]) | CPU time vs BN | wall ms (median) "
        "| wall time vs BN | saved activations MiB | storages | memory vs BN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | `{row['layer']}` | {row['cpu_ms_median']:.1f} [{row['cpu_ms_q1']:.1f}, "
            f"{row['cpu_ms_q3']:.1f}] | {row['cpu_time_vs_batchnorm']:.3f} | {row['wall_ms_median']:.1f} | "
            f"{row['wall_time_vs_batchnorm']:.3f} | {row['saved_activation_mib']:.2f} | "
            f"{row['saved_storages']} | {row['memory_vs_batchnorm']:.3f} |"
        )
    lines += [
        "",
        "Time: one forward + backward step (cross-entropy). *CPU time* (`time.process_time`) is the compute "
        "the step used and is robust to other processes sharing the machine; *wall* time is what you wait.",
        "",
        "Saved activations: the distinct storages autograd keeps for the backward pass "
        "(`torch.autograd.graph.saved_tensors_hooks`), parameters excluded. `identity` (no layer at all) is "
        "the lower bound; `affine` and `agc` keep each conv output for the gradient of their per-channel "
        "scale, as BatchNorm keeps it for its normalisation.",
        "",
    ]
    (args.out / "surgery.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
