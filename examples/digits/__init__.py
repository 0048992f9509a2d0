"""scikit-learn digits: ``DigitsDataModule`` and the ``SmallCNN`` family (demo, CLI example, benchmarks)."""

from examples.digits.data import DigitsDataModule, load_digits_splits
from examples.digits.model import SmallCNN

__all__ = ["DigitsDataModule", "SmallCNN", "load_digits_splits"]
