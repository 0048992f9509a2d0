"""NoiseInjection: the paper's per-(sample, channel) training noise at the outputs of a model's convolutions.

Ruff, Beck and Bach ("Training Deep Neural Networks Without Minibatch Statistics or Normalization",
arXiv:1911.13173) replace the regularising minibatch noise of BatchNorm by explicit noise throughout the
network. This callback adds that noise to an unchanged LightningModule: it decides *when* (which batches are
training batches, how far training has come); the hooks and the noise stream are
:class:`lightning_msr.engine.noise.NoiseEngine`'s, and the operation is :func:`lightning_msr.noise.channel_noise`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from lightning_msr._checks import _check_single_owner
from lightning_msr.engine.noise import NoiseEngine, NoiseSettings
from lightning_msr.exceptions import MSRConfigurationError

__all__ = ["NoiseInjection"]


class NoiseInjection(NoiseSettings, Callback):
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

    **Arguments**: exactly those of :class:`~lightning_msr.engine.noise.NoiseSettings`, where each is documented
    (``scale``, ``shift``, ``distribution``, ``final_scale``, ``final_shift``, ``schedule``, ``module_types``,
    ``module_names``, ``exclude``, ``seed``): it defines and checks them once, for this callback and for
    :class:`~lightning_msr.engine.noise.NoiseEngine`.

    Raises:
        MSRConfigurationError: in ``__init__``, for a bad argument (see
            :class:`~lightning_msr.engine.noise.NoiseSettings`); at fit setup, for a ``module_names`` or ``exclude``
            pattern that matches no module, a model with no module to hook, a second ``NoiseInjection`` in the
            same Trainer that hooks some of the same modules (split them with ``module_names``/``exclude``), or a
            decay schedule with unbounded training; during training, if a hooked module does not return a
            floating-point ``(N, C, ...)`` tensor.

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

    # per-fit state; the settings are NoiseSettings'
    _engine: Optional[NoiseEngine] = None
    # the noise stream (base seed, training batches started), carried across fits and restored from checkpoints
    _stream: Optional[dict[str, int]] = None
    _restored = False
    _attach_at_fit_start = False
    _rank = 0
    _total_steps: Optional[int] = None
    _acted_on: tuple[str, ...] = ()  # the modules this fit hooks, seen by a second NoiseInjection

    @property
    def current_scale(self) -> float:
        """The multiplicative noise level of the current training step."""
        return self._engine.current_scale if self._engine is not None else self._scale

    @property
    def current_shift(self) -> float:
        """The additive noise level of the current training step."""
        return self._engine.current_shift if self._engine is not None else self._shift

    @property
    def hooked_modules(self) -> list[str]:
        """Qualified names of the modules whose outputs get noise (empty outside of a fit)."""
        return list(self._engine.hooked_modules) if self._engine is not None else []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            module_types=list(self._type_names), module_names=list(self._module_names), exclude=list(self._exclude)
        )

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
        continuing = trainer.global_step > 0 and self._stream is not None
        if not (self._restored or continuing):
            self._stream = {"seed": self._seed if self._seed is not None else torch.initial_seed(), "batches": 0}
        self._rank = trainer.global_rank
        # Layers built in `configure_model` (called after `setup`) exist only at `on_fit_start`.
        self._attach_at_fit_start = is_overridden("configure_model", pl_module)
        if not self._attach_at_fit_start:
            self._attach(pl_module)

    def _attach(self, model: nn.Module) -> None:
        engine = NoiseEngine(model, rank=self._rank, drive=False, **self.settings())
        try:
            names = set(engine.hooked_modules)
            _check_single_owner(getattr(model, "_trainer", None), self, names.__contains__, "module(s)")
        except MSRConfigurationError:
            engine.detach()
            raise
        if self._stream is not None:
            engine.load_state_dict(self._stream)
        self._engine = engine
        self._acted_on = tuple(engine.hooked_modules)

    def _detach(self) -> None:
        if self._engine is not None:
            self._stream = self._state()
            self._engine.detach()
            self._engine = None
        self._acted_on = ()

    def _state(self) -> Optional[dict[str, int]]:
        if self._engine is None:
            return self._stream
        state = self._engine.state_dict()
        return {"seed": state["seed"], "batches": state["batches"]}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._attach_at_fit_start:
            self._attach_at_fit_start = False
            self._attach(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restored = False
        self._total_steps = None
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
        if self._engine is None:
            return
        self._engine.batch_start(step=trainer.global_step, total_steps=self._total_steps)
        if getattr(trainer, "barebones", False):  # `Trainer(barebones=True)` disables `self.log`
            return
        # Identical on every rank: no sync needed. The loggers write it every `log_every_n_steps`.
        pl_module.log("msr/noise_scale", self.current_scale, on_step=True, on_epoch=False, batch_size=1)
        if self._shift > 0.0 or self._final_shift > 0.0:
            pl_module.log("msr/noise_shift", self.current_shift, on_step=True, on_epoch=False, batch_size=1)

    def _end_batch(self) -> None:
        if self._engine is not None:
            self._engine.batch_end()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._end_batch()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A LightningModule's `on_train_batch_start` returning -1 ends the epoch without `on_train_batch_end`.
        self._end_batch()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_batch()

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
        state = self._state()
        return dict(state) if state is not None else {"seed": None, "batches": 0}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning calls this after `setup`: the checkpoint's stream position replaces the fresh one.
        if state_dict.get("seed") is not None:
            self._stream = {"seed": int(state_dict["seed"]), "batches": int(state_dict.get("batches", 0))}
            self._restored = True
            if self._engine is not None:
                self._engine.load_state_dict(self._stream)
