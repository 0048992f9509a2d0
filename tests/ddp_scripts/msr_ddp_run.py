"""A CPU (gloo) DDP training run for tests/test_ddp_strategy.py; every rank writes what it saw to ``--out``.

Run as a script: Lightning's ``popen`` launcher starts the other ranks of a node by re-running this file with the
same arguments, so all training code is under ``if __name__ == "__main__"`` and the classes are importable (and
picklable for ``ddp_msr_spawn``). Each rank builds its model from its own seed (``--seed-offset`` + its global
rank), so identical weights at train start are the strategy's doing, not the seed's.

By default one launcher process runs 2 ranks on one node (``--devices 2``). With ``--num-nodes 2 --devices 1``
the test starts this script twice, as two "nodes" of one rank each: with ``NODE_RANK``/``MASTER_ADDR``/
``MASTER_PORT``/``WORLD_SIZE`` set (Lightning's ``LightningEnvironment``), or under ``torchrun --nnodes=2``
(``TorchElasticEnvironment``, which sets ``RANK`` and ``LOCAL_RANK``).

Each rank saves ``rank{global_rank}.pt`` with:

* ``setup_state`` -- the state dict after the callbacks' ``setup`` (after MSR's zero-mean init), per rank;
* ``start_state`` / ``end_state`` -- at ``on_train_start`` (after DDP wrapped the model) and ``on_train_end``;
* ``probe_train`` / ``probe_eval`` -- the first conv layer's output (as the next module receives it, i.e. after
  every hook on the conv) for a fixed input identical on all ranks, in train and in eval mode, computed at the
  start of the first training batch;
* ``global_step_start``, ``ddp_broadcast_buffers``, ``strategy``, ``world_size``, ``steps``;
* ``global_rank``, ``node_rank``, ``num_nodes``, ``cluster_environment`` (the class name) and ``seed``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class SmallConvNet(L.LightningModule):
    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8) if batchnorm else nn.Identity(),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )
        # a buffer that differs per rank (each rank seeds differently): must be identical once DDP wraps the model
        self.register_buffer("probe_buffer", torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Recorder(Callback):
    def __init__(self, out: str, seed: int) -> None:
        self.out = out
        self.record: dict[str, Any] = {"steps": 0, "seed": seed}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.record["setup_state"] = _state(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["start_state"] = _state(pl_module)
        self.record["global_step_start"] = trainer.global_step
        self.record["strategy"] = type(trainer.strategy).__name__
        self.record["world_size"] = trainer.world_size
        self.record["global_rank"] = trainer.global_rank
        self.record["node_rank"] = trainer.node_rank
        self.record["num_nodes"] = trainer.num_nodes
        self.record["cluster_environment"] = type(trainer.strategy.cluster_environment).__name__
        msr = [c for c in trainer.callbacks if type(c).__name__ == "MeanShiftRejection"]
        self.record["fused"] = bool(msr and msr[0].fused)
        wrapper = trainer.strategy.model
        self.record["ddp_broadcast_buffers"] = bool(getattr(wrapper, "broadcast_buffers", True))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # inside the first training batch, where NoiseInjection is active (it comes earlier in `callbacks`)
        if "probe_train" not in self.record:
            self.record["probe_train"], self.record["probe_eval"] = self._probe(pl_module)

    @staticmethod
    def _probe(pl_module: L.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1234))
        seen: list[torch.Tensor] = []
        handle = pl_module.net[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
        was_training = pl_module.training
        try:
            with torch.no_grad():
                pl_module.train()
                pl_module(x)
                pl_module.eval()
                pl_module(x)
        finally:
            handle.remove()
            pl_module.train(was_training)
        return seen[0], seen[1]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.record["steps"] += 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["end_state"] = _state(pl_module)
        torch.save(self.record, Path(self.out) / f"rank{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="ddp_msr")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--devices", type=int, default=2, help="processes per node")
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--batchnorm", action="store_true", help="build the model with a BatchNorm2d")
    parser.add_argument("--msr-batchnorm", default="warn", choices=["warn", "replace", "error"])
    parser.add_argument("--no-msr", action="store_true", help="train without MeanShiftRejection")
    parser.add_argument("--noise", action="store_true", help="add NoiseInjection(scale=0.15, shift=0.1)")
    parser.add_argument("--keep-magnitude", action="store_true", help="MeanShiftRejection(keep_magnitude=True)")
    parser.add_argument("--no-calibrate", action="store_true", help="MeanShiftRejection(calibrate=False)")
    parser.add_argument("--implementation", default="auto", choices=["auto", "fused", "eager"])
    parser.add_argument("--sync-batchnorm", action="store_true")
    parser.add_argument("--legacy-buffers", action="store_true", help="take the torch < 2.13 buffer-sync path")
    parser.add_argument("--ckpt-in", default=None, help="resume from this checkpoint")
    parser.add_argument("--ckpt-out", default=None, help="save a checkpoint here after fit (written by rank 0)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    import lightning_msr
    from lightning_msr.strategies import ddp as ddp_module

    if args.legacy_buffers:
        ddp_module._DDP_HAS_FORWARD_SYNC_BUFFERS = False

    # popen: the launcher sets LOCAL_RANK for the ranks it starts (NODE_RANK is set per node by the caller);
    # torchrun sets RANK; spawn: the model is built once and pickled.
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    rank = int(os.environ.get("RANK", int(os.environ.get("NODE_RANK", 0)) * args.devices + local_rank))
    seed = args.seed_offset + rank
    torch.manual_seed(seed)
    model = SmallConvNet(batchnorm=args.batchnorm)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 12, 12, generator=g) + 0.5, torch.randint(0, 4, (64,), generator=g))
    loader = DataLoader(data, batch_size=8)

    callbacks: list[Callback] = []
    if not args.no_msr:
        callbacks.append(
            lightning_msr.MeanShiftRejection(
                batchnorm=args.msr_batchnorm,
                keep_magnitude=args.keep_magnitude,
                calibrate=not args.no_calibrate,
                implementation=args.implementation,
                include_stem=True,  # every conv, as the in-process mechanism tests (tests/conftest.py)
            )
        )
    if args.noise:
        callbacks.append(lightning_msr.NoiseInjection(scale=0.15, shift=0.1))
    callbacks.append(Recorder(args.out, seed))

    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        sync_batchnorm=args.sync_batchnorm,
        max_steps=args.max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
    )
    trainer.fit(model, loader, ckpt_path=args.ckpt_in)
    if args.ckpt_out:
        trainer.save_checkpoint(args.ckpt_out)  # every rank calls it; rank 0 writes
    if torch.distributed.is_initialized():  # else gloo's worker threads can abort the exit (SIGABRT, pytorch#190489)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
