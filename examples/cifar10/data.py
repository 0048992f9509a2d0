"""CIFAR-10 as a LightningDataModule, read by torchvision's own ``CIFAR10`` loader.

Real users get the dataset from its official URL (``download=True``, the default; 163 MB, once). The
training images are split into a training and a validation subset fixed by ``split_seed``; the official test
batch is the test set. Training images get the standard augmentation (random 32x32 crop of the 4-pixel
zero-padded image, random horizontal flip); every image is normalised with the per-channel CIFAR-10 mean and
standard deviation.

Example::

    >>> from examples.cifar10.data import CIFAR10DataModule
    >>> dm = CIFAR10DataModule(data_dir="data", batch_size=128, download=False)
    >>> dm.hparams.val_size
    5000
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset
from torchvision import transforms
from torchvision.datasets import CIFAR10

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR10DataModule"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 (50,000 training and 10,000 test images of 32x32x3, 10 classes) with the standard augmentation.

    Args:
        data_dir: directory that holds (or receives) ``cifar-10-batches-py``.
        batch_size: training batch size (validation and test use the same).
        num_workers: data-loading worker processes.
        val_size: number of training images held out for validation (0 validates on the test set).
        split_seed: seed of the train/validation split.
        augment: apply random crop and horizontal flip to training images.
        download: download the dataset when it is missing (rank 0 only, in ``prepare_data``).

    Raises:
        ValueError: if ``batch_size`` is not positive or ``val_size``/``num_workers`` is negative.

    Example::

        >>> from examples.cifar10.data import CIFAR10DataModule
        >>> CIFAR10DataModule(download=False).train_transform.transforms[:2]
        [RandomCrop(size=(32, 32), padding=4), RandomHorizontalFlip(p=0.5)]
    """

    def __init__(
        self,
        data_dir: Union[str, Path] = "data",
        batch_size: int = 128,
        num_workers: int = 4,
        val_size: int = 5000,
        split_seed: int = 0,
        augment: bool = True,
        download: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be a positive integer, but got {batch_size!r}.")
        for name, value in (("val_size", val_size), ("num_workers", num_workers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Expected `{name}` to be a non-negative integer, but got {value!r}.")
        self.save_hyperparameters()
        self.data_dir = str(data_dir)
        normalize = transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)
        augmentation = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
        self.train_transform = transforms.Compose([*augmentation, transforms.ToTensor(), normalize])
        self.eval_transform = transforms.Compose([transforms.ToTensor(), normalize])
        self.train_set: Optional[torch.utils.data.Dataset] = None
        self.val_set: Optional[torch.utils.data.Dataset] = None
        self.test_set: Optional[torch.utils.data.Dataset] = None

    def prepare_data(self) -> None:
        # called on one process only: the only place where a download may happen
        CIFAR10(self.data_dir, train=True, download=self.hparams.download)
        CIFAR10(self.data_dir, train=False, download=self.hparams.download)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in ("fit", "validate", None) and self.train_set is None:
            augmented = CIFAR10(self.data_dir, train=True, transform=self.train_transform)
            plain = CIFAR10(self.data_dir, train=True, transform=self.eval_transform)
            val_size = self.hparams.val_size
            if val_size >= len(augmented):
                raise ValueError(
                    f"Expected `val_size` to be below the {len(augmented)} training images, but got {val_size}."
                )
            order = torch.randperm(len(augmented), generator=torch.Generator().manual_seed(self.hparams.split_seed))
            self.train_set = Subset(augmented, order[val_size:].tolist())
            if val_size:
                self.val_set = Subset(plain, order[:val_size].tolist())
        if self.test_set is None:
            self.test_set = CIFAR10(self.data_dir, train=False, transform=self.eval_transform)
        if self.val_set is None:
            self.val_set = self.test_set

    def _loader(self, dataset: torch.utils.data.Dataset, shuffle: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) > self.hparams.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
