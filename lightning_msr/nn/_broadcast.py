"""What the layers of :mod:`lightning_msr.nn` share: per-channel values broadcast over ``(N, C, *spatial)`` tensors."""

from __future__ import annotations

from torch import Tensor


def per_channel(value: Tensor, like: Tensor) -> Tensor:
    """``value`` of shape ``(C,)`` as ``(1, C, 1, ...)`` in ``like``'s dtype, broadcastable against ``like``.

    Example::

        >>> import torch
        >>> per_channel(torch.tensor([1.0, 2.0]), torch.zeros(4, 2, 3, 3, dtype=torch.float64)).shape
        torch.Size([1, 2, 1, 1])
    """
    return value.to(like.dtype).view(1, -1, *([1] * (like.dim() - 2)))
