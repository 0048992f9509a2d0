"""NoiseInjection: the paper's per-(sample, channel) training noise at the outputs of a model's convolutions.

Ruff, Beck and Bach ("Training Deep Neural Networks Without Minibatch Statistics or Normalization",
arXiv:1911.13173) replace the regularising minibatch noise of BatchNorm by explicit noise throughout the
network: during training every ``(sample, channel)`` map is multiplied by ``U(1 - scale, 1 + scale)`` and
shifted by ``U(-shift, shift)``. This callback adds that noise to an unchanged LightningModule with forward
hooks; the operation itself is :func:`lightning_msr.noise.channel_noise`.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from fnmatch import fnmatchcase
from functools import partial
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_msr._checks import (
    NonNegativeFloat,
    _check_choice,
    _check_names,
    _check_noise_levels,
    _check_patterns_match,
    _check_seed,
    _check_single_owner,
    _examples,
)
from lightning_msr.exceptions import MSRConfigurationError
from lightning_msr.noise import Distribution, channel_noise

__all__ = ["NoiseInjection"]

Schedule = Literal["constant", "linear", "cosine"]
_SCHEDULES = ("constant", "linear", "cosine")
_DEFAULT_MODULE_TYPES = ("Conv1d", "Conv2d", "Conv3d")
_SEED_MASK = (1 << 63) - 1
# Their forward returns a fresh tensor that autograd does not save (conv backward needs input and weight),
# so the noise can be applied in place, saving an activation-sized allocation per layer.
_INPLACE_SAFE = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _resolve_module_type(name: Any) -> type[nn.Module]:
    """``"Conv2d"`` -> ``torch.nn.Conv2d``; ``"package.module.Class"`` -> that class."""
    cls = None
    if isinstance(name, str) and name:
        if "." not in name:
            cls = getattr(nn, name, None)
        else:
            module_path, _, attribute = name.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module_path), attribute, None)
            except ImportError:
                cls = None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise MSRConfigurationError(
            "Expected every entry of `module_types` to name an `nn.Module` subclass, either a `torch.nn` class "
            f"name such as 'Conv2d' or an importable dotted path such as 'timm.layers.StdConv2d', but got "
            f"{name!r}."
        )
    return cls


def _check_module_types(value: Any) -> tuple[str, ...]:
    if value is None:
        return _DEFAULT_MODULE_TYPES
    names = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else None
    if not names:
        raise MSRConfigurationError(
            "Expected `module_types` to be a non-empty list of module type names (e.g. ['Conv2d']) or None "
            f"for {list(_DEFAULT_MODULE_TYPES)}, but got {value!r}. Use ['Module'] to select modules by name only."
        )
    return names


def _stream_seed(base_seed: int, rank: int, batch: int, slot: int) -> int:
    """The seed of the noise drawn on one device (``slot``) of one rank in one training batch."""
    digest = hashlib.blake2b(f"{base_seed}/{rank}/{batch}/{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def _scheduled(start: float, final: float, progress: float, schedule: str) -> float:
    """The noise level at ``progress`` in [0, 1] of training: constant, or decayed linearly / by a half cosine."""
    if schedule == "constant" or start == final:
        return start
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        value = start + (final - start) * progress
    else:
        value = final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min(max(value, min(start, final)), max(start, final))  # no rounding outside the range


class NoiseInjection(Callback):
    r"""Multiply (and optionally shift) every ``(sample, channel)`` map of the conv outputs by random noise.

    During training, the output ``x`` of every selected module (by default every ``Conv1d``, ``Conv2d`` and
    ``Conv3d``) becomes ``x * a + b`` with one ``a ~ U(1 - scale, 1 + scale)`` and one ``b ~ U(-shift, shift)``
    per ``(sample, channel)`` map (:func:`lightning_msr.noise.channel_noise`). This is the explicit noise of
    the MSR paper that stands in for the minibatch noise of BatchNorm; use it alone or beside
    :class:`~lightning_msr.MeanShiftRejection`. The noise is added only between ``on_train_batch_start`` and
    ``on_train_batch_end`` and only by modules in training mode: sanity checking, validation, test and
    predict see the unchanged network, even if a module is left in training mode there. On the stock
    ``Conv1d/2d/3d`` the noise is applied in place (a conv's backward does not need its output) unless another
    forward hook on the same module may have kept the clean output.

    Randomness never comes from (or changes) the global RNG, so adding the callback does not change data order
    or dropout masks. Each training batch draws from a private ``torch.Generator`` per device, seeded from
    ``(seed, global rank, batch index)``: two fits under the same ``seed_everything`` draw the same noise,
    every DDP rank draws different noise, and a fit resumed from a checkpoint continues exactly the noise of
    the uninterrupted run (the checkpoint holds the seed and the batch counter). The seed is ``seed`` or, if
    ``None``, ``torch.initial_seed()`` at fit setup, i.e. the one set by ``seed_everything``.

    The noise level can decay over training: with ``schedule="linear"`` or ``"cosine"`` it goes from
    ``scale``/``shift`` at the first step to ``final_scale``/``final_shift`` at the last optimizer step
    (``trainer.estimated_stepping_batches``, from ``max_steps`` or ``max_epochs``). The current levels are
    logged every training step as ``msr/noise_scale`` (and ``msr/noise_shift`` when a shift is used).

    Hooks are registered once at ``setup("fit")`` (or at ``on_fit_start`` for models whose layers are built
    in ``configure_model``) and removed at ``teardown``; a second fit, or another model, gets its own hooks. A
    second ``fit`` on the same Trainer continues the noise stream; a fit from step 0 starts a new one.

    Args:
        scale: spread of the multiplicative factor around 1 (half-width for uniform, std for gaussian); the
            paper uses 0.1-0.15. Uniform requires ``scale <= 1``.
        shift: spread of the additive offset around 0 (half-width for uniform, std for gaussian).
        distribution: ``"uniform"`` (the paper's) or ``"gaussian"`` (factor ``N(1, scale)`` clamped to
            ``[0, 2]``, offset ``N(0, shift)``).
        final_scale: ``scale`` at the end of training (default: ``scale``, no decay).
        final_shift: ``shift`` at the end of training (default: ``shift``, no decay).
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` decay from the initial to the final levels.
        module_types: module classes whose outputs get noise (subclasses included): ``torch.nn`` class names
            such as ``"Conv2d"``, or dotted paths such as ``"timm.layers.StdConv2d"``. Default
            ``["Conv1d", "Conv2d", "Conv3d"]`` (add ``"ConvTranspose2d"`` etc. for decoders);
            ``["Module"]`` selects modules by ``module_names`` alone. Outputs are read as ``(N, C, *spatial)``.
        module_names: if given, only modules whose qualified name (as in ``model.named_modules()``) matches
            one of these ``fnmatch`` patterns, e.g. ``["encoder.*"]``. Every pattern must select a module.
        exclude: module-name patterns (``fnmatch``) that never get noise, e.g. ``["stem.*", "head"]``.
            Every pattern must match a module.
        seed: base seed of the noise; ``None`` uses ``torch.initial_seed()`` at fit setup.

    Raises:
        MSRConfigurationError: in ``__init__``, for a negative or non-finite ``scale``/``shift``, ``scale > 1``
            with ``"uniform"``, an unknown ``distribution`` or ``schedule``, ``final_*`` values with
            ``schedule="constant"``, an unknown module type, or ``["Module"]`` without ``module_names``; at
            fit setup, for a ``module_names`` or ``exclude`` pattern that matches no module, a model with no
            module to hook, a second ``NoiseInjection`` in the same Trainer that hooks some of the same
            modules (split them with ``module_names``/``exclude``), or a decay schedule with unbounded training;
            during training, if a hooked module does not return a floating-point ``(N, C, ...)`` tensor.

    Example::

        >>> import lightning as L
        >>> from lightning_msr import NoiseInjection
        >>> noise = NoiseInjection(scale=0.15, shift=0.1, final_scale=0.0, final_shift=0.0, schedule="cosine")
        >>> noise  # doctest: +NORMALIZE_WHITESPACE
        NoiseInjection(scale=0.15, shift=0.1, distribution='uniform', final_scale=0.0, final_shift=0.0,
                       schedule='cosine', module_types=['Conv1d', 'Conv2d', 'Conv3d'])
        >>> trainer = L.Trainer(callbacks=[noise], max_steps=1000, logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)

    From the command line (``LightningCLI``)::

        --trainer.callbacks+=lightning_msr.NoiseInjection --trainer.callbacks.scale=0.1 \
        --trainer.callbacks.shift=0.1 --trainer.callbacks.exclude='[head]'
    """

    def __init__(
        self,
        scale: NonNegativeFloat = 0.1,
        shift: NonNegativeFloat = 0.0,
        distribution: Distribution = "uniform",
        final_scale: Optional[NonNegativeFloat] = None,
        final_shift: Optional[NonNegativeFloat] = None,
        schedule: Schedule = "constant",
        module_types: Optional[list[str]] = None,
        module_names: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        seed: Optional[int] = None,
    ) -> None:
        self._distribution = distribution
        self._scale, self._shift = _check_noise_levels(distribution, scale, shift)
        self._final_scale, self._final_shift = _check_noise_levels(
            distribution,
            self._scale if final_scale is None else final_scale,
            self._shift if final_shift is None else final_shift,
            "final_scale",
            "final_shift",
        )
        self._schedule = _check_choice("schedule", schedule, _SCHEDULES)
        if schedule == "constant" and (self._final_scale, self._final_shift) != (self._scale, self._shift):
            raise MSRConfigurationError(
                f"Expected `final_scale` and `final_shift` to be unset with schedule='constant', but got "
                f"final_scale={final_scale!r}, final_shift={final_shift!r}. Set `schedule` to 'linear' or "
                "'cosine' to decay the noise."
            )
        self._type_names = _check_module_types(module_types)
        self._types = tuple(_resolve_module_type(name) for name in self._type_names)
        self._module_names = _check_names("module_names", module_names)
        if nn.Module in self._types and not self._module_names:
            raise MSRConfigurationError(
                "Expected `module_names` with module_types=['Module'], which matches every module (containers "
                "included, so noise would be added several times over); name the modules, e.g. "
                "module_names=['encoder.block*']."
            )
        self._exclude = _check_names("exclude", exclude)
        self._seed = _check_seed("seed", seed)

        # Model-dependent state, set at fit setup.
        self._handles: list[RemovableHandle] = []
        self._hooked: list[str] = []
        self._acted_on: list[str] = []  # the modules this fit hooks, seen by a second NoiseInjection
        self._attach_at_fit_start = False
        self._rank = 0
        self._total_steps: Optional[int] = None
        # The noise stream: base seed and number of training batches started; restored from checkpoints.
        self._base_seed: Optional[int] = None
        self._batches = 0
        self._restored = False
        # Per training batch.
        self._batch = -1
        self._active = False
        self._current_scale = self._scale
        self._current_shift = self._shift
        self._generators: dict[torch.device, list] = {}  # device -> [generator, slot, batch it is seeded for]

    @property
    def current_scale(self) -> float:
        """The multiplicative noise level of the current training step."""
        return self._current_scale

    @property
    def current_shift(self) -> float:
        """The additive noise level of the current training step."""
        return self._current_shift

    @property
    def hooked_modules(self) -> list[str]:
        """Qualified names of the modules whose outputs get noise (empty outside of a fit)."""
        return list(self._hooked)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            module_types=list(self._type_names), module_names=list(self._module_names), exclude=list(self._exclude)
        )

    def __repr__(self) -> str:
        parts = [f"scale={self._scale!r}", f"shift={self._shift!r}", f"distribution={self._distribution!r}"]
        if self._schedule != "constant":
            parts += [f"final_scale={self._final_scale!r}", f"final_shift={self._final_shift!r}"]
        parts += [f"schedule={self._schedule!r}", f"module_types={list(self._type_names)!r}"]
        if self._module_names:
            parts.append(f"module_names={list(self._module_names)!r}")
        if self._exclude:
            parts.append(f"exclude={list(self._exclude)!r}")
        if self._seed is not None:
            parts.append(f"seed={self._seed!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    # ------------------------------------------------------------------ fit lifecycle

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        self._detach()
        if self._schedule != "constant" and trainer.max_epochs == -1 and trainer.max_steps == -1:
            raise MSRConfigurationError(
                f"NoiseInjection(schedule={self._schedule!r}) decays the noise over training and needs a finite "
                "training length, but the Trainer has max_epochs=-1 and max_steps=-1. Set `max_steps` or "
                "`max_epochs`, or use schedule='constant'."
            )
        # A fresh fit starts a new noise stream. A fit that continues a Trainer's training (a second `fit` call
        # on the same Trainer) continues the stream, and so does a loaded state: Lightning restores
        # checkpoints after `setup` (then `load_state_dict` overrides this), but a state loaded by hand before
        # `setup` must win too.
        continuing = trainer.global_step > 0 and self._base_seed is not None
        if not (self._restored or continuing):
            self._base_seed = self._seed if self._seed is not None else torch.initial_seed()
            self._batches = 0
        self._rank = trainer.global_rank
        # Layers built in `configure_model` (called after `setup`) exist only at `on_fit_start`.
        self._attach_at_fit_start = is_overridden("configure_model", pl_module)
        if not self._attach_at_fit_start:
            self._attach(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._attach_at_fit_start:
            self._attach_at_fit_start = False
            self._attach(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restored = False
        self._total_steps = None
        self._current_scale, self._current_shift = self._scale, self._shift
        if self._schedule == "constant":
            return
        total = trainer.estimated_stepping_batches
        if not (isinstance(total, (int, float)) and math.isfinite(total) and total > 0):
            raise MSRConfigurationError(
                f"NoiseInjection(schedule={self._schedule!r}) needs a finite number of training steps, but "
                f"`trainer.estimated_stepping_batches` is {total!r} (e.g. an iterable dataset without "
                "`max_steps`). Set `max_steps`, or use schedule='constant'."
            )
        self._total_steps = int(total)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._total_steps:
            progress = trainer.global_step / self._total_steps
            self._current_scale = _scheduled(self._scale, self._final_scale, progress, self._schedule)
            self._current_shift = _scheduled(self._shift, self._final_shift, progress, self._schedule)
        self._batch = self._batches
        self._batches += 1
        self._active = bool(self._handles) and (self._current_scale > 0.0 or self._current_shift > 0.0)
        if getattr(trainer, "barebones", False):  # `Trainer(barebones=True)` disables `self.log`
            return
        # Identical on every rank: no sync needed. The loggers write it every `log_every_n_steps`.
        pl_module.log("msr/noise_scale", self._current_scale, on_step=True, on_epoch=False, batch_size=1)
        if self._shift > 0.0 or self._final_shift > 0.0:
            pl_module.log("msr/noise_shift", self._current_shift, on_step=True, on_epoch=False, batch_size=1)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._active = False

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A LightningModule's `on_train_batch_start` returning -1 ends the epoch without `on_train_batch_end`.
        self._active = False

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = False

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restored = False
        if stage == TrainerFn.FITTING:
            self._detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self._base_seed, "batches": self._batches}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning calls this after `setup`: the checkpoint's stream position replaces the fresh one.
        if state_dict.get("seed") is not None:
            self._base_seed = int(state_dict["seed"])
            self._batches = int(state_dict.get("batches", 0))
            self._restored = True

    # ------------------------------------------------------------------ hooks

    def _find_targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The ``(name, module)`` pairs to hook; raises for patterns that select nothing."""
        all_names = [name for name, _ in model.named_modules()]
        _check_patterns_match("exclude", self._exclude, model)
        selected = {pattern: False for pattern in self._module_names}
        targets = []
        for name, module in model.named_modules():
            if not name:  # the LightningModule itself
                continue
            if not isinstance(module, self._types) or any(fnmatchcase(name, p) for p in self._exclude):
                continue
            if self._module_names:
                hits = [p for p in self._module_names if fnmatchcase(name, p)]
                if not hits:
                    continue
                selected.update(dict.fromkeys(hits, True))
            targets.append((name, module))
        types = ", ".join(self._type_names)
        for pattern, used in selected.items():
            if not used:
                matching = [name for name in all_names if fnmatchcase(name, pattern)]
                reason = (
                    f"matches only modules that are not of `module_types` [{types}] or are excluded "
                    f"({_examples(matching)})"
                    if matching
                    else f"matches no module; module names look like {_examples(all_names)}"
                )
                raise MSRConfigurationError(
                    f"The `module_names` pattern {pattern!r} selects no module of {type(model).__name__}: it {reason}."
                )
        if not targets:
            raise MSRConfigurationError(
                f"NoiseInjection found no module of type [{types}] to add noise to in {type(model).__name__}. "
                "Set `module_types` (e.g. ['Conv2d', 'Linear']) or `module_names` to select the layers."
            )
        return targets

    def _attach(self, model: nn.Module) -> None:
        targets = self._find_targets(model)
        names = {name for name, _ in targets}
        _check_single_owner(getattr(model, "_trainer", None), self, names.__contains__, "module(s)")
        for name, module in targets:
            # Convs also accept unbatched input (C, *spatial); other modules are read as (N, C, ...).
            unbatched_dims = len(module.kernel_size) + 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
            hook = partial(self._add_noise, name, unbatched_dims, type(module) in _INPLACE_SAFE)
            self._handles.append(module.register_forward_hook(hook))
        self._hooked = [name for name, _ in targets]
        self._acted_on = list(self._hooked)
        rank_zero_info(
            f"NoiseInjection: {self._distribution} noise (scale={self._scale:g}, shift={self._shift:g}, "
            f"schedule={self._schedule}) at the outputs of {len(targets)} modules."
        )

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked = []
        self._acted_on = []
        self._active = False
        self._generators.clear()

    def _generator(self, device: torch.device) -> torch.Generator:
        """This rank's generator for ``device``, seeded for the current batch on first use in that batch."""
        entry = self._generators.get(device)
        if entry is None:
            try:
                generator = torch.Generator(device=device)
            except RuntimeError:  # no generator for this device type: draw on the CPU and copy
                generator = torch.Generator()
            entry = self._generators[device] = [generator, len(self._generators), -1]
        if entry[2] != self._batch:
            assert self._base_seed is not None
            entry[0].manual_seed(_stream_seed(self._base_seed, self._rank, self._batch, entry[1]))
            entry[2] = self._batch
        return entry[0]

    def _add_noise(
        self, name: str, unbatched_dims: int, inplace_safe: bool, module: nn.Module, args: Any, output: Any
    ) -> Any:
        if not self._active or not module.training:
            return None  # the output is returned unchanged
        if not isinstance(output, Tensor) or output.dim() < 2 or not output.is_floating_point():
            described = (
                f"a {output.dtype} tensor of shape {tuple(output.shape)}"
                if isinstance(output, Tensor)
                else type(output).__name__
            )
            raise MSRConfigurationError(
                f"NoiseInjection expected the output of `{name}` ({type(module).__name__}) to be a floating-point "
                f"tensor of shape (N, C, ...), but got {described}. Leave it out with `exclude=[{name!r}]` or "
                "narrow `module_types` / `module_names`."
            )
        generator = self._generator(output.device)
        # In place only for a stock conv whose output nobody else has seen: no other forward hook on it (one
        # registered before ours may have kept the clean output).
        inplace = inplace_safe and len(module._forward_hooks) == 1
        if output.dim() == unbatched_dims:
            noisy = channel_noise(
                output.unsqueeze(0), self._current_scale, self._current_shift, self._distribution, generator, inplace
            )
            return noisy.squeeze(0)
        return channel_noise(output, self._current_scale, self._current_shift, self._distribution, generator, inplace)
