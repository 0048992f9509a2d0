"""One training run of the same BatchNorm model, adopted by Mean Shift Rejection, three ways (tests/test_engine.py).

``--loop trainer``: a LightningModule with the ``MeanShiftRejection`` and ``NoiseInjection`` callbacks;
``--loop fabric``: a Lightning Fabric loop with :class:`~lightning_msr.MSREngine` and ``NoiseEngine``;
``--loop plain``: a plain PyTorch loop with the engines (``torch.nn.parallel.DistributedDataParallel`` with gloo
when ``--devices 2``, started with ``torch.multiprocessing``; no ``SyncBatchNorm``).

Each run trains one epoch of ``--steps`` steps, saves a checkpoint, builds everything again from scratch, resumes from
the checkpoint and trains one more; with ``--straight`` it trains both epochs without stopping. Rank 0
writes ``result.pt``: the inner network's final state dict, the worst kernel mean shift, whether the calibration
completed, and the optimizer's parameter count. Run as a script: Lightning's launchers re-run this file for the
other ranks.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightning_msr
from lightning_msr.engine.noise import NoiseEngine
from lightning_msr.functional import mean_shift

BATCH = 4
SETTINGS = {"batchnorm": "replace", "calibration_samples": 16, "seed": 0}
NOISE = {"scale": 0.1, "shift": 0.05, "seed": 0}


def build_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def dataset(args: argparse.Namespace) -> TensorDataset:
    """One epoch is ``--steps`` steps, so the checkpoint falls at an epoch's end, where every loop resumes the
    data alike (Lightning does not fast-forward a plain DataLoader to the middle of an epoch)."""
    n = BATCH * args.devices * args.steps
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def loss_of(net: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(net(x), y)


def train_epochs(model: Any, optimizer: Any, data: Any, epochs: int, backward: Any) -> None:
    """The loop of a Fabric or plain PyTorch user: nothing in it knows about Mean Shift Rejection."""
    for _ in range(epochs):
        for batch in data:
            optimizer.zero_grad()
            backward(loss_of(model, batch))
            optimizer.step()


def report(net: nn.Module, msr: Any, optimizer: torch.optim.Optimizer, out: Path) -> None:
    shifts = [float(mean_shift(w.parameter, mode=msr.settings()["mode"], **w.layout_kwargs())) for w in msr.weights]
    torch.save(
        {
            "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "mean_shift": max(shifts),
            "weights": len(shifts),
            "calibrated": msr.calibration is not None and msr.calibration.complete,
            "optimizer_params": sum(len(g["params"]) for g in optimizer.param_groups),
            "model_params": len(list(net.parameters())),
        },
        out / "result.pt",
    )


# ---------------------------------------------------------------------------------------------- Trainer


def loader(args: argparse.Namespace, rank: int, world: int) -> DataLoader:
    """Each rank's shard in order: the same ``DistributedSampler`` for the three loops (the Trainer's own would
    shuffle)."""
    sampler = DistributedSampler(dataset(args), world, rank, shuffle=False) if world > 1 else None
    return DataLoader(dataset(args), batch_size=BATCH, sampler=sampler)


class Module(L.LightningModule):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.net = build_net()
        self.args = args

    def train_dataloader(self) -> DataLoader:
        return loader(self.args, self.trainer.global_rank, self.trainer.world_size)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return loss_of(self.net, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters())


def run_trainer(args: argparse.Namespace) -> None:
    def fit(epochs: int, ckpt: Any = None) -> tuple[L.Trainer, Module, Any]:
        L.seed_everything(0, verbose=False)
        module = Module(args)
        msr = lightning_msr.MeanShiftRejection(**SETTINGS)
        # saved at the end of the epoch, and `max_epochs`, not `max_steps`: Lightning resumes a checkpoint taken
        # when `max_steps` stopped the fit one batch into the epoch it had finished
        checkpoint = ModelCheckpoint(dirpath=args.out / "trainer", save_last=True)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=args.devices,
            strategy="ddp_msr" if args.devices > 1 else "auto",
            max_epochs=epochs,
            callbacks=[msr, lightning_msr.NoiseInjection(**NOISE), checkpoint],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
        )
        trainer.fit(module, ckpt_path=ckpt)
        return trainer, module, msr

    if args.straight:
        trainer, module, msr = fit(2)
    else:
        fit(1)
        trainer, module, msr = fit(2, args.out / "trainer" / "last.ckpt")
    if trainer.global_rank == 0:
        report(module.net, msr.engine, trainer.optimizers[0], args.out)


# ---------------------------------------------------------------------------------------------- Fabric


def run_fabric(args: argparse.Namespace) -> None:
    fabric = L.Fabric(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto")
    fabric.launch()

    def start() -> tuple[Any, ...]:
        fabric.seed_everything(0, verbose=False)
        net = build_net()
        optimizer = make_optimizer(net.parameters())
        msr = lightning_msr.MSREngine(net, optimizer, **SETTINGS)  # the one line that adopts the model
        noise = NoiseEngine(net, **NOISE)
        model, optimizer = fabric.setup(net, optimizer)
        data = fabric.setup_dataloaders(
            loader(args, fabric.global_rank, fabric.world_size), use_distributed_sampler=False
        )
        return net, model, optimizer, msr, noise, data

    def train(model: Any, optimizer: Any, data: Any, epochs: int) -> None:
        train_epochs(model, optimizer, data, epochs, fabric.backward)

    net, model, optimizer, msr, noise, data = start()
    ckpt = args.out / "fabric.ckpt"
    if args.straight:
        train(model, optimizer, data, 2)
    else:
        train(model, optimizer, data, 1)
        fabric.save(ckpt, {"model": model, "optimizer": optimizer, "msr": msr, "noise": noise})
        net, model, optimizer, msr, noise, data = start()
        fabric.load(ckpt, {"model": model, "optimizer": optimizer, "msr": msr, "noise": noise})
        train(model, optimizer, data, 1)
    if fabric.global_rank == 0:
        report(net, msr, optimizer, args.out)


# ---------------------------------------------------------------------------------------------- plain PyTorch


def run_plain(rank: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # a spawned process starts with the default: the same float sums as the other loops
    world = args.devices
    if world > 1:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)

    def start() -> tuple[Any, ...]:
        torch.manual_seed(0)
        net = build_net()
        optimizer = make_optimizer(net.parameters())
        msr = lightning_msr.MSREngine(net, optimizer, **SETTINGS)  # the one line that adopts the model
        noise = NoiseEngine(net, **NOISE)
        model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
        return net, model, optimizer, msr, noise, loader(args, rank, world)

    def train(model: Any, optimizer: Any, data: Any, epochs: int) -> None:
        train_epochs(model, optimizer, data, epochs, torch.Tensor.backward)

    net, model, optimizer, msr, noise, data = start()
    ckpt = args.out / "plain.pt"
    if args.straight:
        train(model, optimizer, data, 2)
    else:
        train(model, optimizer, data, 1)
        if rank == 0:
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict()}
            torch.save({**state, "msr": msr.state_dict(), "noise": noise.state_dict()}, ckpt)
        if world > 1:
            torch.distributed.barrier()
        net, model, optimizer, msr, noise, data = start()
        saved = torch.load(ckpt, weights_only=False)
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        msr.load_state_dict(saved["msr"])
        noise.load_state_dict(saved["noise"])
        train(model, optimizer, data, 1)
    if rank == 0:
        report(net, msr, optimizer, args.out)
    if world > 1:
        torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--loop", choices=["trainer", "fabric", "plain"], required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--straight", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.loop == "trainer":
        run_trainer(args)
    elif args.loop == "fabric":
        run_fabric(args)
    elif args.devices > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
        torch.multiprocessing.spawn(run_plain, args=(args,), nprocs=args.devices)
    else:
        run_plain(0, args)


if __name__ == "__main__":
    main()
