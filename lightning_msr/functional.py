"""Pure tensor functions of Mean Shift Rejection, usable in any PyTorch training loop.

Mean Shift Rejection (Ruff, Beck, Bach, "Training Deep Neural Networks Without Minibatch Statistics or
Normalization", arXiv:1911.13173) keeps every convolution kernel on the zero-mean "isocline": a kernel
whose weights sum to zero does not pass the spatial *common-mode* (the mean shift) of its input on to
its output. Three operations make that happen:

* :func:`zero_mean_init_` -- zero-mean initialisation with unit filter magnitude;
* :func:`project_mean_` -- subtract the (``alpha``-weighted) kernel-group mean from a gradient (or a
  weight), an orthogonal projection onto the zero-mean subspace when ``alpha == 1``;
* :func:`mean_shift` -- how far a weight is from the isocline.

Which elements share one mean (the *kernel group*) follows ``mode`` and the shape of the weight, as
``(out, in / groups, *kernel)`` for ``nn.ConvNd`` and ``(in, out / groups, *kernel)`` for
``nn.ConvTransposeNd``:

* ``mode="filter"`` (the default, as for :class:`~lightning_msr.MSRSettings`): all of dims ``1..`` of each
  output filter -- this is Gradient Centralization (Yong et al. 2020). A ``ConvTransposeNd`` keeps the
  kernel-wise groups below in this mode too: its output filters run across dim ``1``, so Gradient
  Centralization's dim-``0`` slices are not filters, and calibration's per-output-channel scales would move
  them off zero mean; its kernels are zero-mean in both modes.
* ``mode="kernel"`` (the paper's): for spatial kernels (``prod(kernel) > 1``) the spatial dims ``2..`` of each
  ``(o, i)`` slice; for pointwise kernels (``prod(kernel) == 1``) the input channels of each output filter
  (dim ``1``, or for a transposed conv the input channels of its group, dim ``0``); a group of a single
  element cannot be centred and is skipped.
* 2-D (``nn.Linear``) weights: the inputs of each row (dim ``1``), in both modes.

Example::

    >>> import torch
    >>> from lightning_msr.functional import mean_shift, project_mean_, zero_mean_init_
    >>> weight = torch.empty(8, 3, 3, 3)
    >>> _ = zero_mean_init_(weight, generator=torch.Generator().manual_seed(0))
    >>> bool(mean_shift(weight) < 1e-6)
    True
    >>> grad = torch.randn(8, 3, 3, 3)
    >>> _ = project_mean_(grad)  # every filter's mean removed
    >>> bool(grad.mean(dim=(1, 2, 3)).abs().max() < 1e-6)
    True
    >>> _ = project_mean_(grad, mode="kernel")  # every kernel's mean removed
    >>> bool(grad.mean(dim=(2, 3)).abs().max() < 1e-6)
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal, NamedTuple, Optional, Union, get_args

import torch
from torch import Tensor, nn

from lightning_msr._checks import (
    _check_bool,
    _check_choice,
    _check_in_range,
    _check_names,
    _check_patterns_match,
    _check_positive,
)
from lightning_msr._sharding import copy_shard_, local_shape, local_shard, shard_problem
from lightning_msr.exceptions import MSRConfigurationError, MSRWarning

__all__ = [
    "KernelBank",
    "KernelGroups",
    "KernelWeight",
    "adaptive_clip_",
    "eligible_weights",
    "filter_norms",
    "from_virtual_",
    "kernel_groups",
    "mean_shift",
    "project_groups_",
    "project_mean_",
    "stem_conv",
    "to_virtual_",
    "zero_mean_init_",
]

Mode = Literal["kernel", "filter"]
MODES: tuple[str, ...] = get_args(Mode)  # the allowed `mode` values; the settings and `fused` check these
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class KernelGroups(NamedTuple):
    """How a weight splits into kernel groups: viewed as ``(outer, size, inner)``, every ``[a, :, b]`` fibre is one
    group of ``size`` elements that share one mean (see the module docstring for which elements those are).

    Returned by :func:`kernel_groups`, taken by :func:`project_groups_`.

    Example::

        >>> from lightning_msr.functional import KernelGroups, kernel_groups
        >>> kernel_groups((16, 8, 3, 3))  # 16 filters of 72 weights each
        KernelGroups(outer=16, size=72, inner=1)
        >>> kernel_groups((16, 8, 3, 3), mode="kernel")  # 16 * 8 spatial kernels of 9 weights each
        KernelGroups(outer=128, size=9, inner=1)
    """

    outer: int
    size: int
    inner: int


def _groups(
    shape: Sequence[int], mode: str = "kernel", transposed: bool = False, groups: int = 1
) -> Optional[KernelGroups]:
    """The kernel-group layout of a weight of ``shape``, or ``None`` if its groups cannot be centred."""
    if len(shape) < 2:
        raise MSRConfigurationError(
            f"Expected a weight with at least 2 dims (Linear: (out, in); ConvNd: (out, in / groups, *kernel)), "
            f"but got shape {tuple(shape)}. Biases and norm parameters are never centred."
        )
    if mode == "filter" and not transposed:  # a ConvTranspose keeps its kernels' groups (module docstring)
        layout = KernelGroups(shape[0], math.prod(shape[1:]), 1)
    elif len(shape) == 2:
        layout = KernelGroups(shape[0], shape[1], 1)
    else:
        spatial = math.prod(shape[2:])
        if spatial > 1:
            layout = KernelGroups(shape[0] * shape[1], spatial, 1)
        elif not transposed:
            layout = KernelGroups(shape[0], shape[1], 1)
        else:
            if groups < 1 or shape[0] % groups:
                raise MSRConfigurationError(
                    f"Expected `groups` to divide the weight's first dim {shape[0]}, but got {groups}."
                )
            layout = KernelGroups(groups, shape[0] // groups, shape[1])
    return layout if layout.size > 1 else None


def kernel_groups(
    weight: Union[Tensor, Sequence[int]],
    mode: Mode = "filter",
    transposed: bool = False,
    groups: int = 1,
    *,
    keep_magnitude: bool = False,
) -> Optional[KernelGroups]:
    """The kernel groups of a weight, or ``None`` if they have a single element and cannot be centred.

    ``weight`` is a tensor or a shape. For a sharded tensor (an FSDP2 ``DTensor``) the groups are those of the part
    this rank holds, after checking that no group (with ``keep_magnitude``, no filter) is split across ranks;
    whether a weight can be centred at all is decided by its global shape, alike on every rank.

    Args:
        weight: a conv (or Linear) weight, or its shape.
        mode: ``"kernel"`` or ``"filter"``, as in :func:`project_mean_`.
        transposed: the weight belongs to a ``ConvTransposeNd``.
        groups: the conv's ``groups``.
        keep_magnitude: also require every output filter to be whole on one rank (its norm is kept).

    Returns:
        The :class:`KernelGroups` for :func:`project_groups_`, or ``None``.

    Raises:
        MSRConfigurationError: if the weight has fewer than 2 dims, ``groups`` does not divide a transposed
            pointwise weight, or a sharded tensor splits a group across ranks.

    Example::

        >>> import torch
        >>> from lightning_msr.functional import kernel_groups
        >>> kernel_groups(torch.empty(32, 16, 1, 1))  # pointwise: the 16 inputs of each filter
        KernelGroups(outer=32, size=16, inner=1)
        >>> kernel_groups(torch.empty(32, 1, 1, 1)) is None  # pointwise depthwise: nothing to centre
        True
    """
    if not isinstance(weight, Tensor):
        return _groups(tuple(weight), mode, transposed, groups)
    problem = shard_problem(weight, mode, transposed, keep_magnitude)
    if problem is not None:
        raise MSRConfigurationError(
            f"Mean Shift Rejection cannot act on a weight of shape {tuple(weight.shape)} sharded as "
            f"{tuple(weight.placements)}: {problem}, so no rank holds a whole group and the mean would need a "
            "collective. Shard conv weights along dim 0 (their output filters), as FSDP2's `fully_shard` does by "
            "default, or keep them replicated ('ddp_msr')."
        )
    if _groups(weight.shape, mode, transposed, groups) is None:
        return None  # a group of a single element: decided by the global shape, alike on every rank
    return _groups(local_shape(weight), mode, transposed, groups)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, MSRWarning, stacklevel=3)


def _grouped_view(tensor: Tensor, layout: KernelGroups) -> Optional[Tensor]:
    try:
        return tensor.view(layout)
    except RuntimeError:  # e.g. channels_last weights: no (out*in, k) view exists
        return None


_MEAN_VECTORS: dict[tuple, Tensor] = {}
_MV_MAX_NUMEL = 1 << 18


def _mean_vector(size: int, alpha: float, like: Tensor) -> Tensor:
    key = (size, alpha, like.dtype, like.device)
    vector = _MEAN_VECTORS.get(key)
    if vector is None:
        vector = _MEAN_VECTORS[key] = torch.full((size,), alpha / size, dtype=like.dtype, device=like.device)
    return vector


def _subtract_group_mean_(view: Tensor, alpha: float) -> None:
    """``view[a, :, b] -= alpha * mean(view[a, :, b])`` in place; the mean is accumulated in float32 or wider."""
    if (
        view.shape[2] == 1
        and view.dtype in (torch.float32, torch.float64)
        and view.is_contiguous()
        and (view.numel() < _MV_MAX_NUMEL or torch.get_num_threads() == 1)
    ):
        # The common case (every spatial kernel, every pointwise filter): the scaled means as one
        # matrix-vector product, about 1.5x faster than ``mean(dim, keepdim)`` on the tiny 3x3 groups of a
        # resnet on one thread. Multi-threaded BLAS gemv scales badly, so large tensors on several threads
        # take the reduction below (measured 2.3x faster there on a 512x512x3x3 gradient with 2 threads).
        rows = view.view(view.shape[0], view.shape[1])
        rows.sub_(torch.mv(rows, _mean_vector(rows.shape[1], alpha, rows)).unsqueeze(1))
        return
    if view.dtype in _LOW_PRECISION:
        mean = view.mean(dim=1, keepdim=True, dtype=torch.float32)
    else:
        mean = view.mean(dim=1, keepdim=True)
    if alpha != 1.0:
        mean.mul_(alpha)
    view.sub_(mean.to(view.dtype))


def project_groups_(tensor: Tensor, layout: KernelGroups, alpha: float = 1.0) -> Tensor:
    """Subtract ``alpha`` times the mean of every kernel group of ``layout`` from ``tensor``, in place.

    The form of :func:`project_mean_` for a training loop's hot path: ``layout`` comes once from
    :func:`kernel_groups`, and nothing is checked per call (``alpha`` in ``[0, 1]``, a ``layout`` of this
    tensor). A sharded tensor (FSDP2) has the layout of its local shard, whose groups are whole.

    Args:
        tensor: a gradient or weight shaped like the weight ``layout`` was taken from.
        layout: its :class:`KernelGroups`.
        alpha: fraction of the mean to remove.

    Returns:
        ``tensor``.

    Example::

        >>> import torch
        >>> from lightning_msr.functional import kernel_groups, project_groups_
        >>> grad = torch.randn(8, 4, 3, 3)
        >>> layout = kernel_groups(grad)
        >>> _ = project_groups_(grad, layout)
        >>> bool(grad.mean(dim=(1, 2, 3)).abs().max() < 1e-6)
        True
    """
    local = local_shard(tensor)
    view = _grouped_view(local, layout)
    if view is not None:
        _subtract_group_mean_(view, alpha)
        return tensor
    work = local.reshape(layout)  # a copy, in the logical (contiguous) order
    _subtract_group_mean_(work, alpha)
    local.copy_(work.view(local.shape))
    return tensor


def project_mean_(
    tensors: Union[Tensor, Iterable[Tensor]],
    alpha: float = 1.0,
    *,
    mode: Mode = "filter",
    transposed: bool = False,
    groups: int = 1,
) -> Union[Tensor, list[Tensor]]:
    r"""Subtract ``alpha`` times the kernel-group mean from each tensor, in place.

    For a gradient ``g`` this is the paper's weighted mean subtraction ``g <- g - alpha * mean(g)``.
    With ``alpha = 1`` it is the orthogonal projection onto the zero-mean subspace: idempotent, and the
    removed part is orthogonal to what remains. Because it is linear, projecting before or after a sum
    (a DDP all-reduce, gradient accumulation, gradient scaling) gives the same result.

    Tensors whose groups have a single element (e.g. the ``(C, 1, 1, 1)`` weight of a pointwise depthwise
    conv) cannot be centred and are left unchanged with a one-time warning. Low-precision tensors
    (``float16``/``bfloat16``) have their means accumulated in ``float32``.

    Args:
        tensors: one tensor or an iterable of tensors shaped like conv (or Linear) weights.
        alpha: fraction of the mean to remove, in ``[0, 1]``.
        mode: ``"filter"`` (the mean over each whole output filter, i.e. Gradient Centralization; the
            default, as for :class:`~lightning_msr.MSRSettings`) or ``"kernel"`` (the paper's per-kernel mean);
            see the module docstring.
        transposed: the tensors belong to a ``ConvTransposeNd`` (matters for pointwise kernels and
            ``mode="filter"``, see the module docstring).
        groups: the conv's ``groups`` (matters for transposed pointwise kernels only).

    Returns:
        The tensor, or the list of tensors, that was modified in place.

    Raises:
        MSRConfigurationError: if ``alpha`` or ``mode`` is out of range, or a tensor has fewer than 2 dims.

    Example::

        >>> import torch
        >>> from lightning_msr.functional import project_mean_
        >>> g = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])
        >>> project_mean_(g)
        tensor([[[[-2., -1.],
                  [ 0.,  3.]]]])
        >>> project_mean_(torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]]), alpha=0.5)
        tensor([[[[-0.5000,  0.5000],
                  [ 1.5000,  4.5000]]]])
    """
    alpha = _check_in_range("alpha", alpha, 0.0, 1.0)
    _check_choice("mode", mode, MODES)
    single = isinstance(tensors, Tensor)
    items = [tensors] if single else list(tensors)
    for tensor in items:
        if not isinstance(tensor, Tensor):
            raise MSRConfigurationError(f"Expected `tensors` to hold tensors, but got {type(tensor).__name__}.")
        layout = kernel_groups(tensor, mode, transposed, groups)
        if layout is None:
            _warn_once(
                f"A tensor of shape {tuple(tensor.shape)} has kernel groups of a single element and cannot be "
                "centred; it is left unchanged."
            )
            continue
        if alpha == 0.0:
            continue
        with torch.no_grad():
            project_groups_(tensor, layout, alpha)
    return items[0] if single else items


def mean_shift(weight: Tensor, *, mode: Mode = "filter", transposed: bool = False, groups: int = 1) -> Tensor:
    """How far ``weight`` is from the zero-mean isocline: the largest |kernel-group mean| over the weight's RMS.

    ``0`` means every kernel group (see ``mode``) is exactly zero-mean; a freshly built ``nn.Conv2d`` gives about
    ``1`` kernel-wise and ``0.05``-``0.5`` filter-wise (less for wider filters, whose means average more weights).
    The value is a float32 scalar tensor on the weight's device (``0`` for an all-zero weight or one whose
    groups cannot be centred). A weight holding a NaN or an infinity gives NaN (or inf), never 0, so a
    diverged model does not look zero-mean. For a sharded weight (an FSDP2 ``DTensor``) it is computed, with
    no collective, on the shard this rank holds.

    Args:
        weight: a conv (or Linear) weight.
        mode: ``"kernel"`` or ``"filter"``, as in :func:`project_mean_`.
        transposed: ``weight`` belongs to a ``ConvTransposeNd``.
        groups: the conv's ``groups``.

    Example::

        >>> import torch
        >>> from lightning_msr.functional import mean_shift
        >>> w = torch.ones(4, 2, 3, 3)
        >>> float(mean_shift(w))
        1.0
        >>> float(mean_shift(w - 1.0))
        0.0
    """
    _check_choice("mode", mode, MODES)
    layout = kernel_groups(weight, mode, transposed, groups)
    with torch.no_grad():
        w = local_shard(weight.detach()).float()
        if layout is None:
            return w.sum() * 0.0  # 0, or NaN when the weight holds NaN/inf
        if w.numel() == 0:
            return w.new_zeros(())  # an uneven split can leave a rank without rows
        rms = w.square().mean().sqrt()
        means = w.reshape(layout).mean(dim=1).abs().max()
        # Only an all-zero weight reads 0; a NaN/inf anywhere makes rms (and so the ratio) NaN or inf, so a
        # diverged model can never look zero-mean (NaN compares False, so `rms > 0` would have hidden it).
        return torch.where(rms == 0, 0.0, means / torch.clamp(rms, min=torch.finfo(torch.float32).tiny))


def filter_norms(
    weight: Tensor,
    mode: Mode = "filter",
    transposed: bool = False,
    groups: int = 1,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """The Euclidean norm of every output filter of a conv (or Linear) weight, broadcastable against it.

    With ``dtype`` the norms are accumulated in at least ``dtype``: ``float32`` gives float32 norms of
    float16/bfloat16/float32 weights and float64 norms of float64 weights (never a narrowing cast). A
    ConvTranspose weight ``(in, out / groups, *kernel)`` has its output filters across dim 0 within each group.
    For a sharded weight (FSDP2 along dim 0): the norms of the filters of the local shard, against which they
    broadcast; every filter is whole on its rank (``kernel_groups(..., keep_magnitude=True)`` checks that).

    Args:
        weight: the weight.
        mode: ``"kernel"`` or ``"filter"`` (the same filters: a filter is a slice along dim 0, or a
            ``ConvTranspose``'s output channel).
        transposed: the weight belongs to a ``ConvTransposeNd``.
        groups: the conv's ``groups``.
        dtype: accumulate in at least this dtype.

    Returns:
        A tensor of the norms, broadcastable against ``weight``.

    Example::

        >>> import torch
        >>> from lightning_msr.functional import filter_norms, zero_mean_init_
        >>> w = zero_mean_init_(torch.empty(4, 2, 3, 3), magnitude=2.0, generator=torch.Generator().manual_seed(0))
        >>> filter_norms(w).shape, torch.allclose(filter_norms(w), torch.tensor(2.0))
        (torch.Size([4, 1, 1, 1]), True)
    """
    w = weight
    w = local_shard(w)
    if dtype is not None:
        dtype = torch.promote_types(w.dtype, dtype)
    if transposed and w.dim() > 2:
        # ConvTranspose weight (in, out/g, *k): output channel j of group c reads w[c*in/g:(c+1)*in/g, j].
        view = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)
        norms = view.to(dtype or view.dtype).square().sum(dim=(1, 3), keepdim=True).sqrt()
        return norms.expand_as(view).reshape(w.shape)
    norms = torch.linalg.vector_norm(w.flatten(1), dim=1, dtype=dtype)  # no full-size copy for bf16 weights
    return norms.view(-1, *([1] * (w.dim() - 1)))


def _filter_dots(a: Tensor, b: Tensor, mode: Mode, transposed: bool, groups: int) -> Tensor:
    """``<a[f], b[f]>`` for every output filter ``f``, broadcastable against ``a``, with :func:`filter_norms`'s
    filters."""
    if transposed and a.dim() > 2:
        shape = (groups, a.shape[0] // groups, a.shape[1], -1)
        dots = (a.reshape(shape) * b.reshape(shape)).sum(dim=(1, 3), keepdim=True)
        return dots.expand((*shape[:3], a[0, 0].numel())).reshape(a.shape)
    return (a.flatten(1) * b.flatten(1)).sum(dim=1).view(-1, *([1] * (a.dim() - 1)))


def to_virtual_(
    weight: Tensor,
    grad: Tensor,
    norm: Tensor,
    virtual_norm: Tensor,
    *,
    mode: Mode = "filter",
    transposed: bool = False,
    groups: int = 1,
) -> None:
    r"""Turn a filter kept at ``norm`` into the virtual weight of a weight-normalised filter, in place, before a step.

    A weight-normalised filter ``W = norm * v / ||v||`` is scale-invariant in ``v``: its gradient has no radial
    part and is ``norm / ||v||`` times the gradient of ``W``'s direction. Here the weight held is ``W`` itself (at
    ``norm``, so the forward pass needs no division) and ``virtual_norm`` is ``||v||``. This gives the optimizer
    ``v`` and that gradient::

        grad   <- (norm / virtual_norm) * (grad - <grad, W> / norm**2 * W)
        weight <- (virtual_norm / norm) * W

    After the step, :func:`from_virtual_` takes ``||v||`` and rescales the weight back to ``norm``. Filters whose
    ``norm`` is 0 (all zero, free) are left as they are.

    Args:
        weight: a conv (or Linear) weight whose output filters have the norms ``norm``.
        grad: its gradient.
        norm: the filters' norms, broadcastable against ``weight`` (from :func:`filter_norms`).
        virtual_norm: the virtual weight's norms, of the same shape.
        mode: the filters' layout, as in :func:`filter_norms`.
        transposed: the weight belongs to a ``ConvTransposeNd``.
        groups: the conv's ``groups``.

    Example::

        >>> import torch
        >>> from lightning_msr.functional import filter_norms, from_virtual_, to_virtual_
        >>> w, g = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
        >>> norm = filter_norms(w)
        >>> to_virtual_(w, g, norm, norm * 0.5)  # ||v|| is half the norm: twice the gradient, no radial part
        >>> bool((g * w).flatten(1).sum(1).abs().max() < 1e-4), bool(torch.allclose(filter_norms(w), norm * 0.5))
        (True, True)
        >>> virtual = from_virtual_(w, norm)  # after the step: back to `norm`, with ||v|| returned
        >>> bool(torch.allclose(filter_norms(w), norm)), bool(torch.allclose(virtual, norm * 0.5))
        (True, True)
    """
    with torch.no_grad():
        w, g = local_shard(weight), local_shard(grad)
        norm, virtual_norm = norm.to(w.dtype), virtual_norm.to(w.dtype)
        free = norm == 0
        safe = torch.where(free, torch.ones_like(norm), norm)
        radial = _filter_dots(g, w, mode, transposed, groups).div_(safe.square()).masked_fill_(free, 0.0)
        g.sub_(radial * w).mul_(torch.where(free, torch.ones_like(norm), virtual_norm.reciprocal() * safe))
        w.mul_(torch.where(free, torch.ones_like(norm), virtual_norm / safe))


def from_virtual_(
    weight: Tensor, norm: Tensor, *, mode: Mode = "filter", transposed: bool = False, groups: int = 1
) -> Tensor:
    """After a step of the virtual weight :func:`to_virtual_` made: its filters' norms, and ``weight`` rescaled back
    to ``norm`` in place (filters whose ``norm`` is 0 left as they are). See :func:`to_virtual_`.

    Args:
        weight: the stepped virtual weight.
        norm: the norms to rescale the filters to, broadcastable against ``weight``.
        mode: the filters' layout, as in :func:`filter_norms`.
        transposed: the weight belongs to a ``ConvTransposeNd``.
        groups: the conv's ``groups``.

    Returns:
        The virtual weight's filter norms (float32 or wider), of ``norm``'s shape: the next step's ``virtual_norm``.

    Example::

        >>> import torch
        >>> from lightning_msr.functional import filter_norms, from_virtual_
        >>> w = torch.randn(3, 2, 3, 3)
        >>> virtual = from_virtual_(w, torch.ones(3, 1, 1, 1))
        >>> bool(torch.allclose(filter_norms(w), torch.ones(3, 1, 1, 1)))
        True
    """
    with torch.no_grad():
        virtual = filter_norms(weight, mode, transposed, groups, dtype=torch.float32)
        free = norm == 0
        tiny = torch.finfo(virtual.dtype).tiny
        ratio = torch.where(free, torch.ones_like(virtual), norm.to(virtual.dtype) / virtual.clamp(min=tiny))
        local_shard(weight).mul_(ratio.to(weight.dtype))
        return virtual


def zero_mean_init_(
    weight: Tensor,
    magnitude: float = 1.0,
    generator: Optional[torch.Generator] = None,
    *,
    mode: Mode = "filter",
    transposed: bool = False,
    groups: int = 1,
) -> Tensor:
    """Zero-mean initialisation (ZMI) in place: draw ``U(-1, 1)``, centre every kernel group, scale every filter.

    As in the authors' code, the weight is drawn uniformly in ``[-1, 1]``, each kernel group is centred
    (see the module docstring), and each output filter is rescaled to Euclidean norm ``magnitude``
    ("overall unity kernel magnitude" for the default ``1.0``). The draw uses ``generator`` when given, and
    then leaves the global RNG untouched; otherwise it draws from PyTorch's default generator.

    A weight whose groups have a single element cannot be centred; it is left unchanged with a warning.

    A sharded weight (an FSDP2 ``DTensor``) gets the same global values as an unsharded one: every rank draws the
    whole tensor from ``generator`` and keeps its own shard, with no collective -- so seed ``generator`` alike on
    every rank.

    Args:
        weight: a conv (or Linear) weight, changed in place.
        magnitude: the Euclidean norm of every output filter after initialisation (> 0).
        generator: the random generator to draw from (on the weight's device or the CPU).
        mode: ``"kernel"`` or ``"filter"``, as in :func:`project_mean_`.
        transposed: ``weight`` belongs to a ``ConvTransposeNd``.
        groups: the conv's ``groups``.

    Returns:
        ``weight``.

    Example::

        >>> import torch
        >>> from lightning_msr.functional import zero_mean_init_
        >>> w = zero_mean_init_(torch.empty(16, 8, 3, 3), generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(w.flatten(1).norm(dim=1), torch.ones(16))
        True
        >>> bool(w.mean(dim=(1, 2, 3)).abs().max() < 1e-6)
        True
    """
    magnitude = _check_positive("magnitude", magnitude)
    _check_choice("mode", mode, MODES)
    layout = _groups(weight.shape, mode, transposed, groups)
    if layout is None:
        _warn_once(
            f"A weight of shape {tuple(weight.shape)} has kernel groups of a single element and cannot be "
            "zero-mean initialised; it is left unchanged."
        )
        return weight
    with torch.no_grad():
        draw_device = generator.device if generator is not None else weight.device
        fresh = torch.rand(weight.shape, generator=generator, device=draw_device, dtype=torch.float64)
        fresh = fresh.mul_(2.0).sub_(1.0).to(weight.device)
        project_groups_(fresh, layout, 1.0)
        norms = filter_norms(fresh, mode, transposed, groups)
        fresh.mul_(magnitude / norms.clamp(min=1e-12))
        copy_shard_(weight, fresh)
    return weight


def adaptive_clip_(parameters: Iterable[Tensor], clip: float, eps: float = 1e-3) -> None:
    r"""Unit-wise adaptive gradient clipping (Brock et al. 2021, NFNets), in place on each parameter's ``.grad``.

    Every *unit* -- an output filter ``W[o]`` of a conv (a row of any weight of 2 or more dims), or a single
    element of a 1-D gain or bias -- has its gradient scaled down so that ``||g_unit|| <= clip * max(||w_unit||,
    eps)``. The step can then change no unit by more than ``lr * clip`` of its own size, which is what keeps a
    network without normalisation stable at BatchNorm's learning rates. Scaling a whole filter's gradient by one
    number keeps a projected (zero-mean) gradient zero-mean. Parameters without a gradient are skipped. The
    norms are computed in float32 (or wider) and nothing is copied to the host.

    Args:
        parameters: the parameters whose ``.grad`` is clipped.
        clip: the largest allowed ratio of a unit's gradient norm to its weight norm (> 0); NFNets use
            0.01-0.16, smaller for larger batches.
        eps: the smallest weight norm used, so that zero-initialised units can still move.

    Raises:
        MSRConfigurationError: if ``clip`` or ``eps`` is not a positive number.

    Example::

        >>> import torch
        >>> from lightning_msr.functional import adaptive_clip_
        >>> w = torch.nn.Parameter(torch.ones(2, 4))  # two units of norm 2
        >>> w.grad = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.01, 0.0, 0.0, 0.0]])
        >>> adaptive_clip_([w], clip=0.1)
        >>> w.grad.norm(dim=1)  # the first unit clipped to 0.1 * 2, the second one left alone
        tensor([0.2000, 0.0100])
    """
    clip = _check_positive("clip", clip)
    eps = _check_positive("eps", eps)
    with torch.no_grad():
        vectors: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        for param in parameters:
            grad = param.grad
            if grad is None:
                continue
            if param.dim() <= 1:  # element-wise units: clipped together, a constant number of operations per group
                key = (grad.device, grad.dtype)
                weights, grads = vectors.setdefault(key, ([], []))
                weights.append(param)  # under no_grad: no `detach()`, which would be one more call per parameter
                grads.append(grad)
                continue
            accumulate = torch.float32 if grad.dtype in _LOW_PRECISION else None
            w_norm = torch.linalg.vector_norm(param.detach().flatten(1), dim=1, dtype=accumulate)
            g_norm = torch.linalg.vector_norm(grad.flatten(1), dim=1, dtype=accumulate)
            shape = (-1,) + (1,) * (param.dim() - 1)
            limit = w_norm.clamp(min=eps).mul_(clip)
            factor = (limit / g_norm.clamp(min=1e-6)).clamp_(max=1.0)
            grad.mul_(factor.view(shape).to(grad.dtype))
        for weights, grads in vectors.values():
            if grads[0].dtype in _LOW_PRECISION:
                weights, low = [w.float() for w in weights], grads
                grads = [g.float() for g in grads]
            else:
                low = None
            limits = torch._foreach_abs(weights)
            torch._foreach_clamp_min_(limits, eps)
            torch._foreach_mul_(limits, clip)
            sizes = torch._foreach_abs(grads)
            torch._foreach_clamp_min_(sizes, 1e-6)
            torch._foreach_div_(limits, sizes)
            torch._foreach_clamp_max_(limits, 1.0)
            torch._foreach_mul_(grads, limits)
            if low is not None:
                for target, value in zip(low, grads):
                    target.copy_(value)


class _Section:
    """A contiguous run of a bank's buffer holding kernels whose groups have one shape: ``size`` elements each
    (``ragged=False``: spatial kernels, a ``(groups, size, 1)`` view), or groups that are whole filters of different
    sizes (``ragged=True``: pointwise convs, Linear rows, ``mode="filter"``; ``lengths`` their sizes)."""

    def __init__(self, start: int, stop: int, size: int, lengths: Optional[Tensor]) -> None:
        self.start, self.stop, self.size, self.lengths = start, stop, size, lengths
        self._views: dict[int, Tensor] = {}

    def view(self, buffer: Tensor) -> Tensor:
        """This section of ``buffer`` (made once per buffer: a view is an operator call too)."""
        view = self._views.get(id(buffer))
        if view is None:
            view = buffer[self.start : self.stop]
            view = view if self.lengths is not None else view.view(-1, self.size, 1)
            self._views[id(buffer)] = view
        return view

    def project_(self, buffer: Tensor, alpha: float) -> None:
        view = self.view(buffer)
        if self.lengths is None:
            _subtract_group_mean_(view, alpha)  # the per-weight path's own projection
            return
        means = torch.segment_reduce(view, "mean", lengths=self.lengths)
        if alpha != 1.0:
            means.mul_(alpha)
        view.sub_(torch.repeat_interleave(means, self.lengths, output_size=view.numel()))


def _unit_lengths(param: Tensor) -> Tensor:
    """Elements per adaptive-clipping unit of ``param``: its output filters (rows), or its elements if 1-D."""
    if param.dim() <= 1:
        return torch.ones(param.numel(), dtype=torch.long)
    return torch.full((param.shape[0],), param.numel() // param.shape[0], dtype=torch.long)


class KernelBank:
    """Weights of one device and dtype whose per-step work takes a constant number of tensor operations.

    The per-weight functions (:func:`project_groups_`, :func:`adaptive_clip_`, :func:`filter_norms`) launch a few
    operations for every weight, so the work of a step grows with the depth of the network -- on a GPU, each is a
    kernel launch of a few microseconds whatever its size. A bank copies every gradient (or weight) it holds into one
    flat buffer with one ``torch._foreach_copy_``, projects each kind of kernel group (3x3 kernels, 5x5 kernels,
    whole filters) on its own run of the buffer, clips every unit of the whole buffer with one set of segment
    operations, and copies the results back with one more: about fifteen operations for the clipping and three per
    kind of kernel, however many layers the network has. The results equal the per-weight functions' within
    float32 rounding. The buffers cost one copy of the parameters it holds and one of their gradients.

    Besides the kernels (centred and clipped), a bank can hold parameters that are only clipped
    (:func:`adaptive_clip_`'s units: rows of a weight of 2 or more dims, elements of a 1-D one): ``clipped``, relative
    to their own size (the free stem, Linear weights, per-channel scales), and ``offsets``, relative to ``max(|b|,
    offset_eps)`` (biases).

    Every parameter must be a contiguous, unsharded ``float32``/``float64`` tensor, and every kernel's output filters
    contiguous runs of whole kernel groups: conv and Linear weights with the layout of :func:`kernel_groups` (not a
    ``ConvTranspose``, whose output filters are strided); see :meth:`accepts`.

    Args:
        params: the kernels (all parameters of one device and dtype).
        layouts: their :class:`KernelGroups`, from :func:`kernel_groups`.
        clipped: parameters clipped (not centred) relative to their own size.
        offsets: parameters clipped relative to ``max(|b|, offset_eps)``.
        offset_eps: the smallest size of an offset (1: the calibrated signal's standard deviation).

    Example::

        >>> import torch
        >>> from lightning_msr.functional import KernelBank, kernel_groups
        >>> weights = [torch.nn.Parameter(torch.randn(8, 4, 3, 3)), torch.nn.Parameter(torch.randn(8, 8, 1, 1))]
        >>> bias = torch.nn.Parameter(torch.zeros(8))
        >>> for p in (*weights, bias):
        ...     p.grad = torch.randn_like(p)
        >>> bank = KernelBank(weights, [kernel_groups(w) for w in weights], offsets=[bias])
        >>> bank.project_and_clip_(alpha=1.0, clip=0.1)
        >>> spatial, pointwise = (w.grad for w in weights)
        >>> bool(spatial.mean(dim=(1, 2, 3)).abs().max() < 1e-6), bool(pointwise.mean(dim=1).abs().max() < 1e-6)
        (True, True)
        >>> ratio = weights[0].grad.flatten(1).norm(dim=1) / weights[0].flatten(1).norm(dim=1)
        >>> bool(ratio.max() <= 0.1 + 1e-6), bool(bias.grad.abs().max() <= 0.1 + 1e-6)  # a zero bias moves by 0.1
        (True, True)
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        layouts: Sequence[KernelGroups],
        clipped: Sequence[Tensor] = (),
        offsets: Sequence[Tensor] = (),
        offset_eps: float = 1.0,
    ) -> None:
        params, layouts, clipped, offsets = list(params), list(layouts), list(clipped), list(offsets)
        for p, layout in zip(params, layouts):
            why = self.why_not(p, layout)
            if why is not None:
                raise MSRConfigurationError(f"Expected weights a KernelBank can hold, but got one that {why}.")
        for p in clipped + offsets:
            why = self.why_not(p, None, centred=False)
            if why is not None:
                raise MSRConfigurationError(f"Expected parameters a KernelBank can hold, but got one that {why}.")
        members = params + clipped + offsets
        if not members:
            raise MSRConfigurationError("Expected at least one parameter for a KernelBank, but got none.")
        if len({(p.device, p.dtype) for p in members}) > 1:
            raise MSRConfigurationError("Expected the weights of a KernelBank to share one device and one dtype.")
        self.offset_eps = _check_positive("offset_eps", offset_eps)
        # the kernels by kind of group, each kind a contiguous run of the buffer: fixed sizes first, whole filters last
        kinds: dict[int, list[tuple[Tensor, KernelGroups]]] = {}
        for p, layout in zip(params, layouts):
            kinds.setdefault(0 if layout.outer == p.shape[0] else layout.size, []).append((p, layout))
        ordered = sorted(kinds.items(), key=lambda item: (item[0] == 0, item[0]))
        self.params, self.clipped, self.offsets = params, clipped, offsets
        self._kernels = [p for _, entries in ordered for p, _ in entries]  # in buffer order
        self.members = self._kernels + clipped + offsets  # every parameter held, in buffer order
        device, dtype = members[0].device, members[0].dtype
        self._sections, offset = [], 0
        for size, entries in ordered:
            numel = sum(p.numel() for p, _ in entries)
            lengths = None
            if size == 0:
                lengths = torch.cat([_unit_lengths(p) for p, _ in entries]).to(device)
            self._sections.append(_Section(offset, offset + numel, size, lengths))
            offset += numel
        self._kernel_numel = offset
        self.numel = sum(p.numel() for p in self.members)
        self.grads = torch.empty(self.numel, device=device, dtype=dtype)
        self.weights = torch.empty(self.numel, device=device, dtype=dtype)
        self.grad_views = self._views(self.grads, self.members)
        self.weight_views = self._views(self.weights, self.members)
        self.kernel_weights = self.weights[: self._kernel_numel]
        # every clipping unit of the buffer (output filters, elements of 1-D parameters), its size and its eps
        self.unit_lengths = torch.cat([_unit_lengths(p) for p in self.members]).to(device)
        self._kernel_units = sum(_unit_lengths(p).numel() for p in self._kernels)
        self._kernel_lengths = self.unit_lengths[: self._kernel_units]
        self._offset_units = sum(_unit_lengths(p).numel() for p in offsets)
        self._eps_for: Optional[tuple[float, Tensor]] = None
        self._targets: Optional[tuple[Tensor, Optional[Tensor]]] = None

    @staticmethod
    def _views(buffer: Tensor, params: list[Tensor]) -> list[Tensor]:
        views, offset = [], 0
        for p in params:
            views.append(buffer[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        return views

    @staticmethod
    def why_not(weight: Tensor, layout: Optional[KernelGroups], centred: bool = True) -> Optional[str]:
        """Why ``weight`` (a kernel with ``layout``; with ``centred=False`` a parameter only clipped) cannot be held
        by a bank, or ``None``."""
        if centred and layout is None:
            return "has no kernel group to centre"
        if weight.dtype not in (torch.float32, torch.float64):
            return f"is stored in {weight.dtype} (a bank holds float32 or float64)"
        if local_shard(weight) is not weight:
            return "is sharded"
        if not weight.is_contiguous():
            return "is not contiguous (e.g. channels_last)"
        if not centred:
            return None
        if layout.inner != 1 or layout.outer * layout.size != weight.numel():
            return "has strided kernel groups (a ConvTranspose's pointwise weight)"
        if layout.outer != weight.shape[0] and layout.outer % weight.shape[0]:
            return "has output filters that are not whole runs of kernel groups"
        return None

    @staticmethod
    def accepts(weight: Tensor, layout: Optional[KernelGroups], transposed: bool = False, centred: bool = True) -> bool:
        """Whether a bank can hold ``weight``: see :meth:`why_not`; a ``ConvTranspose`` kernel never (its output
        filters are strided across dim 0)."""
        return not (transposed and centred) and KernelBank.why_not(weight, layout, centred) is None

    def _eps(self, eps: float) -> Tensor:
        """The smallest size of every unit: ``eps``, and ``offset_eps`` for the offsets (made once per ``eps``)."""
        if self._eps_for is None or self._eps_for[0] != eps:
            values = torch.full(self.unit_lengths.shape, eps, device=self.weights.device, dtype=self.weights.dtype)
            if self._offset_units:
                values[-self._offset_units :] = self.offset_eps
            self._eps_for = (eps, values)
        return self._eps_for[1]

    def _unit_norms(self, buffer: Tensor, lengths: Tensor) -> Tensor:
        return torch.segment_reduce(buffer * buffer, "sum", lengths=lengths).sqrt_()

    def project_and_clip_(self, alpha: float, clip: Optional[float], eps: float = 1e-3) -> None:
        """On the ``.grad`` of every parameter (all must exist): subtract ``alpha`` times each kernel group's mean
        (as :func:`project_groups_`), then clip every unit's gradient to ``clip`` times its size (as
        :func:`adaptive_clip_`, with ``eps`` and, for the offsets, ``offset_eps``; ``None``: no clipping)."""
        if alpha == 0.0 and clip is None:
            return
        with torch.no_grad():
            grads = [p.grad for p in self.members]
            torch._foreach_copy_(self.grad_views, grads)
            if alpha != 0.0:
                for section in self._sections:
                    section.project_(self.grads, alpha)
            if clip is not None:
                torch._foreach_copy_(self.weight_views, self.members)
                limit = torch.maximum(self._unit_norms(self.weights, self.unit_lengths), self._eps(eps)).mul_(clip)
                factors = limit.div_(self._unit_norms(self.grads, self.unit_lengths).clamp_(min=1e-6)).clamp_(max=1.0)
                self.grads.mul_(torch.repeat_interleave(factors, self.unit_lengths, output_size=self.numel))
            torch._foreach_copy_(grads, self.grad_views)

    def filter_norms(self) -> Tensor:
        """The norm of every kernel's output filter, in the buffer's order (for :meth:`keep_norms`)."""
        with torch.no_grad():
            torch._foreach_copy_(self.weight_views[: len(self._kernels)], self._kernels)
            return self._unit_norms(self.kernel_weights, self._kernel_lengths)

    def keep_norms(self, targets: Optional[Sequence[Tensor]] = None) -> None:
        """Make ``targets`` (default: the norms now) the filter norms :meth:`recenter_and_rescale_` restores; a
        filter whose target is 0 is left free. ``targets`` are per kernel (``filter_norms`` of each, in the order of
        the ``params`` given to the bank), as the per-weight path keeps them."""
        with torch.no_grad():
            if targets is None:
                target = self.filter_norms()
            else:
                by_param = {id(p): t for p, t in zip(self.params, targets)}
                target = torch.cat([by_param[id(p)].flatten() for p in self._kernels])
            target = target.to(device=self.weights.device, dtype=self.weights.dtype)
            free = target == 0
            self._targets = (target, free if bool(free.any()) else None)

    def recenter_and_rescale_(self, recenter: bool, rescale: bool) -> None:
        """On the kernels: re-centre every kernel group (``recenter``) and rescale every output filter back to the
        norm :meth:`keep_norms` kept (``rescale``)."""
        if not (recenter or rescale):
            return
        if rescale and self._targets is None:
            raise MSRConfigurationError("KernelBank.recenter_and_rescale_(rescale=True) needs `keep_norms()` first.")
        with torch.no_grad():
            kernels = self.weight_views[: len(self._kernels)]
            torch._foreach_copy_(kernels, self._kernels)
            if recenter:
                for section in self._sections:
                    section.project_(self.weights, 1.0)
            if rescale:
                target, free = self._targets
                norms = self._unit_norms(self.kernel_weights, self._kernel_lengths)
                ratio = target / norms.clamp_(min=torch.finfo(target.dtype).tiny)
                if free is not None:
                    ratio.masked_fill_(free, 1.0)
                self.kernel_weights.mul_(
                    torch.repeat_interleave(ratio, self._kernel_lengths, output_size=self._kernel_numel)
                )
            torch._foreach_copy_(self._kernels, kernels)


@dataclass(frozen=True)
class KernelWeight:
    """One weight that Mean Shift Rejection acts on, with what is needed to find its kernel groups.

    Attributes:
        name: the parameter's qualified name in the model, e.g. ``"layer1.0.conv1.weight"``.
        module: the module owning the parameter.
        parameter: the weight itself.
        transposed: the module is a ``ConvTransposeNd``.
        groups: the module's ``groups`` (1 for Linear).
        centrable: ``False`` when its kernel groups have a single element (never projected).

    Example::

        >>> from torch import nn
        >>> from lightning_msr.functional import eligible_weights, mean_shift
        >>> (up,) = eligible_weights(nn.Sequential(nn.ConvTranspose2d(4, 6, 2, groups=2)))
        >>> up.name, up.transposed, up.groups, up.centrable
        ('0.weight', True, 2, True)
        >>> float(mean_shift(up.parameter, **up.layout_kwargs())) > 0
        True
    """

    name: str
    module: nn.Module
    parameter: nn.Parameter
    transposed: bool
    groups: int
    centrable: bool

    def layout_kwargs(self) -> dict:
        """``transposed`` and ``groups`` as keyword arguments of the functions in this module."""
        return {"transposed": self.transposed, "groups": self.groups}


def eligible_weights(
    model: nn.Module,
    *,
    include_linear: bool = False,
    exclude: Optional[Sequence[str]] = None,
    include_stem: bool = True,
) -> list[KernelWeight]:
    """The weights Mean Shift Rejection acts on: every conv weight (and optionally every Linear weight).

    Convolutions are the subclasses of ``torch.nn.modules.conv._ConvNd`` (``Conv1d/2d/3d``,
    ``ConvTranspose1d/2d/3d`` and user subclasses such as timm's ``StdConv2d``). Biases, norms and
    embeddings are never included. Lazy modules that have not been materialised yet, and weights under
    ``torch.nn.utils.parametrize``, are left out (the caller decides whether to warn). A parameter shared by
    several modules is listed once.

    Args:
        model: the model to search.
        include_linear: also return ``nn.Linear`` weights (centred over their inputs).
        exclude: module-name patterns (``fnmatch`` syntax, e.g. ``"stem.*"``) whose weights are left out.
            Every pattern must match a module of ``model``.
        include_stem: also return the stem, :func:`stem_conv`. ``False`` leaves it out.

    Raises:
        MSRConfigurationError: for an ``exclude`` pattern that matches no module (a typo would otherwise
            silently act on the layer meant to be left out).

    Example::

        >>> from torch import nn
        >>> from lightning_msr.functional import eligible_weights
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
        >>> [w.name for w in eligible_weights(net)]
        ['0.weight']
        >>> [w.name for w in eligible_weights(net, include_linear=True)]
        ['0.weight', '3.weight']
    """
    _check_bool("include_linear", include_linear)
    _check_bool("include_stem", include_stem)
    patterns = _check_names("exclude", exclude)
    _check_patterns_match("exclude", patterns, model)
    found: list[KernelWeight] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if patterns and any(fnmatchcase(module_name, p) for p in patterns):
            continue
        is_conv = isinstance(module, nn.modules.conv._ConvNd)
        is_linear = include_linear and isinstance(module, nn.Linear)
        if not (is_conv or is_linear):
            continue
        weight = module._parameters.get("weight")
        if not isinstance(weight, nn.Parameter) or isinstance(weight, nn.parameter.UninitializedParameter):
            continue
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        transposed = bool(is_conv and getattr(module, "transposed", False))
        groups = int(getattr(module, "groups", 1)) if is_conv else 1
        layout = _groups(weight.shape, "kernel", transposed, groups)
        name = f"{module_name}.weight" if module_name else "weight"
        found.append(KernelWeight(name, module, weight, transposed, groups, layout is not None))
    if not include_stem:
        stem = stem_conv(model)
        found = [w for w in found if w.module is not stem]
    return found


def stem_conv(model: nn.Module) -> Optional[nn.Module]:
    """The conv that reads the network's input: the first conv layer of ``model`` in module order, if the model
    has more than one; ``None`` otherwise.

    A zero-mean kernel is a high-pass filter. On the input itself it throws away the local mean -- brightness,
    colour, a silhouette against its background -- and no later layer can get it back; deeper layers see
    rectified features, whose means carry that information on. Leaving the stem free measured 2-10 points
    better on Fashion-MNIST (``docs/concepts/settings.md``). Users normalise inputs anyway, so the stem has no
    mean shift to reject. Module order is the order in which a model registers its layers; in every
    torchvision classifier, and in most hand-written networks, the stem comes first.

    Example::

        >>> from torch import nn
        >>> from lightning_msr.functional import eligible_weights, stem_conv
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        >>> stem_conv(net) is net[0]
        True
        >>> [w.name for w in eligible_weights(net, include_stem=False)]
        ['2.weight']
    """
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return convs[0] if len(convs) > 1 else None
