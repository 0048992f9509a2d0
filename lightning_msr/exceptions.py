"""The package's error and warning types."""

from __future__ import annotations

__all__ = ["MSRConfigurationError", "MSRWarning"]


class MSRConfigurationError(ValueError):
    """Raised when lightning_msr is given an argument, a model or a Trainer setup it cannot work with.

    It is a :class:`ValueError`, so ``except ValueError`` catches it too.

    Example::

        >>> from lightning_msr import MeanShiftRejection, MSRConfigurationError
        >>> try:
        ...     MeanShiftRejection(alpha=2.0)
        ... except MSRConfigurationError as err:
        ...     print(err)
        Expected `alpha` to be in [0, 1], but got 2.0.
    """


class MSRWarning(UserWarning):
    """Warnings emitted by lightning_msr (filter them with ``warnings.filterwarnings``).

    Example::

        >>> import warnings
        >>> from lightning_msr import MSRWarning
        >>> warnings.filterwarnings("ignore", category=MSRWarning)
    """
