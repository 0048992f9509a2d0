"""An FSDP2 (``fully_shard``) CPU (gloo) training run with Mean Shift Rejection, for tests/test_sharding.py.

``--devices 2`` trains on 2 processes with Lightning's ``ModelParallelStrategy(data_parallel_size=2)``: every conv
is sharded with ``fully_shard`` in ``configure_model``, along dim 0 (its output filters), with 8 samples per rank
per step, drawn by the ``DistributedSampler`` Lightning inserts (shuffled, seeded by ``seed_everything``).
``--devices 1`` is the unsharded reference: one process that trains on the same 16 samples per step -- the union
of the two ranks' batches -- so the averaged gradient, and after training the weights, must match the sharded
run. Every rank seeds alike
(``seed_everything``), as FSDP2 requires: no rank's weights are broadcast to the others.

The model is built in ``__init__`` (initialised by ``MeanShiftRejection.setup`` before ``fully_shard`` replaces the
parameters) or, with ``--build-in-configure-model``, in ``configure_model`` (initialised at fit start on the
sharded DTensor parameters). Each rank saves ``rank{global_rank}.pt`` with the full (gathered) ``start_state`` and
``end_state``, and per conv weight its ``placements`` and local shard shape.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def _net(transposed_pointwise: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),  # 5 filters: an uneven split (3 + 2 rows)
        nn.ReLU(),
        nn.Conv2d(5, 6, 1),  # pointwise: groups are the inputs of each filter
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1, groups=2),
        nn.ReLU(),
        # pointwise transposed (in, out, 1, 1): its groups span dim 0, the dim FSDP2 shards
        nn.ConvTranspose2d(4, 4, 1) if transposed_pointwise else nn.Identity(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


class ShardedConvNet(L.LightningModule):
    def __init__(self, build_in_configure_model: bool = False, shard: bool = True, transposed: bool = False) -> None:
        super().__init__()
        self.shard = shard
        self.transposed = transposed
        self.net = None if build_in_configure_model else _net(transposed)

    def configure_model(self) -> None:
        if self.net is None:
            self.net = _net(self.transposed)
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.net:
            if isinstance(module, nn.modules.conv._ConvNd):
                fully_shard(module, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def _full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, whole: DTensors are gathered (a collective, called alike on every rank)."""
    state = {}
    for name, param in module.named_parameters():
        value = param.full_tensor() if hasattr(param, "full_tensor") else param
        state[name] = value.detach().clone()
    return state


class Recorder(Callback):
    def __init__(self, out: str) -> None:
        self.out = out
        self.record: dict[str, Any] = {"steps": 0}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["start_state"] = _full_state(pl_module)
        self.record["strategy"] = type(trainer.strategy).__name__
        self.record["world_size"] = trainer.world_size
        self.record["shards"] = {
            name: (str(tuple(getattr(param, "placements", ()))), tuple(getattr(param, "_local_tensor", param).shape))
            for name, param in pl_module.named_parameters()
            if param.dim() == 4
        }

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.record["steps"] += 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["end_state"] = _full_state(pl_module)
        torch.save(self.record, Path(self.out) / f"rank{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--build-in-configure-model", action="store_true")
    parser.add_argument("--keep-magnitude", action="store_true")
    parser.add_argument("--transposed-pointwise", action="store_true", help="add a ConvTranspose2d(4, 4, 1)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    from lightning.pytorch.strategies import ModelParallelStrategy

    import lightning_msr

    L.seed_everything(args.seed, verbose=False)  # alike on every rank
    sharded = args.devices > 1
    model = ShardedConvNet(args.build_in_configure_model, shard=sharded, transposed=args.transposed_pointwise)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 8, 8, generator=g) + 0.5, torch.randint(0, 3, (64,), generator=g))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1) if sharded else "auto",
        max_steps=args.max_steps,
        # calibration does not run on sharded weights yet: compare both runs without it
        callbacks=[
            lightning_msr.MeanShiftRejection(keep_magnitude=args.keep_magnitude, calibrate=False, include_stem=True),
            Recorder(args.out),
        ],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
    )
    if sharded:
        loader = DataLoader(data, batch_size=args.batch_size)
    else:  # step k trains on rank 0's and rank 1's k-th batches of the sharded run together
        ranks = [list(DistributedSampler(data, num_replicas=2, rank=r, shuffle=True, seed=args.seed)) for r in (0, 1)]
        n = args.batch_size
        batches = [ranks[0][k : k + n] + ranks[1][k : k + n] for k in range(0, len(ranks[0]), n)]
        loader = DataLoader(data, batch_sampler=batches)
    trainer.fit(model, loader)
    if torch.distributed.is_initialized():  # else gloo's worker threads can abort the exit (SIGABRT, pytorch#190489)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
