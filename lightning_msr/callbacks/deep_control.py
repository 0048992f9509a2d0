"""Deep Control as a Lightning callback: every BatchNorm becomes an automatic gain control.

Ruff, "Deep Control -- an automatic gain control for deep neural networks" (arXiv:1706.03907). The
callback only decides *when*: the surgery is :class:`lightning_msr.engine.deep_control.DeepControlEngine`'s
(:func:`lightning_msr.replace_batchnorm` with ``replacement="agc_fold"`` or ``"agc"``), and the layer is
:class:`lightning_msr.nn.AutomaticGainControl`.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_msr._checks import _runs_in_worker_processes
from lightning_msr.engine.deep_control import DeepControlEngine, DeepControlSettings, check_replaced
from lightning_msr.exceptions import MSRWarning
from lightning_msr.surgery import find_batchnorm

__all__ = ["DeepControl"]


class DeepControl(DeepControlSettings, Callback):
    r"""Replace every BatchNorm of the LightningModule with Deep Control's automatic gain control.

    At the start of ``fit`` (in ``setup("fit")``: before a checkpoint is restored, before
    ``configure_optimizers`` and before DDP wraps the model) every ``BatchNorm1d/2d/3d`` and
    ``SyncBatchNorm`` becomes an :class:`~lightning_msr.nn.AutomaticGainControl`
    (``y = gain * (x - beta * mean_spatial(x)) + bias``, per sample) whose ``gain``/``bias`` start from the
    BatchNorm's ``weight``/``bias`` and whose ``beta`` starts at ``beta_init``. The new parameters are
    therefore seen by the optimizer and broadcast by DDP like any other, and a checkpoint saved after the
    surgery loads back into a fresh LightningModule when this callback is present again.

    With ``fold_gain=True`` (the default) the gain of every gain control that directly follows a plain conv
    moves into that conv, which becomes a :class:`~lightning_msr.nn.ScaledConv2d` with ``scale`` = the gain,
    and the gain control keeps ``beta`` and ``bias`` (``replace_batchnorm(..., "agc_fold")``): the same
    function, ``scale * (conv(x) - beta * mean_spatial(conv(x))) + bias``, but the gain control then saves
    only its map means for backward instead of the whole conv output. ``fold_gain=False`` keeps the gain in
    the gain control (``"agc"``), e.g. to resume a checkpoint saved that way.

    Afterwards the model uses no minibatch statistics: any batch size works (1 included), each sample's
    output is independent of the rest of its batch, and training and evaluation compute the same function.

    Nothing happens on ``validate``/``test``/``predict``, and the surgery is done once per model (a second
    ``fit`` finds no BatchNorm left). To evaluate a checkpoint in a new process without ``fit``, apply
    ``replace_batchnorm(model, "agc_fold")`` (``"agc"`` with ``fold_gain=False``) to the freshly built model
    before loading the state dict. Layers
    created after this callback's ``setup`` (in ``LightningModule.setup`` or ``configure_model``) are
    reported with a warning at fit start; they keep their BatchNorm.

    With a spawn- or fork-based strategy (``ddp_spawn``, ``ddp_notebook``) the surgery happens in the worker
    processes and the model object you passed to ``fit`` is not converted (a warning says so): call
    :func:`~lightning_msr.replace_batchnorm` on it before ``fit`` instead.

    The gain control needs a spatial map: a BatchNorm1d on ``(N, C)`` features (e.g. in an MLP head) raises
    at its first forward pass, with an error that names the layer; leave such layers out with ``exclude``.
    When used together with ``MeanShiftRejection``, list ``DeepControl`` first so it sees the BatchNorm layers.

    **Arguments**: exactly those of :class:`~lightning_msr.engine.deep_control.DeepControlSettings`, where each is
    documented (``beta_init``, ``exclude``, ``fold_gain``); the surgery is
    :class:`~lightning_msr.engine.deep_control.DeepControlEngine`'s.

    Raises:
        MSRConfigurationError: if ``beta_init`` is not in ``[0, 1]``, ``fold_gain`` not a bool, or ``exclude``
            is not a list of patterns; in ``setup``, for an ``exclude`` pattern that matches no module and for
            the models :func:`~lightning_msr.replace_batchnorm` refuses; at the first forward pass of a replaced
            layer that gets ``(N, C)`` features.

    Example::

        >>> import lightning as L
        >>> from lightning_msr import DeepControl
        >>> callback = DeepControl(beta_init=0.9)
        >>> callback
        DeepControl(beta_init=0.9, exclude=None, fold_gain=True)
        >>> trainer = L.Trainer(callbacks=[callback], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)

    From the command line::

        python train.py fit --trainer.callbacks+=lightning_msr.DeepControl --trainer.callbacks.beta_init=0.9
    """

    _engine: Optional[DeepControlEngine] = None
    _replaced: tuple[str, ...] = ()
    _model_ref: Optional[weakref.ReferenceType] = None

    @property
    def replaced(self) -> list[str]:
        """Qualified names of the BatchNorm layers this callback replaced (empty before ``fit``)."""
        return list(self._replaced)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return  # validate / test / predict never change the model
        if self._model_ref is not None and self._model_ref() is pl_module:
            return  # a second fit of the same model: the surgery is done
        self._model_ref = weakref.ref(pl_module)
        engine = DeepControlEngine(pl_module, **self.settings())
        self._engine = engine
        self._replaced = tuple(engine.replaced)
        if engine.replaced:
            if _runs_in_worker_processes(trainer):
                rank_zero_warn(
                    f"DeepControl replaced BatchNorm inside the worker processes of `{type(trainer.strategy).__name__}`"
                    " (spawn/fork launcher). The model object in the main process is not converted, and Lightning "
                    "loads the trained weights back into it non-strictly, dropping the new layers' parameters. Call "
                    f"`lightning_msr.replace_batchnorm(model, {self._replacement!r})` before `trainer.fit` (this "
                    "callback then finds "
                    "nothing left to replace), or use `strategy='ddp'`.",
                    category=MSRWarning,
                )
            return
        if engine.has_gain_controls:
            rank_zero_info("DeepControl: the model has no BatchNorm left; its AutomaticGainControl layers stay.")
        else:
            rank_zero_warn(
                f"DeepControl found no BatchNorm layer to replace in {type(pl_module).__name__}"
                + (f" outside `exclude`={list(self._exclude)}" if self._exclude else "")
                + "; it does nothing for this model. Add `lightning_msr.nn.AutomaticGainControl` layers after "
                "your convolutions yourself, or use `MeanShiftRejection`.",
                category=MSRWarning,
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._engine is not None:
            self._engine.detach()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        late = find_batchnorm(pl_module, self._exclude)
        if late:
            shown = ", ".join(repr(name) for name in list(late)[:5]) + (", ..." if len(late) > 5 else "")
            rank_zero_warn(
                f"DeepControl: {len(late)} BatchNorm layer(s) appeared after the surgery ({shown}), e.g. built in "
                "`LightningModule.setup` or `configure_model`, which run after callbacks' `setup`. They keep "
                "using minibatch statistics; build them in `__init__`, or call "
                f"`lightning_msr.replace_batchnorm(self, {self._replacement!r})` at the end of your "
                "`configure_model`.",
                category=MSRWarning,
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"beta_init": self._beta_init, "replaced": list(self._replaced)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Called after `setup` (the surgery) on resume: the checkpoint's weights need the same layers.
        check_replaced(list(state_dict.get("replaced", [])), self._replaced)
