"""Noise injection on any model, through forward hooks: the paper's per-(sample, channel) training noise.

Ruff, Beck and Bach ("Training Deep Neural Networks Without Minibatch Statistics or Normalization",
arXiv:1911.13173) replace the regularising minibatch noise of BatchNorm by explicit noise throughout the
network: during training every ``(sample, channel)`` map is multiplied by ``U(1 - scale, 1 + scale)`` and
shifted by ``U(-shift, shift)``. :class:`NoiseSettings` defines the settings once; :class:`NoiseEngine` adds the
noise to any model with forward hooks (Lightning Fabric, plain loops), and the
:class:`~lightning_msr.NoiseInjection` callback is the adapter that tells it when a training batch starts and ends.
The operation itself is :func:`lightning_msr.noise.channel_noise`.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from fnmatch import fnmatchcase
from functools import partial
from typing import Any, Literal, Optional

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_msr._checks import (
    NonNegativeFloat,
    _check_choice,
    _check_names,
    _check_noise_levels,
    _check_patterns_match,
    _check_positive_int,
    _check_seed,
    _examples,
)
from lightning_msr.exceptions import MSRConfigurationError
from lightning_msr.nn.scaled_conv import is_scaled_conv
from lightning_msr.noise import Distribution, channel_noise

__all__ = ["NoiseEngine", "NoiseSettings", "scheduled", "stream_seed"]

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


def stream_seed(base_seed: int, rank: int, batch: int, slot: int) -> int:
    """The seed of the noise drawn on one device (``slot``) of one rank in one training batch.

    Example::

        >>> from lightning_msr.engine.noise import stream_seed
        >>> stream_seed(0, 0, 5, 0) == stream_seed(0, 0, 5, 0), stream_seed(0, 0, 5, 0) == stream_seed(0, 1, 5, 0)
        (True, False)
    """
    digest = hashlib.blake2b(f"{base_seed}/{rank}/{batch}/{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def scheduled(start: float, final: float, progress: float, schedule: str) -> float:
    """The noise level at ``progress`` in [0, 1] of training: constant, or decayed linearly / by a half cosine.

    Example::

        >>> from lightning_msr.engine.noise import scheduled
        >>> scheduled(0.2, 0.0, 0.5, "linear"), scheduled(0.2, 0.0, 0.5, "constant")
        (0.1, 0.2)
    """
    if schedule == "constant" or start == final:
        return start
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        value = start + (final - start) * progress
    else:
        value = final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min(max(value, min(start, final)), max(start, final))  # no rounding outside the range


class NoiseSettings:
    r"""The arguments of noise injection, checked once: what :class:`~lightning_msr.NoiseInjection` and
    :class:`~lightning_msr.engine.noise.NoiseEngine` are configured with.

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

        >>> from lightning_msr.engine.noise import NoiseSettings
        >>> NoiseSettings(scale=0.15, shift=0.1)  # doctest: +NORMALIZE_WHITESPACE
        NoiseSettings(scale=0.15, shift=0.1, distribution='uniform', schedule='constant',
                      module_types=['Conv1d', 'Conv2d', 'Conv3d'])
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

    def settings(self) -> dict[str, Any]:
        """Every argument by name (after checking): ``NoiseEngine(model, **s.settings())`` is configured like ``s``."""
        final = self._schedule != "constant"
        return {
            "scale": self._scale,
            "shift": self._shift,
            "distribution": self._distribution,
            "final_scale": self._final_scale if final else None,
            "final_shift": self._final_shift if final else None,
            "schedule": self._schedule,
            "module_types": list(self._type_names),
            "module_names": list(self._module_names) or None,
            "exclude": list(self._exclude) or None,
            "seed": self._seed,
        }

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


class NoiseEngine(NoiseSettings):
    r"""Add the paper's per-(sample, channel) noise to the outputs of a model's convs during training.

    Forward hooks on every selected module (by default every ``Conv1d/2d/3d``) turn its output ``x`` into
    ``x * a + b`` with one ``a ~ U(1 - scale, 1 + scale)`` and one ``b ~ U(-shift, shift)`` per ``(sample, channel)``
    map, during the model's training forward passes only (the model in training mode, gradients enabled): evaluation
    and ``torch.no_grad()`` passes see the unchanged network. Each training forward is one *batch* of the noise
    stream, drawn from a private generator per device seeded from ``(seed, rank, batch)``, so the global RNG is
    never touched, every ``torch.distributed`` rank draws different noise, and :meth:`state_dict` /
    :meth:`load_state_dict` make a resumed run continue the uninterrupted run's noise exactly.

    A decay ``schedule`` needs ``total_steps``; progress is counted in optimizer steps of ``optimizer`` (a step
    post-hook), or in training forwards without one. The callback drives the same engine with ``drive=False``
    (it calls :meth:`batch_start` and :meth:`batch_end` from the Trainer's hooks).

    Args:
        model: the model whose modules get noise.
        optimizer: the optimizer whose steps measure progress through a decay schedule (optional).
        total_steps: the number of optimizer steps (or training forwards, without ``optimizer``) of the whole
            run; required with ``schedule="linear"`` or ``"cosine"`` (unless ``drive=False``: the caller passes it to
            :meth:`batch_start`).
        rank: this process's rank in the noise stream (default: ``torch.distributed``'s, else 0).
        drive: register the forward hooks that start and end each batch on the model (``False``: the caller
            calls :meth:`batch_start` / :meth:`batch_end`).
        **settings: the arguments of :class:`NoiseSettings`, exactly those of the ``NoiseInjection`` callback.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_msr.engine.noise import NoiseEngine
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        >>> noise = NoiseEngine(model, scale=0.1, seed=0)
        >>> x = torch.ones(2, 1, 5, 5)
        >>> bool((model(x) != model(x)).any())  # training: different noise every forward
        True
        >>> _ = model.eval()
        >>> bool((model(x) == model(x)).all())  # evaluation: no noise
        True
        >>> noise.detach()
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        *,
        total_steps: Optional[int] = None,
        rank: Optional[int] = None,
        drive: bool = True,
        **settings: Any,
    ) -> None:
        super().__init__(**settings)
        if not isinstance(model, nn.Module):
            raise MSRConfigurationError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
        self._total_steps = None if total_steps is None else _check_positive_int("total_steps", total_steps)
        if self._schedule != "constant" and self._total_steps is None and drive:
            raise MSRConfigurationError(
                f"Expected `total_steps` with schedule={self._schedule!r}: the noise decays over training and needs "
                "its length. Pass `total_steps`, or use schedule='constant'."
            )
        if rank is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if distributed else 0
        self._rank = int(rank)
        self._base_seed = self._seed if self._seed is not None else torch.initial_seed()
        self._batches = 0  # training batches started: the position in the noise stream
        self._steps = 0  # optimizer steps (or training forwards without an optimizer), for the schedule
        self._batch = -1
        self._active = False
        self._current_scale = self._scale
        self._current_shift = self._shift
        self._generators: dict[torch.device, list] = {}  # device -> [generator, slot, batch it is seeded for]
        self._handles: list[RemovableHandle] = []
        targets = self._find_targets(model)
        self.hooked_modules = [name for name, _ in targets]
        for name, module in targets:
            # Convs also accept unbatched input (C, *spatial); other modules are read as (N, C, ...).
            unbatched_dims = len(module.kernel_size) + 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
            # a folded conv (ScaledConv*) returns a fresh tensor its backward does not need either
            inplace_safe = type(module) in _INPLACE_SAFE or is_scaled_conv(module)
            hook = partial(self._add_noise, name, unbatched_dims, inplace_safe)
            self._handles.append(module.register_forward_hook(hook))
        self._counts_steps = optimizer is not None
        if optimizer is not None:
            inner = getattr(optimizer, "optimizer", optimizer)  # Lightning Fabric's wrapped optimizer
            self._handles.append(inner.register_step_post_hook(self._count_step))
        if drive:
            self._handles.append(model.register_forward_pre_hook(self._forward_pre))
            self._handles.append(model.register_forward_hook(self._forward_post, always_call=True))
        rank_zero_info(
            f"NoiseInjection: {self._distribution} noise (scale={self._scale:g}, shift={self._shift:g}, "
            f"schedule={self._schedule}) at the outputs of {len(targets)} modules."
        )

    @property
    def current_scale(self) -> float:
        """The multiplicative noise level of the current training batch."""
        return self._current_scale

    @property
    def current_shift(self) -> float:
        """The additive noise level of the current training batch."""
        return self._current_shift

    @property
    def batches(self) -> int:
        """Training batches started so far (the position in the noise stream)."""
        return self._batches

    def batch_start(self, step: Optional[int] = None, total_steps: Optional[int] = None) -> None:
        """A training batch starts: draw its noise from the next position of the stream, at the level the schedule
        gives at optimizer step ``step`` of ``total_steps`` (default: the engine's own counts)."""
        total = total_steps if total_steps is not None else self._total_steps
        if total and self._schedule != "constant":
            progress = (self._steps if step is None else step) / total
            self._current_scale = scheduled(self._scale, self._final_scale, progress, self._schedule)
            self._current_shift = scheduled(self._shift, self._final_shift, progress, self._schedule)
        self._batch = self._batches
        self._batches += 1
        self._active = bool(self._handles) and (self._current_scale > 0.0 or self._current_shift > 0.0)

    def batch_end(self) -> None:
        """The training batch ended: no noise until the next one starts."""
        self._active = False

    def _forward_pre(self, module: nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self.batch_start()

    def _forward_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._active and not self._counts_steps:
            self._steps += 1
        self.batch_end()

    def _count_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._steps += 1

    def detach(self) -> None:
        """Remove every hook: the model computes without noise from now on."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = False
        self._generators.clear()

    def __enter__(self) -> NoiseEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def state_dict(self) -> dict[str, Any]:
        """The noise stream's seed and position, and the steps counted for the schedule."""
        return {"seed": self._base_seed, "batches": self._batches, "steps": self._steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the noise stream of :meth:`state_dict`."""
        if state_dict.get("seed") is not None:
            self._base_seed = int(state_dict["seed"])
            self._batches = int(state_dict.get("batches", 0))
            self._steps = int(state_dict.get("steps", self._steps))

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
            entry[0].manual_seed(stream_seed(self._base_seed, self._rank, self._batch, entry[1]))
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
