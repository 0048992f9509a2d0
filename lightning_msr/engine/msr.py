"""Mean Shift Rejection on any model and optimizer, through PyTorch's own hooks: the engine.

:class:`MSREngine` does everything :class:`~lightning_msr.MeanShiftRejection` does, without a Trainer: it adopts
the model (BatchNorm replaced, the optimizer's param groups updated), draws the zero-mean kernels, calibrates on
the first training batches (a forward pre-hook of the model), and runs the per-step work from the optimizer's step
hooks and the kernels' post-accumulate-grad hooks (:mod:`lightning_msr.engine.step`). The callback is an adapter
that creates it at ``setup`` and tells it *when*; Lightning Fabric and plain loops use it directly.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.fabric.wrappers import is_wrapped
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_msr._checks import _check_bool, _shown
from lightning_msr._sharding import is_sharded
from lightning_msr.calibration import CalibrationReport
from lightning_msr.engine.first_batch import FirstBatch
from lightning_msr.engine.settings import MSRSettings
from lightning_msr.engine.step import StepWork
from lightning_msr.exceptions import MSRConfigurationError, MSRWarning
from lightning_msr.functional import (
    KernelWeight,
    eligible_weights,
    kernel_groups,
    mean_shift,
    project_mean_,
    stem_conv,
    zero_mean_init_,
)
from lightning_msr.surgery import find_batchnorm, replace_batchnorm

__all__ = ["MSREngine"]

# A model whose kernels are all this close to zero mean is taken to be initialised (or trained) with MSR.
_ALREADY_CENTRED = 1e-4
# Set on a model once it has been initialised, so that no second fit (or second engine) redraws it.
_INIT_FLAG = "_lightning_msr_initialized"
# ... with the settings it was initialised with, to say so when a later fit asks for others.
_INIT_SETTINGS = "_lightning_msr_init_settings"

Optimizers = Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer], None]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _world_size() -> int:
    return torch.distributed.get_world_size() if _distributed() else 1


def _broadcast_(tensor: Tensor) -> None:
    """Copy rank 0's values into ``tensor`` on every process (a no-op outside ``torch.distributed``).

    A sharded (FSDP2) tensor is left alone: each rank holds different rows, drawn from the same seed."""
    if is_sharded(tensor) or _world_size() == 1:
        return
    torch.distributed.broadcast(tensor.data, src=0)


def _sum_over_processes(tensor: Tensor) -> Tensor:
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def _plain_weight(module: nn.Module) -> bool:
    weight = module._parameters.get("weight")
    return isinstance(weight, nn.Parameter) and not isinstance(weight, nn.parameter.UninitializedParameter)


def _as_list(optimizers: Optimizers) -> list[torch.optim.Optimizer]:
    if optimizers is None:
        return []
    listed = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    for index, optimizer in enumerate(listed):
        optimizer = _unwrapped(optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise MSRConfigurationError(
                f"Expected `optimizers` to be a torch.optim.Optimizer or a list of them, but got "
                f"{type(optimizer).__name__} at index {index}."
            )
        listed[index] = optimizer
    return listed


def _unwrapped(optimizer: Any) -> Any:
    """The optimizer inside Lightning Fabric's ``_FabricOptimizer`` (and ``LightningOptimizer``), whose ``step``
    runs the wrapped one's hooks."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in settings.items())


class MSREngine(MSRSettings):
    r"""Mean Shift Rejection on a model and its optimizer(s), for Lightning Fabric and plain PyTorch loops.

    Created on a model and its optimizer(s), it does at once what the
    :class:`~lightning_msr.MeanShiftRejection` callback does at ``setup`` and fit start, and from then on what the
    callback does at every batch, through PyTorch's own hooks -- nothing else in the loop changes:

    * **now**: BatchNorm is handled as ``batchnorm`` says (``"replace"`` folds it into the convs, and the
      optimizers' param groups get the new parameters in the old ones' places, see
      :func:`~lightning_msr.replace_batchnorm`'s ``optimizers``); every conv filter (``mode="kernel"``: every
      kernel) is drawn zero-mean (``init``), and, under ``torch.distributed``, rank 0's draw is broadcast;
    * **the first training forward passes** (a forward pre-hook of the model, in training mode with gradients
      enabled) calibrate the gains, pooled over ``calibration_samples`` samples summed over processes;
    * **every optimizer step**: the gradient projection runs in each kernel's post-accumulate-grad hook as soon
      as its gradient exists (``alpha == 1``) or in a step pre-hook, the adaptive clipping in a step pre-hook (so
      after DDP's all-reduce, after ``GradScaler.step``'s unscaling, after gradient accumulation), and the
      re-centring and ``keep_magnitude`` in a step post-hook; on the CPU with ``torch.optim.SGD`` one fused C pass
      does all of it with SGD's update (``implementation``).

    Create it **before** wrapping the model (``fabric.setup``, ``DistributedDataParallel``): the surgery must
    happen before DDP's reducer holds the parameters. With ``optimizers=None`` the model is adopted and drawn
    now, and :meth:`attach` adds the optimizers later (e.g. one built after the surgery). Save
    :meth:`state_dict` with the model's and the optimizer's (``fabric.save`` does it for you when the engine is in
    the state dict) and restore it with :meth:`load_state_dict` after the model's weights. :meth:`detach` (or the
    end of a ``with`` block) removes every hook; the model keeps its weights and new layers.

    Args:
        model: the model, changed in place (surgery, initialisation, calibration).
        optimizers: the optimizer(s) that step ``model``'s parameters, or ``None`` to :meth:`attach` later.
            Lightning Fabric's wrapped optimizers are accepted.
        resuming_from: the weights will be loaded from this checkpoint: nothing is drawn (BatchNorm is still
            replaced, so that the checkpoint's new layers have a home), and the first batch is not calibrated
            unless :meth:`load_state_dict` restores a calibration that was still pooling.
        broadcast_draw: under ``torch.distributed``, copy rank 0's draw to every process now. DDP broadcasts rank 0's
            weights when it wraps the model anyway; this covers a model wrapped already and ranks seeded differently.
            The callback turns it off before DDP wraps the model.
        **settings: the arguments of :class:`~lightning_msr.MSRSettings` -- exactly those of the
            ``MeanShiftRejection`` callback, with the same defaults and meanings.

    Raises:
        MSRConfigurationError: for a bad setting (see :class:`~lightning_msr.MSRSettings`), a model with BatchNorm
            and ``batchnorm="error"``, a wrapped model with ``batchnorm="replace"``, an ``exclude`` pattern that
            matches no module, or a model without conv layers with ``strict=True``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_msr import MSREngine
        >>> from lightning_msr.functional import mean_shift
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
        ...                       nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        >>> _ = model(torch.randn(1, 1, 8, 8))  # materialise the lazy head
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> msr = MSREngine(model, optimizer, batchnorm="replace", calibration_samples=4)
        >>> for _ in range(3):
        ...     x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 2, (4,))
        ...     loss = nn.functional.cross_entropy(model(x), y)
        ...     optimizer.zero_grad()
        ...     loss.backward()
        ...     optimizer.step()
        >>> bool(mean_shift(model[3].weight) < 1e-5), msr.calibration.complete
        (True, True)
        >>> msr.detach()
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: Optimizers = None,
        *,
        resuming_from: Optional[str] = None,
        broadcast_draw: bool = True,
        **settings: Any,
    ) -> None:
        super().__init__(**settings)
        if not isinstance(model, nn.Module):
            raise MSRConfigurationError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
        model = self._unwrap_fabric(model)
        optimizers = _as_list(optimizers)
        self._model_ref = weakref.ref(model)
        self._resuming_from = resuming_from
        self._initialized = False
        self._calibration_due = False
        self._restored_state = False
        self._restored_norms: Optional[dict[str, Tensor]] = None
        self._restored_virtual_norms: Optional[dict[str, Tensor]] = None
        self._restored_calibration: Optional[dict[str, Any]] = None
        self._forward_handle: Optional[RemovableHandle] = None
        self._first: Optional[FirstBatch] = None
        self.replaced: dict[str, nn.Module] = self._adopt(model, optimizers)
        self._work = self._collect(model)
        if self._initialize(model) and _check_bool("broadcast_draw", broadcast_draw):
            for w in self._work.weights:
                _broadcast_(w.parameter)
        if optimizers:
            self.attach(optimizers)

    # ------------------------------------------------------------------ read-only views
    @property
    def model(self) -> Optional[nn.Module]:
        """The model this engine works on (``None`` once it no longer exists: the engine holds it weakly)."""
        return self._model_ref()

    @property
    def weights(self) -> list[KernelWeight]:
        """The weights acted on."""
        return list(self._work.weights)

    @property
    def acted_on(self) -> list[str]:
        """The names of the weights acted on."""
        return [w.name for w in self._work.weights]

    @property
    def fused(self) -> bool:
        """Whether the per-step work takes the fused path (see ``implementation``)."""
        return self._work.fused

    @property
    def projects_in_backward(self) -> bool:
        """Whether gradients are projected during backward (see ``projection_timing``)."""
        return self._work.project_in_backward

    @property
    def initialized(self) -> bool:
        """Whether the model's weights are MSR's (drawn, centred, or restored from an MSR checkpoint)."""
        return self._initialized

    @property
    def calibration(self) -> Optional[CalibrationReport]:
        """What the first training batches found or set (``None`` before the first training forward)."""
        return self._first.report if self._first is not None else None

    def uses_recentering(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the kernels are re-centred after ``optimizer``'s steps (non-linear optimizers, clipping by
        value, or ``recenter=True``)."""
        return self._work.uses_recentering(_unwrapped(optimizer))

    def _model(self) -> nn.Module:
        model = self._model_ref()
        if model is None:
            raise RuntimeError("MSREngine: the model it was created on no longer exists.")
        return model

    # ------------------------------------------------------------------ adopting and drawing the model
    def _unwrap_fabric(self, model: nn.Module) -> nn.Module:
        """The user's module inside a model that ``fabric.setup`` returned; refused when BatchNorm is to be replaced,
        since DDP (or FSDP) inside it already holds the old parameters."""
        if not is_wrapped(model):
            return model
        inner = model.module
        if self._batchnorm in ("replace", "affine") and find_batchnorm(inner):
            raise MSRConfigurationError(
                f"MSREngine(batchnorm={self._batchnorm!r}) got a model that `fabric.setup` has wrapped already, whose "
                "BatchNorm layers its strategy (DDP's reducer, FSDP's shards) holds. Create the engine before "
                "`fabric.setup`: `msr = MSREngine(model, optimizer, ...)`, then `model, optimizer = "
                "fabric.setup(model, optimizer)`."
            )
        return inner
    def _adopt(self, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, nn.Module]:
        names = list(find_batchnorm(model))
        if not names:
            return {}
        shown = _shown(names)
        if self._batchnorm == "error":
            raise MSRConfigurationError(
                f"MeanShiftRejection(batchnorm='error'): the model still contains {len(names)} BatchNorm "
                f"layer(s) ({shown}). MSR replaces minibatch statistics; use `batchnorm='replace'` to swap them "
                "for a per-channel scale and bias, add `lightning_msr.DeepControl()`, or remove them."
            )
        if self._batchnorm == "warn":
            rank_zero_warn(
                f"The model still contains {len(names)} BatchNorm layer(s) ({shown}); they keep using minibatch "
                "statistics. Pass `MeanShiftRejection(batchnorm='replace')` (or add `DeepControl()`) to replace "
                "them, or `batchnorm='error'` to refuse such models.",
                category=MSRWarning,
            )
            return {}
        kind = "fold" if self._batchnorm == "replace" else "affine"
        return dict(replace_batchnorm(model, kind, optimizers=optimizers))

    def _collect(self, model: nn.Module) -> StepWork:
        weights = eligible_weights(model, include_linear=self._include_linear, exclude=self._exclude)
        # the free stem (unless excluded): not centred, but calibrated and clipped like the convs MSR acts on
        stem = None if self._include_stem else stem_conv(model)
        stem = stem if any(w.module is stem for w in weights) else None
        weights = [w for w in weights if w.module is not stem]
        skipped = [w.name for w in weights if not kernel_groups(w.parameter.shape, self._mode, w.transposed, w.groups)]
        weights = [w for w in weights if w.name not in skipped]
        if skipped:
            rank_zero_warn(
                f"MeanShiftRejection leaves {len(skipped)} weight(s) alone whose kernel groups have a single "
                f"element and cannot be centred (e.g. pointwise depthwise convs): {skipped[:5]}",
                category=MSRWarning,
            )
        unusable = [
            name for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd) and not _plain_weight(m)
        ]
        if unusable:
            rank_zero_warn(
                f"MeanShiftRejection cannot act on {len(unusable)} conv layer(s) whose `weight` is not a plain, "
                f"materialised parameter (lazy modules, parametrizations, weight_norm): {unusable[:5]}",
                category=MSRWarning,
            )
        if not weights:
            message = (
                "MeanShiftRejection found no conv layer to act on in the model"
                + (f" outside `exclude`={list(self._exclude)}" if self._exclude else "")
                + ". It needs nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d layers "
                "(or `include_linear=True` for nn.Linear)."
            )
            if self._strict:
                raise MSRConfigurationError(message + " (raised because `strict=True`)")
            rank_zero_warn(message, category=MSRWarning)
        return StepWork(self, model, weights, stem)

    def refresh(self) -> None:
        """Adopt and collect the model again, e.g. for a second fit, or after something replaced its parameters
        (FSDP2's ``fully_shard`` in ``configure_model``); nothing is drawn again. Call :meth:`attach` afterwards."""
        self.detach()
        model = self._model()
        self.replaced.update(self._adopt(model, []))
        self._work = self._collect(model)

    def mark_resumed(self, source: str) -> None:
        """The weights were just restored from the checkpoint ``source`` (after this engine drew them): they are
        never recalibrated, and the first batch is not watched, unless :meth:`load_state_dict` restored a
        calibration that was still pooling."""
        self._resuming_from = source
        self._calibration_due = False
        self._first = None

    def parameters_replaced(self) -> bool:
        """Whether a module's ``weight`` is no longer the parameter collected (see :meth:`refresh`)."""
        return any(w.module._parameters.get("weight") is not w.parameter for w in self._work.weights)

    def _initialize(self, model: nn.Module) -> bool:
        """Initialise or centre the weights as ``init`` says; returns whether any weight changed."""
        weights = self._work.weights
        if self._init == "none" or not weights:
            return False
        if getattr(model, _INIT_FLAG, False):
            self._explain_no_redraw(model)
            self._initialized = True
            return False  # never re-initialise a model (second fit, second callback)
        if self._resuming_from is not None:
            rank_zero_info(
                f"MeanShiftRejection: resuming from {self._resuming_from!r}; the checkpoint's weights are kept."
            )
            self._mark_initialized(model)
            return False
        weights = self._leave_frozen_alone(weights)
        if not weights:
            self._mark_initialized(model)
            return False
        kwargs = [{"mode": self._mode, **w.layout_kwargs()} for w in weights]
        if self._init == "zero_mean":
            worst = max(float(mean_shift(w.parameter, **kw)) for w, kw in zip(weights, kwargs))
            if worst < _ALREADY_CENTRED:
                rank_zero_info(
                    "MeanShiftRejection: every kernel is already zero-mean (trained or initialised with MSR); "
                    "keeping the weights instead of drawing new ones."
                )
            else:
                seed = self._seed if self._seed is not None else torch.initial_seed()
                generator = torch.Generator(device="cpu").manual_seed(seed % (2**63))
                for w, kw in zip(weights, kwargs):
                    zero_mean_init_(w.parameter, self._init_magnitude, generator, **kw)
                self._calibration_due = self._calibrate
                rank_zero_info(
                    f"MeanShiftRejection: zero-mean initialised {len(weights)} weight(s) with filter norm "
                    f"{self._init_magnitude:g}."
                )
        else:
            for w, kw in zip(weights, kwargs):
                project_mean_(w.parameter.data, 1.0, **kw)
            rank_zero_info(f"MeanShiftRejection: centred the kernels of {len(weights)} existing weight(s).")
        self._mark_initialized(model)
        return True

    def _mark_initialized(self, model: nn.Module) -> None:
        object.__setattr__(model, _INIT_FLAG, True)
        object.__setattr__(model, _INIT_SETTINGS, self._init_settings())
        self._initialized = True

    def _init_settings(self) -> dict[str, Any]:
        if self._init == "zero_mean":
            return {"init": self._init, "init_magnitude": self._init_magnitude, "seed": self._seed}
        return {"init": self._init}

    def _explain_no_redraw(self, model: nn.Module) -> None:
        """A model is initialised once: say so, loudly when this fit asks for other settings than the first."""
        before = getattr(model, _INIT_SETTINGS, None)
        now = self._init_settings()
        if before is None or before == now:
            rank_zero_info("MeanShiftRejection: the model was initialised by an earlier fit; its weights are kept.")
            return
        rank_zero_warn(
            f"MeanShiftRejection: the model was already initialised by an earlier fit ({_settings_text(before)}), "
            f"so it is not initialised again with {_settings_text(now)}: the weights it has now are kept. To draw new "
            "kernels, build a new model (or call `lightning_msr.functional.zero_mean_init_` on its conv weights) "
            "before `fit`.",
            category=MSRWarning,
        )

    def _leave_frozen_alone(self, weights: list[KernelWeight]) -> list[KernelWeight]:
        """The weights ``init`` may change: frozen ones (``requires_grad=False``, e.g. a pretrained backbone)
        are neither redrawn nor centred, and the user is told so once."""
        frozen = [w.name for w in weights if not w.parameter.requires_grad]
        if frozen:
            action = "redraws" if self._init == "zero_mean" else "centres"
            rank_zero_warn(
                f"MeanShiftRejection leaves {len(frozen)} frozen conv weight(s) (requires_grad=False) as they are: "
                f"init={self._init!r} {action} only trainable weights ({_shown(frozen)}). Frozen kernels keep "
                "their values and their mean, and are not projected or re-centred while frozen; once unfrozen "
                "their gradients are projected. To have them centred too, unfreeze them before `fit`, or call "
                "`lightning_msr.functional.project_mean_` on them; to keep MSR off them entirely, list them in "
                "`exclude`.",
                category=MSRWarning,
            )
        return [w for w in weights if w.parameter.requires_grad]

    def check_restored_kernels(self, source: str) -> None:
        """After the weights were restored from ``source`` (a checkpoint) with no MSR state in it: if they were
        not trained with MSR their kernels are not zero-mean. With ``init="center"`` they are centred now (what
        the user asked for); otherwise a warning says so and how to centre them -- a checkpoint's weights are
        never changed without being asked."""
        weights = self._work.weights
        if self._restored_state or self._init == "none" or not weights:
            return
        shifts = [float(mean_shift(w.parameter, mode=self._mode, **w.layout_kwargs())) for w in weights]
        worst = max(shifts)
        if not worst > _ALREADY_CENTRED:  # NaN too: a diverged checkpoint is no reason to centre
            return
        where = weights[shifts.index(worst)].name
        if self._init == "center":
            trainable = self._leave_frozen_alone(weights)
            for w in trainable:
                project_mean_(w.parameter.data, 1.0, mode=self._mode, **w.layout_kwargs())
            rank_zero_info(
                f"MeanShiftRejection(init='center'): the checkpoint {source!r} was not trained with MSR "
                f"(worst mean shift {worst:.3g} in {where!r}); centred the kernels of {len(trainable)} restored "
                "weight(s)."
            )
            return
        rank_zero_warn(
            f"MeanShiftRejection: the checkpoint {source!r} was not trained with MeanShiftRejection: its "
            f"kernels are not zero-mean (worst mean shift {worst:.3g} in {where!r}), and they are kept as they are. "
            "The gradients are projected from now on, so the kernels keep this mean for the rest of training. To "
            "centre the restored kernels, resume with `MeanShiftRejection(init='center')`.",
            category=MSRWarning,
        )

    def _warn_low_precision(self) -> None:
        """Half-precision weights (``precision='bf16-true'``/``'16-true'``) cannot hold the isocline exactly."""
        low = [w for w in self._work.weights if w.parameter.dtype in (torch.float16, torch.bfloat16)]
        if not low:
            return
        dtype = low[0].parameter.dtype
        eps = torch.finfo(dtype).eps
        norms = (
            f" and `keep_magnitude` holds the filter norms to about {eps:.0e} relative" if self._keep_magnitude else ""
        )
        rank_zero_warn(
            f"MeanShiftRejection acts on {len(low)} weight(s) stored in {dtype} (e.g. `precision='bf16-true'`). "
            f"{dtype} rounds every weight to about {eps:.0e} relative, so the kernels stay zero-mean only to "
            f"that precision (`msr/mean_shift` reads about {eps / 2:.0e}, not 1e-7)"
            + norms
            + ". The means and norms are computed in float32, but the stored weights cannot keep more. For exact "
            "MSR keep float32 weights with mixed precision: `precision='bf16-mixed'` (or '16-mixed').",
            category=MSRWarning,
        )

    # ------------------------------------------------------------------ attaching the hooks
    def attach(
        self,
        optimizers: Optimizers,
        *,
        run_before_step: bool = True,
        fused_blocked_by: Optional[str] = None,
        fuse_update: Optional[Any] = None,
        clip_by_value: bool = False,
        watch_forward: bool = True,
        backward_allowed: bool = True,
    ) -> MSREngine:
        """Attach the per-step and first-batch work to ``optimizers`` (replacing an earlier attachment).

        The keyword arguments are for adapters such as the Lightning callback, which call :meth:`batch_start`,
        :meth:`before_optimizer_step` and :meth:`batch_end` themselves at the right moments:
        ``run_before_step=False`` registers no step pre-hook for :meth:`before_optimizer_step`,
        ``watch_forward=False`` no forward pre-hook for :meth:`batch_start`; ``fused_blocked_by`` is a reason the
        fused path cannot be taken, ``fuse_update(optimizer)`` whether the fused pass may also do that SGD
        optimizer's update (default: nothing looks at the gradients between backward and the step), and
        ``clip_by_value`` that gradients are clipped by value (the kernels are then re-centred after each step),
        ``backward_allowed=False`` that gradients must not be projected in backward (a DDP communication hook that
        is not linear, e.g. PowerSGD, runs after backward). Returns the engine.
        """
        optimizers = _as_list(optimizers)
        self.detach()
        self._warn_low_precision()
        fused = self._choose_fused(fused_blocked_by)
        # "auto" off the CPU (a GPU) where the fused kernel is not taken: the grouped path, whose launch count does
        # not grow with depth; on the CPU the per-weight path measured faster (docs/benchmarks/op_count.md)
        off_cpu = any(w.parameter.device.type != "cpu" for w in self._work.weights)
        grouped = not fused and (self._implementation == "grouped" or (self._implementation == "auto" and off_cpu))
        # the grouped path projects at the step, in its banks, unless asked for backward hooks
        backward = self._timing == "backward" or (
            self._timing == "auto" and self._alpha == 1.0 and backward_allowed and not grouped
        )
        check = fuse_update or (lambda optimizer: True)
        self._work.attach(
            optimizers,
            fused=fused,
            grouped=grouped,
            backward=backward,
            fuse_update=lambda opt: StepWork.can_fuse_update(opt) and check(opt),
            clip_by_value=clip_by_value,
            run_before_step=run_before_step,
        )
        self._work.set_before_step(self.before_optimizer_step)
        if self._first is None:  # once per engine (a second fit is not a start), or after a restore
            self._first = self._new_first_batch()
        self._keep_norms()
        if watch_forward:
            self._forward_handle = self._model().register_forward_pre_hook(self._forward_pre)
        return self

    def _choose_fused(self, blocked_by: Optional[str]) -> bool:
        if self._implementation in ("eager", "grouped") or not self._work.weights:
            return False
        reason = self._work.why_not_fused(blocked_by)
        if reason is None:
            return True
        if self._implementation == "fused":
            rank_zero_warn(
                f"MeanShiftRejection(implementation='fused') runs the eager per-step path instead: {reason}.",
                category=MSRWarning,
            )
        else:
            off_cpu = any(w.parameter.device.type != "cpu" for w in self._work.weights)
            path = "grouped" if off_cpu else "eager"
            rank_zero_info(f"MeanShiftRejection: the {path} per-step path runs ({reason}).")
        return False

    def _new_first_batch(self) -> FirstBatch:
        model = self._model()
        convs = [w.module for w in self._work.weights]
        if self._work.stem is not None:
            convs.append(self._work.stem)
        restored = self._restored_calibration
        due = self._calibration_due or restored is not None
        resumed = self._resuming_from is not None or self._restored_state
        self._restored_calibration = None
        return FirstBatch(
            model,
            convs,
            residual_scale=self._residual_scale,
            samples=self._calibration_samples,
            exclude=self._exclude,
            advice_calibrate=self._calibrate and self._init == "zero_mean",
            due=due,
            state=restored,
            # a resumed run is not the start whose signal the first-batch check is for (its hooks would also
            # change how later hooks run, and so the resumed run's last bits), unless it goes on calibrating
            done=resumed and not due,
        )

    def _keep_norms(self) -> None:
        # a fresh draw that is calibrated has its norms taken once the calibration is complete
        keeps = self._keep_magnitude or self._scale_invariant
        if keeps and not (self._first is not None and self._first.due):
            self._work.keep_norms(self._restored_norms, self._restored_virtual_norms)
            self._restored_norms = self._restored_virtual_norms = None
        elif not keeps:
            self._work.target_norms = {}

    def _forward_pre(self, module: nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self.batch_start()

    # ------------------------------------------------------------------ the moments
    def batch_start(self) -> None:
        """Before a training forward: kernels unfrozen since the last batch come under projection, and the first
        one arms the calibration (or the signal check)."""
        self._work.watch_unfrozen()
        if self._first is not None and self._first.pending and self._work.weights:
            self._first.start(_sum_over_processes if _world_size() > 1 else None)

    def batch_end(self) -> None:
        """After a training step: the first batch's work is finished (unless the calibration pools on)."""
        if self._first is not None and self._first.open and self._first.finish(_broadcast_):
            self._keep_norms()

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Once per optimizer step, on the final gradients: the projection (unless done in backward) and the
        adaptive clipping. A step pre-hook runs it unless :meth:`attach` was told ``run_before_step=False``."""
        self.batch_end()
        self._work.before_step(_unwrapped(optimizer))

    def current_mean_shift(self) -> Tensor:
        """The largest :func:`~lightning_msr.functional.mean_shift` over the weights acted on (0 if none)."""
        shifts = [mean_shift(w.parameter, mode=self._mode, **w.layout_kwargs()) for w in self._work.weights]
        return torch.stack(shifts).max() if shifts else torch.zeros(())

    def detach(self) -> None:
        """Remove every hook this engine registered (the model keeps its weights and layers)."""
        self._work.detach()
        if self._first is not None:
            self._first.close()
        if self._forward_handle is not None:
            self._forward_handle.remove()
            self._forward_handle = None

    def __enter__(self) -> MSREngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: whether the weights are MSR's, the norms ``keep_magnitude`` (or
        ``scale_invariant``) keeps, ``scale_invariant``'s virtual norms, and the pooled statistics of a calibration
        that is still pooling."""
        state: dict[str, Any] = {"initialized": self._initialized, "alpha": self._alpha, "mode": self._mode}
        pooling = self._first.state_dict() if self._first is not None else None
        if pooling is not None:
            state["calibration"] = pooling
        if (self._keep_magnitude or self._scale_invariant) and self._work.target_norms:
            state["kept_norms"] = self._work.kept_norms()
        if self._scale_invariant and self._work.virtual_norms:
            state["virtual_norms"] = self._work.kept_virtual_norms()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after the model's weights): the weights are a checkpoint's, so nothing is
        calibrated again unless the checkpoint was taken while the calibration pooled, which then goes on."""
        self._restored_state = True
        self._restored_norms = state_dict.get("kept_norms")
        self._restored_virtual_norms = state_dict.get("virtual_norms")
        self._restored_calibration = state_dict.get("calibration") if self._calibrate else None
        self._initialized = bool(state_dict.get("initialized", self._initialized))
        self._calibration_due = False  # the weights come from a checkpoint
        model = self._model_ref()
        if model is not None and self._initialized:
            object.__setattr__(model, _INIT_FLAG, True)
        if self._first is not None:  # attached already (Fabric, plain loops): apply now
            self._first.close()
            self._first = self._new_first_batch()
            self._keep_norms()
