"""Mean Shift Rejection on sharded parameters: FSDP2 (``torch.distributed.fsdp.fully_shard``) and other DTensors.

FSDP2 -- Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` -- turns every parameter into a
:class:`~torch.distributed.tensor.DTensor` sharded along dim 0: each rank holds whole rows. For a ``ConvNd`` weight
``(out, in / groups, *kernel)`` a row is one output filter, so every kernel group of the paper (the spatial kernel
of one ``(o, i)`` slice, the inputs of one pointwise filter, a whole filter in ``mode="filter"``) and every output
filter's norm lies on one rank. The projection, the zero-mean initialisation and ``keep_magnitude``'s norms are
then computed on the local shard (``DTensor.to_local()``) with no collective, and give exactly the unsharded
result. Layouts that would split a group -- a sharded dim inside the group, e.g. a transposed pointwise conv
``(in, out / groups, 1, ...)`` sharded along ``in``, or tensor parallelism along the input channels of a pointwise
conv -- are reported by :func:`shard_problem` and refused by the callback.

FSDP1 (``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``) and DeepSpeed flatten all parameters of a unit
into one buffer and cut it into equal pieces, wherever kernels begin and end: no group is guaranteed to be whole on
any rank, so they are refused (``lightning_msr.callbacks.mean_shift_rejection._unsupported_strategy``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

try:  # torch >= 2.4: public DTensor API
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover - torch without distributed support
    DTensor = None  # type: ignore[assignment,misc]


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a :class:`~torch.distributed.tensor.DTensor` (e.g. an FSDP2 parameter or gradient)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_shard(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank holds: ``DTensor.to_local()`` (a view, so in-place changes reach the
    DTensor) for a DTensor, ``tensor`` itself otherwise."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def local_shape(tensor: Tensor) -> torch.Size:
    """The shape of :func:`local_shard` without building it."""
    return tensor._local_tensor.shape if is_sharded(tensor) else tensor.shape


def _group_dims(shape: Sequence[int], mode: str, transposed: bool) -> tuple[set[int], set[int]]:
    """The dims that one kernel group spans, and the dims that one output filter's norm spans."""
    dims = len(shape)
    rest = set(range(1, dims))
    if (mode == "filter" and not transposed) or dims == 2:
        return rest, rest
    spatial = set(range(2, dims))
    pointwise = all(k == 1 for k in shape[2:])
    if transposed:
        # (in, out / groups, *k): a filter's norm spans the input channels of its group (dim 0) and the kernel
        return ({0} if pointwise else spatial), {0, *spatial}
    return ({1} if pointwise else spatial), rest


def shard_problem(
    tensor: Tensor, mode: str = "kernel", transposed: bool = False, keep_magnitude: bool = False
) -> Optional[str]:
    """Why the sharding of ``tensor`` splits a kernel group (or a filter norm), or ``None`` if it does not.

    A plain tensor, or a DTensor sharded only along dims that no kernel group spans (FSDP2's dim 0 for ``ConvNd``
    and ``Linear``), is fine: every group is whole on one rank. ``keep_magnitude`` also needs every output filter
    whole, which rules out ``ConvTransposeNd`` weights sharded along dim 0 (their input channels).

    Args:
        tensor: a weight (or its gradient).
        mode: ``"kernel"`` or ``"filter"``, as in :func:`lightning_msr.functional.project_mean_`.
        transposed: ``tensor`` belongs to a ``ConvTransposeNd``.
        keep_magnitude: also require each output filter (whose norm is kept) to be whole on one rank.

    Example::

        >>> import torch
        >>> from lightning_msr._sharding import shard_problem
        >>> shard_problem(torch.zeros(8, 4, 3, 3)) is None
        True
    """
    if not is_sharded(tensor):
        return None
    group, norm = _group_dims(tensor.shape, mode, transposed)
    for placement in tensor.placements:
        if isinstance(placement, Replicate):
            continue
        if not isinstance(placement, Shard):
            return f"its placement {placement} is neither Shard nor Replicate"
        dim = placement.dim % tensor.dim()
        if dim in group:
            return f"it is sharded along dim {dim}, which its kernel groups span"
        if keep_magnitude and dim in norm:
            return f"it is sharded along dim {dim}, which the norm of each output filter spans (keep_magnitude)"
    return None


def copy_shard_(destination: Tensor, full: Tensor) -> Tensor:
    """Copy ``full`` (the whole, unsharded value) into ``destination``: for a DTensor, only this rank's shard.

    Every rank computes the same ``full`` (from the same seeded generator) and keeps its own part, cut exactly as
    the DTensor is cut, so the global tensor equals an unsharded copy and no collective is needed.
    """
    if not is_sharded(destination):
        return destination.copy_(full)
    shard = distribute_tensor(full, destination.device_mesh, destination.placements, src_data_rank=None)
    local_shard(destination).copy_(shard.to_local())
    return destination
