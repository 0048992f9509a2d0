"""Small models, data and Trainer settings shared by the tests (fast on two CPU cores)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_msr import MSRSettings
from lightning_msr.fused import fused_unavailable

# The centring group MeanShiftRejection and MSREngine use by default: what the tests of their training check.
DEFAULT_MODE = inspect.signature(MSRSettings).parameters["mode"].default

# Tests of the fused kernel need a C compiler (every machine this project runs CI on has one).
needs_fused_kernel = pytest.mark.skipif(
    fused_unavailable() is not None, reason=f"the fused kernel is not available: {fused_unavailable()}"
)

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd_nesterov_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}


class ConvNet(L.LightningModule):
    """A tiny conv net with spatial, pointwise, depthwise and transposed convs, a Linear head and biases."""

    def __init__(self, optimizer: str = "sgd_momentum", batchnorm: bool = False, in_channels: int = 1) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1),
            norm(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
            nn.Conv2d(8, 12, 1),  # pointwise
            nn.ReLU(),
            nn.ConvTranspose2d(12, 8, 2, stride=2),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self):
        return OPTIMIZERS[self.optimizer_name](self.parameters())


def dataset(n: int = 32, seed: int = 0, channels: int = 1, size: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g) + 0.5  # a common-mode offset, as in real images
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(x, y)


def loader(n: int = 32, batch_size: int = 8, seed: int = 0, **kwargs: Any) -> DataLoader:
    return DataLoader(dataset(n, seed, **kwargs), batch_size=batch_size, shuffle=False)


def trainer(tmp_path, **kwargs: Any) -> L.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(tmp_path),
    }
    settings.update(kwargs)
    return L.Trainer(**settings)


def conv_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() > 2}


class WeightRecorder(L.Callback):
    """Records the parameters at fit start (after setup and checkpoint restore) and the gradients per step."""

    def __init__(self) -> None:
        self.at_fit_start: dict[str, torch.Tensor] = {}
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.at_fit_start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append(
            {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        )


# Names a launcher or a cluster environment would read; PL_GLOBAL_SEED would re-seed every rank alike.
LAUNCHER_ENV = (
    "PL_GLOBAL_SEED",
    "PL_SEED_WORKERS",
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


def script_env() -> dict[str, str]:
    """This process's environment without launcher variables, one thread per process, warnings off."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def run_script(script: Path, out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a distributed test script (``tests/ddp_scripts/``) with ``--out out``, in ``out``, bounded."""
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, str(script), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=script_env(),
        cwd=str(out),
    )
