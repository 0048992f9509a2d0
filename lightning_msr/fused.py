"""The per-step work of Mean Shift Rejection in one pass over each weight, fused with SGD's update.

Eager PyTorch does the per-step work of :class:`~lightning_msr.MeanShiftRejection` as separate passes over memory:
the projection reads each conv gradient twice and writes it once, the adaptive clipping reads the gradient and
the weight again and rewrites the gradient, and the optimizer then reads the gradient, the weight and its
momentum buffer for its own update (``keep_magnitude`` and the re-centring after adaptive optimizers read and
write the weights twice more). The functions here do all of it filter by filter, while each filter is in cache:
one read and one write of every tensor.

* :func:`sgd_step_` -- projection, adaptive clipping, ``torch.optim.SGD``'s update and the optional re-centring
  and filter-norm rescaling, in a single pass over gradient, weight and momentum buffer;
* :func:`project_and_clip_` -- projection and adaptive clipping of the gradients in one pass (before any other
  optimizer's step);
* :func:`recenter_and_rescale_` -- re-centring and filter-norm rescaling of the weights in one pass (after an
  adaptive optimizer's step).

They equal the eager functions (:func:`~lightning_msr.functional.project_mean_`,
:func:`~lightning_msr.functional.adaptive_clip_`, ``torch.optim.SGD``) within float32 rounding. Every filter is
handled by one thread in a fixed order, so the result does not depend on the number of threads: DDP ranks stay
bit-identical and a resumed run repeats the uninterrupted one bit for bit.

The kernel is a small C file (``lightning_msr/csrc/msr_fused.c``, no PyTorch headers) compiled once per machine
with the system C compiler (``$CC``, else ``cc``) in about a second and cached under ``$LIGHTNING_MSR_CACHE``
(default ``~/.cache/lightning_msr``). It handles contiguous float32 CPU weights that are not sharded (and
``ConvTranspose`` weights with spatial kernels); :func:`fused_unavailable` and :func:`unsupported` say why something
cannot take it.

Example::

    >>> import torch
    >>> from lightning_msr.functional import mean_shift, zero_mean_init_
    >>> from lightning_msr.fused import FusedWeight, fused_unavailable, sgd_step_
    >>> w = torch.nn.Parameter(zero_mean_init_(torch.empty(8, 4, 3, 3), generator=torch.Generator().manual_seed(0)))
    >>> w.grad = torch.randn_like(w)
    >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    >>> if fused_unavailable() is None:  # a C compiler is needed
    ...     _ = sgd_step_(opt, [FusedWeight.of(w, clip=0.1)])  # projected and clipped, then SGD's update
    >>> bool(mean_shift(w) < 1e-6)  # the filters are still zero-mean
    True
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from lightning_msr._checks import _check_choice, _check_in_range, _check_positive
from lightning_msr._sharding import is_sharded
from lightning_msr.exceptions import MSRConfigurationError
from lightning_msr.functional import MODES, kernel_groups

__all__ = [
    "FusedWeight",
    "fused_unavailable",
    "project_and_clip_",
    "recenter_and_rescale_",
    "sgd_step_",
    "unsupported",
]

_SOURCE = Path(__file__).parent / "csrc" / "msr_fused.c"
_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-pthread")
_ABI_VERSION = 4
# the flags of the C kernel
_PROJECT, _CLIP, _SGD, _MOMENTUM, _FRESH, _NESTEROV, _MAXIMIZE, _RECENTER, _KEEP, _WRITE_GRAD = (
    1 << i for i in range(10)
)
_GRADIENT_WORK = _PROJECT | _CLIP  # what reads and changes the gradient
_WEIGHT_WORK = _RECENTER | _KEEP  # what changes the weight after its update

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_failure: Optional[str] = None
_compile_seconds: Optional[float] = None


def _cache_dir() -> Path:
    root = os.environ.get("LIGHTNING_MSR_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning_msr"


def _machine_key() -> bytes:
    """What the compiled code depends on besides its source: the CPU (``-march=native``) and the compiler."""
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name")):
                cpu += line
    return cpu.encode()


def _build(compiler: str) -> ctypes.CDLL:
    import time

    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *_FLAGS)).encode() + _machine_key()).hexdigest()[:16]
    target = _cache_dir() / f"msr_fused-{key}.so"
    if not target.exists():
        global _compile_seconds
        target.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        # build beside the target and rename: ranks of one machine compiling at once never see half a file
        fd, partial = tempfile.mkstemp(prefix=target.stem, suffix=".so.partial", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run(
                [compiler, *_FLAGS, "-o", partial, str(_SOURCE), "-lm"], capture_output=True, text=True, timeout=120
            )
            if done.returncode != 0:
                raise OSError(f"{compiler} failed: {(done.stderr or done.stdout).strip()[:300]}")
            os.replace(partial, target)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(partial)
        _compile_seconds = time.perf_counter() - start
    library = ctypes.CDLL(str(target))
    if library.msr_fused_abi_version() != _ABI_VERSION:
        raise OSError(f"{target} is not this version's kernel")
    library.msr_fused_rows.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    library.msr_fused_rows.restype = None
    return library


def _load() -> Optional[ctypes.CDLL]:
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is None and _failure is None:
            compiler = os.environ.get("CC") or "cc"
            if platform.system() == "Windows":
                _failure = "the fused kernel is built with a POSIX C compiler, and this is Windows"
            elif shutil.which(compiler) is None:
                _failure = f"no C compiler was found (`{compiler}`; set $CC to one)"
            else:
                try:
                    _library = _build(compiler)
                except (OSError, subprocess.SubprocessError) as err:
                    _failure = f"the fused kernel could not be built or loaded: {err}"
    return _library


def fused_unavailable() -> Optional[str]:
    """Why the fused kernel cannot run on this machine (no C compiler, a failed build), or ``None`` if it can.

    The first call compiles the kernel if it is not cached yet (about a second).

    Example::

        >>> from lightning_msr.fused import fused_unavailable
        >>> reason = fused_unavailable()
        >>> reason is None or isinstance(reason, str)
        True
    """
    _load()
    return _failure


def compile_seconds() -> Optional[float]:
    """How long this process spent compiling the kernel (``None`` if it was loaded from the cache, or not built).

    Example::

        >>> from lightning_msr.fused import compile_seconds, fused_unavailable
        >>> _ = fused_unavailable()  # loads the kernel, building it first if this machine has no cached copy
        >>> seconds = compile_seconds()
        >>> seconds is None or seconds > 0
        True
    """
    return _compile_seconds


def unsupported(
    tensor: Tensor, *, transposed: bool = False, mode: str = "filter", keep_magnitude: bool = False
) -> Optional[str]:
    """Why ``tensor`` (a weight, or its gradient) cannot take the fused kernel, or ``None`` if it can.

    The kernel works on rows of the weight: every kernel group must lie inside one row (dim 0), and the norms it
    keeps must be those of the rows. A ``ConvTranspose`` weight ``(in, out / groups, *kernel)`` qualifies with
    spatial kernels, unless ``keep_magnitude`` holds the norms of its output channels (in either ``mode``).

    Example::

        >>> import torch
        >>> from lightning_msr.fused import unsupported
        >>> unsupported(torch.zeros(4, 2, 3, 3)) is None
        True
        >>> unsupported(torch.zeros(4, 2, 3, 3, dtype=torch.bfloat16))
        'its dtype is torch.bfloat16 (the fused kernel takes float32)'
    """
    if is_sharded(tensor):
        return "it is sharded (a DTensor)"
    if tensor.device.type != "cpu":
        return f"it is on {tensor.device} (the fused kernel runs on the CPU)"
    if tensor.dtype != torch.float32:
        return f"its dtype is {tensor.dtype} (the fused kernel takes float32)"
    if tensor.dim() < 2:
        return "it has fewer than 2 dims"
    if not tensor.is_contiguous():
        return "it is not contiguous (e.g. channels_last)"
    if transposed:  # its kernels' groups in either mode
        if math.prod(tensor.shape[2:]) <= 1:
            return "it is a pointwise ConvTranspose weight, whose kernel groups run across its rows"
        if keep_magnitude:
            return "it is a ConvTranspose weight, whose output filters (the norms `keep_magnitude` holds) are not rows"
    return None


@dataclass(frozen=True)
class FusedWeight:
    """One weight and the per-step work the fused kernel does on it.

    Build it with :meth:`of`. Each output filter (row) of ``parameter`` is a sequence of kernel groups of
    ``group`` values.

    Attributes:
        parameter: the weight (contiguous float32 on the CPU, see :func:`unsupported`).
        group: the size of one kernel group.
        alpha: fraction of each group's mean removed from the gradient (``0``: no projection).
        clip: the adaptive clipping ratio of each filter's gradient to its weight (``None``: no clipping).
        eps: the smallest weight norm the clipping uses.
        recenter: re-centre the weight's kernel groups after the update.
        target: the filter norms to rescale to after the update (float32, one per output filter; ``0`` leaves a
            filter free), or ``None``.

    Example::

        >>> import torch
        >>> from lightning_msr.fused import FusedWeight
        >>> FusedWeight.of(torch.nn.Parameter(torch.zeros(8, 4, 3, 3))).group  # the whole filter
        36
        >>> FusedWeight.of(torch.nn.Parameter(torch.zeros(8, 4, 3, 3)), mode="kernel").group  # each spatial kernel
        9
    """

    parameter: Tensor
    group: int
    alpha: float = 1.0
    clip: Optional[float] = None
    eps: float = 1e-3
    recenter: bool = False
    target: Optional[Tensor] = None
    _work: int = field(init=False, repr=False, compare=False)  # the kernel's flags for the work above

    def __post_init__(self) -> None:
        work = (
            (_PROJECT if self.alpha > 0.0 else 0)
            | (_CLIP if self.clip is not None else 0)
            | (_RECENTER if self.recenter else 0)
            | (_KEEP if self.target is not None else 0)
        )
        object.__setattr__(self, "_work", work)

    @classmethod
    def of(
        cls,
        parameter: Tensor,
        *,
        mode: str = "filter",
        transposed: bool = False,
        groups: int = 1,
        alpha: float = 1.0,
        clip: Optional[float] = None,
        eps: float = 1e-3,
        recenter: bool = False,
        target: Optional[Tensor] = None,
    ) -> FusedWeight:
        """The description of ``parameter`` (a conv or Linear weight) with its kernel groups as in
        :func:`~lightning_msr.functional.project_mean_` with ``mode``.

        Raises:
            MSRConfigurationError: if ``parameter`` cannot take the fused kernel, or an argument is out of range.
        """
        _check_choice("mode", mode, MODES)
        alpha = _check_in_range("alpha", alpha, 0.0, 1.0)
        eps = _check_positive("eps", eps)
        if clip is not None:
            clip = _check_positive("clip", clip)
        why = unsupported(parameter, transposed=transposed, mode=mode, keep_magnitude=target is not None)
        if why is not None:
            shape = tuple(parameter.shape)
            raise MSRConfigurationError(f"The fused kernel cannot take a weight of shape {shape}: {why}.")
        layout = kernel_groups(parameter.shape, mode, transposed, groups)
        length = parameter.numel() // parameter.shape[0] if parameter.shape[0] else 0
        group = layout.size if layout is not None else max(length, 1)
        if layout is None:  # groups of a single element: nothing to centre
            alpha, recenter = 0.0, False
        if target is not None:
            target = target.detach().reshape(-1)
            if target.dtype != torch.float32 or target.numel() != parameter.shape[0] or not target.is_contiguous():
                raise MSRConfigurationError(
                    f"Expected `target` to hold one float32 norm per output filter ({parameter.shape[0]}), but got "
                    f"{target.numel()} values of {target.dtype}."
                )
        return cls(parameter, group, alpha, clip, eps, recenter, target)


def _fits(tensor: Tensor, weight: Tensor) -> bool:
    return (
        tensor.shape == weight.shape
        and tensor.dtype == torch.float32
        and tensor.device.type == "cpu"
        and tensor.is_contiguous()
    )


def _row(
    weight: FusedWeight, flags: int, grad: Optional[Tensor] = None, buffer: Optional[Tensor] = None
) -> list[int]:
    """The kernel's description of ``weight`` for one call: its (and its gradient's and buffer's) addresses, read
    now, and its layout."""
    p = weight.parameter
    for tensor, name in ((p, "weight"), (grad, "gradient"), (buffer, "momentum buffer")):
        if tensor is not None and not _fits(tensor, p):  # never hand the kernel an address it would misread
            raise MSRConfigurationError(
                f"The fused kernel needs a contiguous float32 CPU {name} of the weight's shape {tuple(p.shape)}, "
                f"but got {tuple(tensor.shape)} ({unsupported(tensor) or 'another shape'})."
            )
    rows = p.shape[0]
    return [
        p.data_ptr(),
        grad.data_ptr() if grad is not None else 0,
        buffer.data_ptr() if buffer is not None else 0,
        weight.target.data_ptr() if weight.target is not None else 0,
        rows,
        p.numel() // rows if rows else 0,
        weight.group,
        flags,
    ]


def _reals(weight: FusedWeight, lr: float = 0.0, decay: float = 0.0, momentum: float = 0.0, damp: float = 0.0):
    return [weight.alpha, weight.clip or 0.0, weight.eps, lr, decay, momentum, damp, 0.0]


def _run(ints: list[list[int]], reals: list[list[float]]) -> None:
    """One call of the kernel over every described weight (the caller holds the tensors it points to)."""
    library = _load()
    if library is None:
        raise MSRConfigurationError(f"The fused kernel is not available: {_failure}")
    if not ints:
        return
    int_table = torch.tensor(ints, dtype=torch.int64)
    real_table = torch.tensor(reals, dtype=torch.float64)
    library.msr_fused_rows(len(ints), int_table.data_ptr(), real_table.data_ptr(), torch.get_num_threads())


def project_and_clip_(weights: Sequence[FusedWeight]) -> None:
    """Projection and adaptive clipping of each weight's ``.grad``, in place, in one pass per filter.

    The same as :func:`~lightning_msr.functional.project_mean_` followed by
    :func:`~lightning_msr.functional.adaptive_clip_` (within float32 rounding). Weights without a gradient are
    skipped.

    Example::

        >>> import torch
        >>> from lightning_msr.fused import FusedWeight, fused_unavailable, project_and_clip_
        >>> w = torch.nn.Parameter(torch.randn(4, 2, 3, 3))
        >>> w.grad = torch.randn_like(w) * 100
        >>> if fused_unavailable() is None:
        ...     project_and_clip_([FusedWeight.of(w, clip=0.1)])
        ...     print(bool((w.grad.flatten(1).norm(dim=1) <= 0.1 * w.flatten(1).norm(dim=1) * 1.0001).all()))
        ... else:
        ...     print(True)
        True
    """
    ints, reals = [], []
    for weight in weights:
        grad, work = weight.parameter.grad, weight._work & _GRADIENT_WORK
        if grad is not None and work:
            ints.append(_row(weight, work | _WRITE_GRAD, grad))
            reals.append(_reals(weight))
    _run(ints, reals)


def recenter_and_rescale_(weights: Sequence[FusedWeight]) -> None:
    """Re-centring (if ``recenter``) and filter-norm rescaling (if ``target``) of each weight, in one pass.

    The same as ``project_mean_(weight.data)`` followed by rescaling every output filter to its ``target`` norm
    (filters whose target is 0 are left as they are).

    Example::

        >>> import torch
        >>> from lightning_msr.fused import FusedWeight, fused_unavailable, recenter_and_rescale_
        >>> w = torch.nn.Parameter(torch.randn(4, 2, 3, 3))
        >>> if fused_unavailable() is None:
        ...     recenter_and_rescale_([FusedWeight.of(w, recenter=True, target=torch.ones(4))])
        ...     print(torch.allclose(w.flatten(1).norm(dim=1), torch.ones(4)))
        ... else:
        ...     print(True)
        True
    """
    ints, reals = [], []
    for weight in weights:
        work = weight._work & _WEIGHT_WORK
        if work:
            ints.append(_row(weight, work))
            reals.append(_reals(weight))
    _run(ints, reals)


def sgd_step_(optimizer: torch.optim.SGD, weights: Sequence[FusedWeight]) -> list[Tensor]:
    """``optimizer.step()`` for ``weights`` with the projection, clipping, re-centring and rescaling fused in.

    For every weight that ``optimizer`` (a ``torch.optim.SGD``) steps and that has a gradient: project and clip the
    gradient (in a per-thread row buffer: ``.grad`` is only read, and is left as it was), apply SGD's update with
    the weight's param-group settings (``lr``, ``momentum``, ``dampening``, ``nesterov``, ``weight_decay``,
    ``maximize``; the momentum buffer is kept in ``optimizer.state`` exactly where SGD keeps it), then re-centre
    and rescale the weight. The optimizer's other
    parameters are not touched: step them as usual (e.g. with the fused ones' ``.grad`` set to ``None``).

    Returns:
        The parameters that were updated.

    Raises:
        MSRConfigurationError: if ``optimizer`` is not a plain ``torch.optim.SGD`` (a subclass may change the
            update) or uses ``differentiable=True``.

    Example::

        >>> import torch
        >>> from lightning_msr.fused import FusedWeight, fused_unavailable, sgd_step_
        >>> w = torch.nn.Parameter(torch.ones(2, 1, 1, 2))
        >>> w.grad = torch.tensor([[[[1.0, 3.0]]], [[[2.0, 2.0]]]])
        >>> opt = torch.optim.SGD([w], lr=0.5)
        >>> if fused_unavailable() is None:
        ...     _ = sgd_step_(opt, [FusedWeight.of(w)])
        ... else:
        ...     w.data = torch.tensor([[[[1.5, 0.5]]], [[[1.0, 1.0]]]])
        >>> w.data.flatten().tolist()  # the projected gradients [-1, 1] and [0, 0], times lr 0.5
        [1.5, 0.5, 1.0, 1.0]
    """
    if type(optimizer) is not torch.optim.SGD:
        raise MSRConfigurationError(
            f"Expected `optimizer` to be a torch.optim.SGD, but got {type(optimizer).__name__}: the fused step "
            "reproduces SGD's own update."
        )
    if _load() is None:  # before any momentum buffer is created
        raise MSRConfigurationError(f"The fused kernel is not available: {_failure}")
    by_id = {id(w.parameter): w for w in weights}
    ints, reals, updated = [], [], []
    for group in optimizer.param_groups:
        if group.get("differentiable", False):
            raise MSRConfigurationError("Expected a torch.optim.SGD with differentiable=False for the fused step.")
        lr, momentum = float(group["lr"]), float(group["momentum"])
        decay, damp = float(group["weight_decay"]), float(group["dampening"])
        base = _SGD | (_NESTEROV if group["nesterov"] else 0) | (_MAXIMIZE if group.get("maximize", False) else 0)
        for param in group["params"]:
            weight = by_id.get(id(param))
            if weight is None or param.grad is None:
                continue
            flags, buffer = base | weight._work, None
            if momentum != 0.0:
                flags |= _MOMENTUM
                state = optimizer.state[param]
                buffer = state.get("momentum_buffer")
                if buffer is None:  # SGD's first step: the buffer starts as the update itself
                    buffer = state["momentum_buffer"] = torch.empty_like(param, memory_format=torch.contiguous_format)
                    flags |= _FRESH
            ints.append(_row(weight, flags, param.grad, buffer))
            reals.append(_reals(weight, lr, decay, momentum, damp))
            updated.append(param)
    _run(ints, reals)
    return updated
