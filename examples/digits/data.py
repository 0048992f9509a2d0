"""scikit-learn's handwritten digits as a LightningDataModule: embedded in scikit-learn, no download.

1,797 grey-scale 8x8 images of the digits 0-9 (values 0-16). The split into train/validation/test is
stratified and fixed by ``split_seed``, so every method and every batch size in the demo and the benchmarks
sees exactly the same images; pixels are scaled by the training set's own mean and standard deviation.

Example::

    >>> from examples.digits.data import DigitsDataModule
    >>> dm = DigitsDataModule(batch_size=32)
    >>> dm.setup("fit")
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> tuple(x.shape), x.dtype, tuple(y.shape)
    ((32, 1, 8, 8), torch.float32, (32,))
    >>> len(dm.train_set), len(dm.val_set), len(dm.test_set)
    (1257, 180, 360)
"""

from __future__ import annotations

from typing import Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsDataModule", "load_digits_splits"]


def load_digits_splits(
    val_fraction: float = 0.1, test_fraction: float = 0.2, split_seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits as ``{"train"|"val"|"test": (images (N, 1, 8, 8) float32 in [0, 1], labels (N,) int64)}``.

    The split is stratified by class and depends only on the fractions and ``split_seed``.

    Args:
        val_fraction: fraction of all images held out for validation, in (0, 1).
        test_fraction: fraction of all images held out for the test, in (0, 1).
        split_seed: seed of the split.

    Raises:
        ValueError: if the fractions are not in (0, 1) or leave no training images.

    Example::

        >>> from examples.digits.data import load_digits_splits
        >>> splits = load_digits_splits()
        >>> {name: len(y) for name, (x, y) in splits.items()}
        {'train': 1257, 'val': 180, 'test': 360}
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"Expected `{name}` to be in (0, 1), but got {value!r}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"Expected `val_fraction + test_fraction` to be below 1, but got {val_fraction} + {test_fraction}."
        )
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=split_seed
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction / (1.0 - test_fraction), stratify=y_rest, random_state=split_seed
    )
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's 8x8 digits with a fixed stratified train/validation/test split (1257/180/360 by default).

    The data are small tensors in memory; the loaders use no worker processes. Training batches are drawn in
    an order fixed by ``seed_everything`` and, with ``drop_last=True``, all have exactly ``batch_size`` images,
    so that BatchNorm always sees the batch size under study.

    Args:
        batch_size: training batch size (validation and test use ``eval_batch_size``).
        eval_batch_size: batch size of the validation and test loaders (does not affect the results).
        val_fraction: fraction of all images used for validation.
        test_fraction: fraction of all images used for the test.
        split_seed: seed of the (stratified) split; keep it fixed to compare runs.
        max_train_samples: use only the first ``max_train_samples`` training images (quick runs, tests).
        drop_last: drop the last incomplete training batch.

    Raises:
        ValueError: if ``batch_size``, ``eval_batch_size`` or ``max_train_samples`` is not a positive integer.

    Example::

        >>> from examples.digits.data import DigitsDataModule
        >>> dm = DigitsDataModule(batch_size=2, max_train_samples=10)
        >>> dm.setup("fit")
        >>> len(dm.train_dataloader())
        5
    """

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        max_train_samples: Optional[int] = None,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")
        if max_train_samples is not None and (
            isinstance(max_train_samples, bool) or not isinstance(max_train_samples, int) or max_train_samples < 1
        ):
            raise ValueError(
                f"Expected `max_train_samples` to be a positive integer or None, but got {max_train_samples!r}."
            )
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None
        self.test_set: Optional[TensorDataset] = None
        self.mean = 0.0
        self.std = 1.0

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        splits = load_digits_splits(hp.val_fraction, hp.test_fraction, hp.split_seed)
        x_train, y_train = splits["train"]
        if hp.max_train_samples is not None:
            x_train, y_train = x_train[: hp.max_train_samples], y_train[: hp.max_train_samples]
        # normalise with the statistics of the training images only
        self.mean = float(x_train.mean())
        self.std = float(x_train.std())

        def dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
            return TensorDataset(torch.from_numpy((x - self.mean) / self.std), torch.from_numpy(y))

        self.train_set = dataset(x_train, y_train)
        self.val_set = dataset(*splits["val"])
        self.test_set = dataset(*splits["test"])

    def train_dataloader(self) -> DataLoader:
        drop_last = self.hparams.drop_last and len(self.train_set) > self.batch_size
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size)
