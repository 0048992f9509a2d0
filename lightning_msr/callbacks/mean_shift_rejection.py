"""Mean Shift Rejection as a Lightning callback.

Ruff, Beck, Bach, "Training Deep Neural Networks Without Minibatch Statistics or Normalization"
(arXiv:1911.13173): zero-mean initialisation of every conv kernel with unit filter magnitude, and a mean
projection of the conv-weight gradients before every optimizer step, keep the network on the zero-mean
"isocline" where the spatial common-mode of each input cannot shift its outputs -- without BatchNorm.

The callback decides *when*; the work is :class:`lightning_msr.MSREngine`'s (the same engine runs Fabric and plain
PyTorch loops): it is created at ``setup("fit")`` and told of each batch and optimizer step from the Trainer's hooks.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_msr._checks import _check_single_owner, _runs_in_worker_processes
from lightning_msr.engine.msr import MSREngine
from lightning_msr.engine.settings import MSRSettings
from lightning_msr.exceptions import MSRConfigurationError, MSRWarning
from lightning_msr.functional import KernelWeight, eligible_weights

__all__ = ["MeanShiftRejection"]


def _unsupported_strategy(strategy: Any) -> Optional[str]:
    """Why ``strategy`` lays parameters out so that a kernel group can be split across ranks, or ``None``.

    FSDP2 (``ModelParallelStrategy`` with ``fully_shard``) keeps whole rows of every weight on one rank and is
    supported; each of its DTensor weights is checked when the weights are collected (``functional.kernel_groups``).
    """
    names = {cls.__name__ for cls in type(strategy).__mro__}
    for name, why in (
        ("FSDPStrategy", "it flattens and shards the parameters of each unit (FSDP1) as one buffer in equal pieces"),
        ("DeepSpeedStrategy", "it flattens and partitions parameters and gradients into equal pieces"),
    ):
        if name in names:
            return (
                f"{type(strategy).__name__} is not supported: {why}, wherever kernels begin and end, so a kernel "
                "group can be split across ranks. Use 'ddp_msr' (or 'ddp'), or, to shard, Lightning's "
                "`ModelParallelStrategy` with FSDP2's `fully_shard` in `configure_model`: it shards every weight "
                "along dim 0 (the output filters of a conv), which keeps each kernel whole on one rank."
            )
    return None


class MeanShiftRejection(MSRSettings, Callback):
    r"""Train conv nets without BatchNorm: zero-mean kernels and mean-free gradients (Mean Shift Rejection).

    Added to a :class:`~lightning.pytorch.Trainer`, this callback changes nothing in the LightningModule:

    * at ``setup("fit")`` -- before checkpoint weights are restored, before ``configure_optimizers`` and
      before DDP broadcasts rank 0's weights -- it initialises every conv filter (``mode="filter"``, the
      default) or kernel (``mode="kernel"``) to zero mean with filter norm ``init_magnitude``
      (``init="zero_mean"``), or centres the existing, e.g. pretrained, kernels
      (``init="center"``). Frozen weights (``requires_grad=False``) are left as they are, with a warning. A
      model is never initialised twice (a later fit asking for other settings is warned that nothing is
      redrawn), and a fit resumed from a checkpoint keeps the checkpoint's weights -- a checkpoint trained
      without MSR gets a warning that its kernels are not zero-mean, or with ``init="center"`` is centred
      once restored;
    * for every optimizer step it subtracts ``alpha`` times the filter-wise (or kernel-wise) mean from the
      conv-weight gradients (``g <- g - alpha * mean(g)``, an exact projection for ``alpha = 1``), so SGD with momentum,
      Nesterov and weight decay keeps the kernels on the zero-mean isocline;
    * after the step of an optimizer whose update is not linear in the gradient (Adam, AdamW, RMSprop,
      Adagrad, ...) it re-centres the updated kernels, which SGD does not need;
    * with ``keep_magnitude=True``, after every optimizer step it rescales each updated output filter back to
      the Euclidean norm it had at fit start (``init_magnitude`` after a fresh zero-mean init), so the weights
      stay on the intersection of the zero-mean isocline and a sphere: the per-filter gain that follows the conv
      carries the scale, as in BatchNorm networks, and large learning rates can no longer blow the filters up;
    * at the first training batch after a fresh zero-mean draw (``calibrate=True``), it sets every per-channel
      gain and bias -- the :class:`~lightning_msr.nn.affine.ChannelAffine` or
      :class:`~lightning_msr.nn.AutomaticGainControl` layers that replaced BatchNorm, or the filters of convs
      that no such layer follows -- so that the signal propagates as in a BatchNorm network in training mode,
      and scales the end of every residual branch by ``residual_scale`` (see
      :func:`lightning_msr.calibration.calibrate`). The passes are the first training steps themselves, from the
      batches of all ranks, pooled until ``calibration_samples`` samples have been seen; afterwards nothing
      depends on the batch. Without it, or when the weights were not
      drawn (``init="center"``/``"none"``, a resumed fit), the first batch is only watched, and a signal that
      vanishes or explodes on its way to the head is reported with the layer where it happens;
    * it logs ``msr/mean_shift``, the worst layer's :func:`~lightning_msr.functional.mean_shift`, at the
      Trainer's logging interval.

    The projection is linear, so where it is exact to do so (``alpha == 1``) it runs during backward, in a
    post-accumulate-grad hook of every kernel as soon as its gradient exists, overlapping with the rest of
    backward and DDP's bucketed all-reduce: before the all-reduce and between accumulation micro-steps, which
    gives the same gradients as projecting afterwards. With ``alpha < 1`` it runs in
    ``on_before_optimizer_step`` (after the all-reduce, after AMP unscaling, after the last accumulation
    micro-step and before the Trainer's gradient clipping). The adaptive clipping always runs there, on the
    final gradient.


    **Arguments**: exactly those of :class:`~lightning_msr.MSRSettings`, where each is documented (``alpha``,
    ``init``, ``init_magnitude``, ``include_linear``, ``include_stem``, ``batchnorm``, ``mode``, ``recenter``,
    ``keep_magnitude``, ``projection_timing``, ``exclude``, ``strict``, ``seed``, ``calibrate``,
    ``residual_scale``, ``adaptive_clip``, ``implementation``, ``calibration_samples``): it defines and checks them
    once, for this callback and for :class:`~lightning_msr.MSREngine`.

    Raises:
        MSRConfigurationError: for an argument out of range (at construction), and at ``setup`` for BatchNorm
            with ``batchnorm="error"``, for FSDP1 and DeepSpeed (FSDP2's ``fully_shard`` is supported), for a
            DTensor weight sharded so that a kernel group is split across ranks, for an ``exclude`` pattern
            that matches no module, for a second ``MeanShiftRejection`` in the Trainer acting on some of the
            same weights, or for a model without conv layers when ``strict=True``.

    With 16-bit weights (``precision="bf16-true"`` or ``"16-true"``) the kernels can only be zero-mean, and
    ``keep_magnitude`` can only hold the norms, to the precision of the weight dtype (about ``8e-3`` relative
    for bfloat16); a warning says so. ``"bf16-mixed"`` keeps float32 weights and exact MSR.

    Example::

        >>> import lightning as L
        >>> import torch
        >>> from torch import nn
        >>> from lightning_msr import MeanShiftRejection
        >>> from lightning_msr.functional import mean_shift
        >>> class Net(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return nn.functional.cross_entropy(self.net(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        >>> data = torch.utils.data.TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 2, (16,)))
        >>> model = Net()
        >>> trainer = L.Trainer(max_steps=3, callbacks=[MeanShiftRejection()], logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
        >>> bool(mean_shift(model.net[0].weight) < 1e-5)
        True
    """

    # per-fit state; the settings are MSRSettings'
    _engine: Optional[MSREngine] = None
    _pending_state: Optional[dict[str, Any]] = None  # a checkpoint's state that came before the engine
    _acted_on: tuple[str, ...] = ()  # the weights this fit acts on, seen by a second MeanShiftRejection
    _deferred = False
    _trainer_spawns = False

    # ------------------------------------------------------------------ public read-only views
    @property
    def weights(self) -> list[KernelWeight]:
        """The weights acted on (empty before ``setup``)."""
        return self._engine.weights if self._engine is not None else []

    @property
    def engine(self) -> Optional[MSREngine]:
        """The engine doing the work for the current model (``None`` before ``setup``)."""
        return self._engine

    @property
    def fused(self) -> bool:
        """Whether the current fit takes the fused per-step path (see ``implementation``)."""
        return self._engine is not None and self._engine.fused

    @property
    def projects_in_backward(self) -> bool:
        """Whether the current fit projects gradients during backward (see ``projection_timing``)."""
        return self._engine is not None and self._engine.projects_in_backward

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self._alpha, mode=self._mode, include_linear=self._include_linear)

    # ------------------------------------------------------------------ setup: surgery and initialisation
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return  # validate/test/predict never touch the weights
        reason = _unsupported_strategy(trainer.strategy)
        if reason:
            raise MSRConfigurationError(f"MeanShiftRejection: {reason}")
        self._trainer_spawns = _runs_in_worker_processes(trainer)
        self._deferred = not eligible_weights(pl_module) and is_overridden("configure_model", pl_module)
        if self._deferred:
            # Layers built in `configure_model` (which Lightning calls right after this hook) are not there
            # yet: adopt and initialise them at fit start instead.
            return
        self._create_engine(trainer, pl_module)

    def _create_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule, wrapped: bool = False) -> None:
        engine = self._engine
        if engine is not None and engine.model is pl_module:
            engine.refresh()  # a second fit of the same model: adopted and initialised already
        else:
            # before DDP wraps the model (setup) it broadcasts rank 0's draw itself; once it has (fit start), the
            # engine shares the draw the same way
            engine = MSREngine(pl_module, resuming_from=trainer.ckpt_path, broadcast_draw=wrapped, **self.settings())
            if self._pending_state is not None:
                engine.load_state_dict(self._pending_state)
                self._pending_state = None
            if engine.replaced and self._trainer_spawns:
                kind = "fold" if self._batchnorm == "replace" else "affine"
                rank_zero_warn(
                    f"MeanShiftRejection(batchnorm={self._batchnorm!r}) replaced BatchNorm inside the worker "
                    "processes of a spawn/fork strategy. The model object in the main process is not converted, and "
                    "Lightning loads the trained weights back into it non-strictly, dropping the new layers' "
                    f"parameters. Call `lightning_msr.replace_batchnorm(model, {kind!r})` before `trainer.fit`, or "
                    "use `strategy='ddp'` or 'ddp_msr'.",
                    category=MSRWarning,
                )
        self._engine = engine
        names = set(engine.acted_on)
        _check_single_owner(getattr(pl_module, "_trainer", None), self, names.__contains__, "conv weight(s)")
        self._acted_on = tuple(engine.acted_on)

    # ------------------------------------------------------------------ fit: hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred or self._engine is None:
            self._deferred = False
            self._create_engine(trainer, pl_module, wrapped=True)
        engine = self._engine
        assert engine is not None
        engine.detach()
        if engine.parameters_replaced():  # FSDP2's `fully_shard` in `configure_model` replaced them
            engine.refresh()
        if trainer.ckpt_path is not None:
            # Lightning restores a checkpoint after `setup` (where the draw happened) and sets `ckpt_path` then:
            # the weights are the checkpoint's (identical on every rank), which are never recalibrated
            engine.mark_resumed(trainer.ckpt_path)
            engine.check_restored_kernels(trainer.ckpt_path)
        clip_by_value = bool(trainer.gradient_clip_val) and trainer.gradient_clip_algorithm == "value"
        if clip_by_value:
            rank_zero_warn(
                "Gradient clipping by value (`gradient_clip_algorithm='value'`) clips each element on its own, "
                "which breaks the zero-mean condition of the projected gradients; MeanShiftRejection re-centres "
                "the kernels after every step to restore it. Prefer `gradient_clip_algorithm='norm'`, which "
                "keeps the projection.",
                category=MSRWarning,
            )
        blocked = None
        if trainer.gradient_clip_val:
            blocked = (
                "the Trainer clips gradients (`gradient_clip_val`) before the optimizer step, and it must see them "
                "projected"
            )
        engine.attach(
            trainer.optimizers,
            run_before_step=False,  # `on_before_optimizer_step` runs it, before the Trainer's gradient clipping
            watch_forward=False,  # `on_train_batch_start` arms the first batch
            fused_blocked_by=blocked,
            fuse_update=lambda optimizer: self._nothing_reads_gradients(trainer, pl_module),
            clip_by_value=clip_by_value,
            # a DDP communication hook may compress gradients (PowerSGD), which is not linear: project after it
            backward_allowed=getattr(trainer.strategy, "_ddp_comm_hook", None) is None,
        )

    def _nothing_reads_gradients(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether the fused pass may also do an SGD optimizer's update: nothing looks at the projected gradients
        between backward and the step -- no other callback's or the LightningModule's ``on_before_optimizer_step``,
        no ``configure_gradient_clipping``, no manual optimization (whose ``training_step`` sees the gradients).
        Otherwise the gradients are projected and clipped in their own pass before the step, where every such hook
        sees them."""
        if not pl_module.automatic_optimization:
            return False
        if any(is_overridden(name, pl_module) for name in ("on_before_optimizer_step", "configure_gradient_clipping")):
            return False
        others = [cb for cb in trainer.callbacks if cb is not self]
        return not any(is_overridden("on_before_optimizer_step", cb, Callback) for cb in others)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._engine is not None:
            self._engine.batch_start()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._engine is not None:
            self._engine.before_optimizer_step(optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        engine = self._engine
        if engine is None:
            return
        engine.batch_end()
        if not engine.weights or getattr(trainer, "barebones", False):  # barebones Trainers disable `self.log`
            return
        connector = getattr(trainer, "_logger_connector", None)
        if connector is not None and not connector.should_update_logs:
            return  # computed on logging steps only
        pl_module.log("msr/mean_shift", engine.current_mean_shift(), on_step=True, on_epoch=False)

    def current_mean_shift(self) -> torch.Tensor:
        """The largest :func:`~lightning_msr.functional.mean_shift` over the weights acted on (0 if none)."""
        return self._engine.current_mean_shift() if self._engine is not None else torch.zeros(())

    # ------------------------------------------------------------------ teardown and checkpoints
    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._engine is not None:
            self._engine.detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._engine is None:
            return {"initialized": False, "alpha": self._alpha, "mode": self._mode}
        return self._engine.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # called after `setup`; with layers built in `configure_model` the engine only exists from fit start
        if self._engine is None:
            self._pending_state = dict(state_dict)
        else:
            self._engine.load_state_dict(state_dict)
