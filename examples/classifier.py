"""What the examples' classifiers share: the train/val/test steps, their metrics, SGD and its schedule.

A model subclasses :class:`ImageClassifier`, calls ``save_hyperparameters()`` with at least ``lr``,
``momentum``, ``nesterov``, ``weight_decay`` and ``schedule`` among its arguments (``warmup_fraction`` and
``label_smoothing`` are optional), builds its network and implements ``forward``.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from examples.classifier import ImageClassifier
    >>> class Tiny(ImageClassifier):
    ...     def __init__(self, lr: float = 0.1, momentum: float = 0.9, nesterov: bool = False,
    ...                  weight_decay: float = 0.0, schedule: str = "constant"):
    ...         super().__init__(num_classes=3)
    ...         self.save_hyperparameters()
    ...         self.net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    ...     def forward(self, x):
    ...         return self.net(x)
    >>> type(Tiny().configure_optimizers()["optimizer"]).__name__
    'SGD'
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from examples.norms import record_norm

__all__ = ["SCHEDULES", "ImageClassifier", "Schedule"]

Schedule = Literal["constant", "cosine", "onecycle"]
SCHEDULES = ("constant", "cosine", "onecycle")


class ImageClassifier(L.LightningModule):
    """Cross-entropy classification with torchmetrics accuracy and SGD with a per-step learning-rate schedule.

    Logs ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``test_loss`` and ``test_acc``.
    Checkpoints record the normalisation layers the network has when saved (:func:`examples.norms.record_norm`).

    Args:
        num_classes: number of classes (for the accuracy metrics).
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        record_norm(self, checkpoint)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.get("label_smoothing", 0.0))
        metric(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=not on_step, sync_dist=not on_step)
        self.log(f"{stage}_acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay
        )
        if hp.schedule == "constant":
            return {"optimizer": optimizer}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if hp.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=total)
        else:  # cosine decay to 0 per step, after an optional linear warm-up
            warmup = int(hp.get("warmup_fraction", 0.0) * total)

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / (warmup + 1)
                progress = min(1.0, (step - warmup) / max(1, total - warmup))
                return 0.5 * (1.0 + math.cos(math.pi * progress))

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
