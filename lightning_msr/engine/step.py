"""The per-step work of Mean Shift Rejection: what happens to the kernels at every optimizer step.

:class:`StepWork` owns the hooks that run it -- a post-accumulate-grad hook per kernel (the projection in
backward), optimizer step pre-hooks (the fused SGD update) and step post-hooks (re-centring, ``keep_magnitude``)
-- and :meth:`StepWork.before_step`, the projection and adaptive clipping on the final gradients, which the
Lightning callback calls from ``on_before_optimizer_step`` and :class:`~lightning_msr.MSREngine` from a step
pre-hook. The math is :mod:`lightning_msr.functional` (eager) and :mod:`lightning_msr.fused` (one C pass).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_msr._sharding import is_sharded, local_shard
from lightning_msr.calibration import gain_parameters
from lightning_msr.engine.settings import LINEAR_OPTIMIZERS, MSRSettings
from lightning_msr.functional import (
    KernelBank,
    KernelGroups,
    KernelWeight,
    adaptive_clip_,
    filter_norms,
    from_virtual_,
    kernel_groups,
    project_groups_,
    to_virtual_,
)
from lightning_msr.fused import FusedWeight, fused_unavailable, project_and_clip_, recenter_and_rescale_, sgd_step_
from lightning_msr.fused import unsupported as fused_unsupported
from lightning_msr.nn.gain_control import AutomaticGainControl

__all__ = ["StepWork"]


class _Banks(NamedTuple):
    """What one optimizer steps, for the grouped path: one bank per device and dtype (the kernels, and -- with
    adaptive clipping -- the other clipped parameters: the free stem, Linear weights, scales and offsets), and what
    no bank holds: kernels, clipped filters, scales and offsets, each left to the per-weight path."""

    banks: list[KernelBank]
    rest: list[tuple[nn.Parameter, KernelGroups]]
    rest_clipped: list[nn.Parameter]
    rest_scales: list[nn.Parameter]
    rest_offsets: list[nn.Parameter]


_TINY = torch.finfo(torch.float32).tiny
# per kernel: the float32 filter norms kept, the filters that were all zero then (None if none was), and the
# weight's (transposed, groups)
KeptNorms = dict[int, tuple[Tensor, Optional[Tensor], bool, int]]


class StepWork:
    """The per-step work on ``weights`` (the kernels MSR acts on) and ``stem`` (clipped only), configured by
    ``settings``, for the parameters of ``model``.

    :meth:`attach` chooses the path (fused or eager, projection in backward or before the step) and registers
    the hooks; :meth:`before_step` must then run once per optimizer step on the final gradients (after the
    all-reduce, unscaling and accumulation) -- unless ``attach(run_before_step=True)`` registered a step pre-hook
    that runs it; :meth:`detach` removes every hook. :class:`~lightning_msr.MSREngine` builds and drives it.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_msr import MSRSettings
        >>> from lightning_msr.engine.step import StepWork
        >>> from lightning_msr.functional import eligible_weights, mean_shift
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(36, 2))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> work = StepWork(MSRSettings(implementation="eager"), model, eligible_weights(model), stem=None)
        >>> work.attach([optimizer], fused=False, backward=True, fuse_update=lambda o: False, run_before_step=True)
        >>> model(torch.randn(2, 1, 5, 5)).sum().backward()
        >>> bool(model[0].weight.grad.mean(dim=(2, 3)).abs().max() < 1e-6)  # projected in backward
        True
        >>> work.detach()
    """

    def __init__(
        self, settings: MSRSettings, model: nn.Module, weights: Sequence[KernelWeight], stem: Optional[nn.Module]
    ) -> None:
        s = settings.settings()
        self._alpha: float = s["alpha"]
        self._mode: str = s["mode"]
        self._recenter: Optional[bool] = s["recenter"]
        self._keep_magnitude: bool = s["keep_magnitude"]
        self._scale_invariant: bool = s["scale_invariant"]
        self._timing: str = s["projection_timing"]
        self._exclude: tuple[str, ...] = tuple(s["exclude"] or ())
        self._adaptive_clip: Optional[float] = s["adaptive_clip"]
        self._implementation: str = s["implementation"]
        self._model_ref = weakref.ref(model)  # the engine (or the Trainer) owns the model
        self.weights = list(weights)
        self.stem = stem
        # of the local shard for an FSDP2 (DTensor) weight; refuses a sharding that splits a group
        self.layouts: dict[int, tuple[nn.Parameter, KernelGroups, str]] = {
            id(w.parameter): (
                w.parameter,
                kernel_groups(w.parameter, self._mode, w.transposed, w.groups, keep_magnitude=self._keeps_norms),
                w.name,
            )
            for w in self.weights
        }
        self._transposed = {id(w.parameter): w.transposed for w in self.weights}
        self.fused = False
        self.grouped = False  # the eager math in KernelBanks: a constant number of operations per kind of kernel
        self.project_in_backward = False
        self.target_norms: KeptNorms = {}
        self.virtual_norms: dict[int, Tensor] = {}  # `scale_invariant`: the virtual weight's filter norms
        self._recenter_optimizers: set[int] = set()
        self._fused_sgd: set[int] = set()
        self._grad_handles: dict[int, RemovableHandle] = {}
        self._step_handles: list[RemovableHandle] = []
        self._frozen: list[int] = []  # kernels without a backward hook yet because they do not require grad
        # caches per optimizer, rebuilt when a param group is added (e.g. by BackboneFinetuning)
        self._params: dict[int, tuple[int, list[tuple[nn.Parameter, KernelGroups]]]] = {}
        self._clipped: dict[int, tuple[int, list[nn.Parameter]]] = {}
        self._gains: dict[int, tuple[int, tuple[list[nn.Parameter], list[nn.Parameter]]]] = {}
        self._fused_weights_of: dict[int, tuple[int, list[FusedWeight]]] = {}
        self._banks: dict[int, tuple[int, _Banks]] = {}
        self._banks_keep_norms = False  # the banks' kept norms are stale (`keep_norms` ran since they were set)
        # the gradients of the kernels the fused SGD pass updated, set aside while SGD's own loop steps the rest
        self._set_aside: dict[int, list[tuple[Tensor, Optional[Tensor]]]] = {}
        self._before_step_hook: Optional[Callable[[torch.optim.Optimizer], None]] = None

    # ------------------------------------------------------------------ choosing the path
    def why_not_fused(self, blocked_by: Optional[str] = None) -> Optional[str]:
        """Why the fused kernel cannot take this model's per-step work, or ``None``; ``blocked_by`` is a reason
        the caller knows of (e.g. the Trainer clips gradients before the step, and must see them projected)."""
        if self._timing == "backward":
            return "`projection_timing='backward'` asks for the projection in backward hooks"
        if self._scale_invariant:
            return "`scale_invariant=True` steps a virtual weight, which the fused SGD pass does not"
        if blocked_by:
            return blocked_by
        for w in self.weights:
            why = fused_unsupported(
                w.parameter, transposed=w.transposed, mode=self._mode, keep_magnitude=self._keeps_norms
            )
            if why is not None:
                return f"the fused kernel cannot take {w.name!r}: {why}"
        if self.stem is not None and self._adaptive_clip is not None:
            why = fused_unsupported(self.stem.weight)
            if why is not None:
                return f"the fused kernel cannot take the stem's weight: {why}"
        return fused_unavailable()

    @staticmethod
    def can_fuse_update(optimizer: Any) -> bool:
        """Whether the fused pass can do ``optimizer``'s update of the kernels: a plain ``torch.optim.SGD``
        (not ``differentiable``, not ``fused``: AMP leaves its gradients scaled for SGD's own fused kernel)."""
        if type(optimizer) is not torch.optim.SGD or optimizer.defaults.get("differentiable", False):
            return False
        return not optimizer.defaults.get("fused")

    def needs_recentering(self, optimizer: torch.optim.Optimizer, clip_by_value: bool = False) -> bool:
        if self._recenter is not None:
            return self._recenter
        if self._alpha != 1.0:
            return False
        return clip_by_value or not isinstance(optimizer, LINEAR_OPTIMIZERS)

    def attach(
        self,
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        fused: bool,
        backward: bool,
        fuse_update: Callable[[torch.optim.Optimizer], bool],
        grouped: bool = False,
        clip_by_value: bool = False,
        run_before_step: bool = False,
    ) -> None:
        """Register the hooks for ``optimizers``: the fused path (``fused``) or the eager one, projecting in
        backward (``backward``, eager only); ``fuse_update(optimizer)`` says whether the fused pass also does that
        optimizer's SGD update; ``grouped`` runs the eager path's math in :class:`~lightning_msr.functional.KernelBank`
        s (a constant number of operations per kind of kernel); with ``run_before_step`` a step pre-hook runs
        :meth:`before_step` (outside the Trainer, which calls it from ``on_before_optimizer_step``)."""
        self.detach()
        self.fused = fused
        self.grouped = not fused and grouped
        self.project_in_backward = not fused and backward
        self._recenter_optimizers = set()
        self._fused_sgd = set()
        self._params, self._clipped, self._gains, self._fused_weights_of, self._banks = {}, {}, {}, {}, {}
        for optimizer in optimizers:
            if self.needs_recentering(optimizer, clip_by_value):
                self._recenter_optimizers.add(id(optimizer))
            fuse = fused and fuse_update(optimizer)
            if fuse:
                self._fused_sgd.add(id(optimizer))
            if run_before_step or fuse or self._scale_invariant:
                self._step_handles.append(optimizer.register_step_pre_hook(self._make_step_pre(run_before_step)))
            if fuse:
                self._step_handles.append(optimizer.register_step_post_hook(self._fused_step_post))
            elif id(optimizer) in self._recenter_optimizers or self._keeps_norms:
                self._step_handles.append(optimizer.register_step_post_hook(self._after_step))
        if self.project_in_backward:
            self._register_grad_hooks()

    def set_before_step(self, hook: Optional[Callable[[torch.optim.Optimizer], None]]) -> None:
        """What a step pre-hook registered with ``run_before_step`` runs once the gradients are final (default:
        :meth:`before_step`); the engine runs its first-batch work there too."""
        self._before_step_hook = hook

    def uses_recentering(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the kernels are re-centred after ``optimizer``'s steps."""
        return id(optimizer) in self._recenter_optimizers

    def _register_grad_hooks(self, keys: Optional[list[int]] = None) -> None:
        self._frozen = []
        for key in self.layouts if keys is None else keys:
            param, layout, _ = self.layouts[key]
            if not param.requires_grad:
                self._frozen.append(key)  # picked up by `watch_unfrozen` once unfrozen
                continue

            def hook(p: Tensor, layout: KernelGroups = layout) -> None:
                if p.grad is not None:
                    with torch.no_grad():
                        project_groups_(p.grad, layout, 1.0)

            self._grad_handles[key] = param.register_post_accumulate_grad_hook(hook)

    def watch_unfrozen(self) -> None:
        """Bring kernels unfrozen since the last batch (e.g. by ``BackboneFinetuning``) under projection."""
        if self._frozen and any(self.layouts[key][0].requires_grad for key in self._frozen):
            self._register_grad_hooks(self._frozen)

    def detach(self) -> None:
        """Remove every hook; gradients set aside by a step that raised midway are given back."""
        for aside in self._set_aside.values():
            for param, grad in aside:
                param.grad = grad
        self._set_aside = {}
        for handle in list(self._grad_handles.values()) + self._step_handles:
            handle.remove()
        self._grad_handles = {}
        self._step_handles = []
        self._frozen = []

    # ------------------------------------------------------------------ the step
    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The projection (unless done in backward) and the adaptive clipping of ``optimizer``'s final gradients.

        On the fused path this is one C pass, or nothing for an SGD optimizer whose update the fused pass does."""
        if self.fused:
            if id(optimizer) not in self._fused_sgd:  # SGD's is done inside its step, with the update
                project_and_clip_(self._fused_weights(optimizer))
                self._clip_gains(optimizer)
            return
        if self.grouped:
            self._before_step_grouped(optimizer)
            return
        self._project(self._params_of(optimizer))
        if self._adaptive_clip is not None:
            adaptive_clip_(self._clipped_of(optimizer), self._adaptive_clip)
            self._clip_gains(optimizer)

    def _project(self, params: list[tuple[nn.Parameter, KernelGroups]]) -> None:
        if not self.project_in_backward and self._alpha != 0.0:
            with torch.no_grad():
                for param, layout in params:
                    if param.grad is not None:
                        project_groups_(param.grad, layout, self._alpha)

    def _before_step_grouped(self, optimizer: torch.optim.Optimizer) -> None:
        banks = self._banks_of(optimizer)
        alpha = 0.0 if self.project_in_backward else self._alpha
        clip = self._adaptive_clip
        self._project(banks.rest)  # first: a bank may clip these kernels' filters (a ConvTranspose's, say)
        for bank in banks.banks:
            if all(p.grad is not None for p in bank.members):
                bank.project_and_clip_(alpha, clip)
                continue
            # something got no gradient this step (an unused branch): the per-weight path, for this step
            self._project([(p, self.layouts[id(p)][1]) for p in bank.params])
            if clip is not None:
                adaptive_clip_(bank.params + bank.clipped, clip)
                adaptive_clip_(bank.offsets, clip, eps=bank.offset_eps)
        if clip is not None:
            adaptive_clip_(banks.rest_clipped, clip)
            adaptive_clip_(banks.rest_scales, clip)
            adaptive_clip_(banks.rest_offsets, clip, eps=1.0)

    def _make_step_pre(self, run_before_step: bool) -> Callable:
        def step_pre(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Optional[tuple]:
            """Before ``optimizer.step``: the work on the final gradients -- inside the closure, after it has run
            backward (Lightning's automatic optimization steps with a closure), or now (a step without a closure,
            e.g. a plain loop or AMP's ``GradScaler.step``, which runs the closure first)."""

            def work() -> None:
                if run_before_step:
                    (self._before_step_hook or self.before_step)(optimizer)
                if self._scale_invariant:  # after everything that reads or clips the gradients
                    self._to_virtual(optimizer)
                if id(optimizer) in self._fused_sgd:
                    self._fused_update(optimizer)

            # `args` are those of the wrapped `step`, starting with the optimizer itself
            closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if len(args) > 1 else None)
            if closure is None:
                work()
                return None

            def closure_then_work() -> Any:
                loss = closure()
                work()
                return loss

            if "closure" in kwargs:
                return args, {**kwargs, "closure": closure_then_work}
            return (args[0], closure_then_work, *args[2:]), kwargs

        return step_pre

    def _fused_update(self, optimizer: torch.optim.Optimizer) -> None:
        self._clip_gains(optimizer)  # before SGD's own loop steps them
        updated = sgd_step_(optimizer, self._fused_weights(optimizer))
        # SGD's own loop then skips the kernels (it steps the parameters that have a gradient); given back after it
        self._set_aside[id(optimizer)] = [(p, p.grad) for p in updated]
        for p in updated:
            p.grad = None

    def _fused_step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for param, grad in self._set_aside.pop(id(optimizer), []):
            param.grad = grad

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.fused:  # re-centring and rescaling in one pass over each weight
            recenter_and_rescale_([w for w in self._fused_weights(optimizer) if w.parameter.grad is not None])
            return
        recenter = id(optimizer) in self._recenter_optimizers
        params = self._params_of(optimizer)
        if self.grouped and not self._scale_invariant:
            params = self._after_step_grouped(optimizer, recenter)
        self._recenter_and_rescale(params, recenter)
        if self._scale_invariant and self.stem is not None:  # the free stem: not centred
            stem = self.stem.weight
            kept = self.target_norms.get(id(stem))
            if kept is not None and stem.grad is not None and any(stem is p for p in self._clipped_of(optimizer)):
                target, _, transposed, groups = kept
                self.virtual_norms[id(stem)] = from_virtual_(
                    stem.data, target, mode=self._mode, transposed=transposed, groups=groups
                )

    def _after_step_grouped(
        self, optimizer: torch.optim.Optimizer, recenter: bool
    ) -> list[tuple[nn.Parameter, KernelGroups]]:
        """The banks' re-centring and rescaling; returns the kernels left to the per-weight path."""
        banks = self._banks_of(optimizer)
        rescale = bool(self.target_norms)
        if rescale and self._banks_keep_norms:
            for bank in self._all_banks():
                bank.keep_norms([self.target_norms[id(p)][0] for p in bank.params])
            self._banks_keep_norms = False
        rest = list(banks.rest)
        for bank in banks.banks:
            if not bank.params:
                continue
            if all(p.grad is not None for p in bank.params):
                bank.recenter_and_rescale_(recenter, rescale)
            else:  # only what this step updated: the per-weight path skips the rest
                rest += [(p, self.layouts[id(p)][1]) for p in bank.params]
        return rest

    def _recenter_and_rescale(self, params: list[tuple[nn.Parameter, KernelGroups]], recenter: bool) -> None:
        with torch.no_grad():
            for param, layout in params:
                if param.grad is None:  # only what this step updated; frozen kernels are left alone
                    continue
                if recenter:
                    project_groups_(param.data, layout, 1.0)
                kept = self.target_norms.get(id(param))
                if kept is not None and self._scale_invariant:
                    target, _, transposed, groups = kept
                    self.virtual_norms[id(param)] = from_virtual_(
                        param.data, target, mode=self._mode, transposed=transposed, groups=groups
                    )
                elif kept is not None:
                    target, free, transposed, groups = kept
                    norms = filter_norms(param.data, self._mode, transposed, groups, dtype=torch.float32)
                    ratio = target / norms.clamp(min=_TINY)
                    if free is not None:
                        ratio.masked_fill_(free, 1.0)
                    local_shard(param.data).mul_(ratio.to(param.dtype))

    def _to_virtual(self, optimizer: torch.optim.Optimizer) -> None:
        """``scale_invariant``: the kernels ``optimizer`` is about to step become their virtual weights, their
        gradients those of scale-invariant filters (:func:`~lightning_msr.functional.to_virtual_`); the free stem
        too."""
        for param in self._clipped_of(optimizer):  # the kernels and the stem this optimizer steps
            kept = self.target_norms.get(id(param))
            if param.grad is None or kept is None:  # frozen, or the norms are not taken yet (still calibrating)
                continue
            target, _, transposed, groups = kept
            virtual = self.virtual_norms.get(id(param), target)
            to_virtual_(param.data, param.grad, target, virtual, mode=self._mode, transposed=transposed, groups=groups)

    @property
    def _keeps_norms(self) -> bool:
        """Whether the filter norms at fit start are kept: ``keep_magnitude``, or ``scale_invariant``'s forward."""
        return self._keep_magnitude or self._scale_invariant

    # ------------------------------------------------------------------ keep_magnitude
    def keep_norms(
        self, restored: Optional[dict[str, Tensor]] = None, restored_virtual: Optional[dict[str, Tensor]] = None
    ) -> None:
        """Take the filter norms ``keep_magnitude`` keeps: measured now, or for a resumed run the ones the
        checkpoint's run kept (the weights' own norms equal those only to float32 rounding, and a resumed run must
        repeat the bits)."""
        captured: KeptNorms = {}
        with torch.no_grad():
            for param, name, transposed, groups in self._kept_filters():
                target = filter_norms(param, self._mode, transposed, groups, dtype=torch.float32)
                kept = (restored or {}).get(name)
                # a sharded weight's norms are those of this rank's rows, and the checkpoint holds rank 0's
                if kept is not None and kept.shape == target.shape and not is_sharded(param):
                    target = kept.to(device=target.device, dtype=target.dtype)
                # a filter that is all zero now has no direction to keep: it is left free (ratio 1)
                free = target == 0
                captured[id(param)] = (target, free if bool(free.any()) else None, transposed, groups)
        self.target_norms = captured
        self.virtual_norms = {}
        for param, name, *_ in self._kept_filters():  # a resumed run goes on with the virtual norms it had reached
            virtual = (restored_virtual or {}).get(name)
            target = captured[id(param)][0]
            if virtual is not None and virtual.shape == target.shape and not is_sharded(param):
                self.virtual_norms[id(param)] = virtual.to(device=target.device, dtype=target.dtype)
        self._fused_weights_of = {}  # they hold the old norms
        self._banks_keep_norms = True

    def _kept_filters(self) -> list[tuple[nn.Parameter, str, bool, int]]:
        """The weights whose filter norms are kept, with their names and layouts: the kernels, and with
        ``scale_invariant`` the free stem (scale-invariant too, but not centred)."""
        kept = [(w.parameter, w.name, w.transposed, w.groups) for w in self.weights]
        model = self._model_ref()
        if self._scale_invariant and self.stem is not None and model is not None:
            names = {id(p): n for n, p in model.named_parameters()}
            stem = self.stem
            transposed = isinstance(stem, nn.modules.conv._ConvTransposeNd)
            kept.append((stem.weight, names.get(id(stem.weight), "stem.weight"), transposed, stem.groups))
        return kept

    def kept_norms(self) -> dict[str, Tensor]:
        """The norms kept, by weight name (for a checkpoint)."""
        names = {id(param): name for param, name, *_ in self._kept_filters()}
        return {names[key]: norms.detach().cpu().clone() for key, (norms, *_) in self.target_norms.items()}

    def kept_virtual_norms(self) -> dict[str, Tensor]:
        """``scale_invariant``'s virtual norms, by weight name (for a checkpoint)."""
        names = {id(param): name for param, name, *_ in self._kept_filters()}
        return {names[key]: norms.detach().cpu().clone() for key, norms in self.virtual_norms.items()}

    # ------------------------------------------------------------------ what each optimizer steps
    def _fused_weights(self, optimizer: torch.optim.Optimizer) -> list[FusedWeight]:
        """What the fused kernel does to each weight ``optimizer`` steps: the kernels MSR acts on (projected,
        clipped, re-centred and rescaled as configured), then the free stem (clipped only). Rebuilt when a param
        group is added or the kept norms change (calibration)."""
        key = len(optimizer.param_groups)
        cached = self._fused_weights_of.get(id(optimizer))
        if cached is not None and cached[0] == key:
            return cached[1]
        clip = self._adaptive_clip
        clipped = {id(p) for p in self._clipped_of(optimizer)} if clip is not None else set()
        recenter = id(optimizer) in self._recenter_optimizers
        weights = []
        for param, _ in self._params_of(optimizer):
            kept = self.target_norms.get(id(param))
            weights.append(
                FusedWeight.of(
                    param,
                    mode=self._mode,
                    transposed=self._transposed[id(param)],
                    alpha=self._alpha,
                    clip=clip if id(param) in clipped else None,
                    recenter=recenter,
                    target=kept[0] if kept is not None else None,
                )
            )
        for param in self._clipped_of(optimizer) if clip is not None else []:
            if id(param) not in self.layouts:
                weights.append(FusedWeight.of(param, alpha=0.0, clip=clip))
        self._fused_weights_of[id(optimizer)] = (key, weights)
        return weights

    def _banks_of(self, optimizer: torch.optim.Optimizer) -> _Banks:
        """What ``optimizer`` steps, in one :class:`~lightning_msr.functional.KernelBank` per device and dtype: the
        kernels, and with adaptive clipping everything else it clips (the free stem, the scales and Linear weights,
        the offsets); and what no bank can hold (ConvTranspose kernels, channels_last, 16-bit or sharded
        parameters). Rebuilt when a param group is added."""
        key = len(optimizer.param_groups)
        cached = self._banks.get(id(optimizer))
        if cached is not None and cached[0] == key:
            return cached[1]
        members: dict[tuple, tuple[list[nn.Parameter], list[KernelGroups], list[nn.Parameter], list[nn.Parameter]]]
        members = {}

        def entry(param: nn.Parameter) -> tuple:
            return members.setdefault((param.device, param.dtype), ([], [], [], []))

        rest = []
        for param, layout in self._params_of(optimizer):
            if KernelBank.accepts(param, layout, self._transposed[id(param)]):
                entry(param)[0].append(param)
                entry(param)[1].append(layout)
            else:
                rest.append((param, layout))
        in_bank = {id(p) for p in (p for kernels, *_ in members.values() for p in kernels)}
        # what adaptive clipping also acts on: the filters no bank centres (the free stem, ConvTranspose kernels),
        # the scales and Linear weights, the offsets
        rest_clipped: list[nn.Parameter] = []
        rest_scales: list[nn.Parameter] = []
        rest_offsets: list[nn.Parameter] = []
        if self._adaptive_clip is not None:
            scales, offsets = self._gains_of(optimizer)
            filters = [p for p in self._clipped_of(optimizer) if id(p) not in in_bank]
            placed = set(in_bank)  # a Linear weight MSR centres (`include_linear`) is clipped as a kernel, once
            kinds = ((filters, 2, rest_clipped), (scales, 2, rest_scales), (offsets, 3, rest_offsets))
            for params, slot, left in kinds:
                for param in params:
                    if id(param) in placed:
                        continue
                    placed.add(id(param))
                    if KernelBank.accepts(param, None, centred=False):
                        entry(param)[slot].append(param)
                    else:
                        left.append(param)
        banks = [KernelBank(ps, ls, clipped=cs, offsets=os) for ps, ls, cs, os in members.values()]
        found = _Banks(banks, rest, rest_clipped, rest_scales, rest_offsets)
        self._banks[id(optimizer)] = (len(optimizer.param_groups), found)
        self._banks_keep_norms = True
        return found

    def _all_banks(self) -> list[KernelBank]:
        return [bank for _, banks in self._banks.values() for bank in banks.banks if bank.params]

    def _clip_gains(self, optimizer: torch.optim.Optimizer) -> None:
        """Adaptive clipping of what the filters' clipping leaves and can still blow up (see ``adaptive_clip``)."""
        if self._adaptive_clip is None:
            return
        scales, offsets = self._gains_of(optimizer)
        adaptive_clip_(scales, self._adaptive_clip)
        adaptive_clip_(offsets, self._adaptive_clip, eps=1.0)

    def _gains_of(self, optimizer: torch.optim.Optimizer) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """What ``optimizer`` steps of: the per-channel scales (folded ``scale``, ``ChannelAffine.weight``,
        ``AutomaticGainControl.gain``) and the weights of every ``nn.Linear`` (the classifier included), clipped
        relative to their own size; and the offsets -- the biases of those layers and of the convs, gain controls'
        ``beta`` -- clipped relative to ``max(|b|, 1)``, 1 being the calibrated signal's standard deviation."""
        groups = optimizer.param_groups
        cached = self._gains.get(id(optimizer))
        if cached is not None and cached[0] == len(groups):
            return cached[1]
        scales: set[int] = set()
        offsets: set[int] = set()
        model = self._model_ref()
        for module_name, module in model.named_modules() if model is not None else []:
            if any(fnmatchcase(module_name, pattern) for pattern in self._exclude):
                continue  # `exclude`: left untouched
            gain = gain_parameters(module)
            if gain is not None:
                scales.add(id(gain[0]))
            elif isinstance(module, nn.Linear):
                scales.add(id(module.weight))
            elif not isinstance(module, (AutomaticGainControl, nn.modules.conv._ConvNd)):
                continue
            for name in ("bias", "beta"):  # offsets, and the fraction of the mean a gain control removes
                param = module._parameters.get(name)
                if isinstance(param, nn.Parameter):
                    offsets.add(id(param))
        params = [p for group in groups for p in group["params"]]
        found = ([p for p in params if id(p) in scales], [p for p in params if id(p) in offsets])
        self._gains[id(optimizer)] = (len(groups), found)
        return found

    def _clipped_of(self, optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
        """The filters ``optimizer`` steps that adaptive clipping acts on: of the convs MSR acts on and of the
        stem -- not their 1-D scales and biases, and not the Linear head (see :meth:`_gains_of` for those)."""
        groups = optimizer.param_groups
        cached = self._clipped.get(id(optimizer))
        if cached is not None and cached[0] == len(groups):
            return cached[1]
        wanted = {id(w.parameter) for w in self.weights}
        if self.stem is not None:
            wanted.add(id(self.stem.weight))
        params = [p for group in groups for p in group["params"] if id(p) in wanted]
        self._clipped[id(optimizer)] = (len(groups), params)
        return params

    def _params_of(self, optimizer: torch.optim.Optimizer) -> list[tuple[nn.Parameter, KernelGroups]]:
        """The kernels ``optimizer`` steps, with their groups: built once, rebuilt only when a param group is added,
        so a step does not walk every parameter of the model."""
        groups = optimizer.param_groups
        cached = self._params.get(id(optimizer))
        if cached is not None and cached[0] == len(groups):
            return cached[1]
        found = [
            (param, self.layouts[id(param)][1])
            for group in groups
            for param in group["params"]
            if id(param) in self.layouts
        ]
        self._params[id(optimizer)] = (len(groups), found)
        return found
