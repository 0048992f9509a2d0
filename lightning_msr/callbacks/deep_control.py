"""Deep Control as a Lightning callback: every BatchNorm becomes an automatic gain control.

Ruff, "Deep Control -- an automatic gain control for deep neural networks" (arXiv:1706.03907). The
callback only decides *when*: the surgery itself is :func:`lightning_msr.replace_batchnorm` with
``replacement="agc_fold"`` (or ``"agc"``), and the layer is :class:`lightning_msr.nn.AutomaticGainControl`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_msr._checks import UnitInterval, _check_beta_init, _check_bool, _check_names, _runs_in_worker_processes
from lightning_msr.exceptions import MSRConfigurationError, MSRWarning
from lightning_msr.nn.gain_control import AutomaticGainControl
from lightning_msr.surgery import Replacements, find_batchnorm, replace_batchnorm

__all__ = ["DeepControl"]


class DeepControl(Callback):
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

    Args:
        beta_init: initial value of every ``beta``, in ``[0, 1]`` (the fraction of the map mean removed; 1
            removes it all, 0 starts as a plain per-channel affine layer). ``beta`` is learnt freely afterwards.
        exclude: module-name patterns (``fnmatch`` syntax, e.g. ``"head.*"``) of BatchNorm layers to keep.
            Every pattern must match a module of the model.
        fold_gain: fold each gain into the conv that feeds its gain control, where there is one.

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

    def __init__(
        self, beta_init: UnitInterval = 1.0, exclude: Optional[Sequence[str]] = None, fold_gain: bool = True
    ) -> None:
        self._beta_init = _check_beta_init(beta_init)
        self._exclude = _check_names("exclude", exclude)
        self._fold_gain = _check_bool("fold_gain", fold_gain)
        self._replacement = "agc_fold" if self._fold_gain else "agc"
        self._replaced: list[str] = []
        self._input_checks: list[RemovableHandle] = []
        self._model_ref: Optional[weakref.ReferenceType] = None

    @property
    def replaced(self) -> list[str]:
        """Qualified names of the BatchNorm layers this callback replaced (empty before ``fit``)."""
        return list(self._replaced)

    def __repr__(self) -> str:
        exclude = list(self._exclude) if self._exclude else None
        return f"{type(self).__name__}(beta_init={self._beta_init}, exclude={exclude}, fold_gain={self._fold_gain})"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return  # validate / test / predict never change the model
        if self._model_ref is not None and self._model_ref() is pl_module:
            return  # a second fit of the same model: the surgery is done
        self._model_ref = weakref.ref(pl_module)
        # replace_batchnorm refuses an `exclude` pattern that matches no module
        replaced = replace_batchnorm(
            pl_module, self._replacement, beta_init=self._beta_init, exclude=self._exclude
        )
        self._replaced = list(replaced)
        self._guard_feature_inputs(replaced)
        if replaced:
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
        if any(isinstance(m, AutomaticGainControl) for m in pl_module.modules()):
            rank_zero_info("DeepControl: the model has no BatchNorm left; its AutomaticGainControl layers stay.")
        else:
            rank_zero_warn(
                f"DeepControl found no BatchNorm layer to replace in {type(pl_module).__name__}"
                + (f" outside `exclude`={list(self._exclude)}" if self._exclude else "")
                + "; it does nothing for this model. Add `lightning_msr.nn.AutomaticGainControl` layers after "
                "your convolutions yourself, or use `MeanShiftRejection`.",
                category=MSRWarning,
            )

    def _guard_feature_inputs(self, replaced: Replacements) -> None:
        """Name the layer and ``exclude`` if a replaced BatchNorm turns out to see ``(N, C)`` features.

        Only the first forward pass tells whether a BatchNorm1d saw ``(N, C)`` or ``(N, C, L)``: each new layer
        gets a pre-hook that checks its first input and then removes itself, so training pays nothing.
        """
        seen: set[int] = set()
        for name, layer in replaced.new_modules.items():
            if id(layer) in seen or not isinstance(layer, AutomaticGainControl):
                continue
            seen.add(id(layer))
            handle: list[RemovableHandle] = []

            def check(module: nn.Module, args: tuple, name: str = name, handle: list = handle) -> None:
                handle[0].remove()
                x = args[0] if args else None
                if isinstance(x, Tensor) and x.dim() == 2:
                    raise MSRConfigurationError(
                        f"DeepControl replaced the BatchNorm `{name}` by an AutomaticGainControl, which subtracts "
                        "the spatial mean of each (sample, channel) map and needs input of shape (N, C, *spatial), "
                        f"but `{name}` gets (N, C) features of shape {tuple(x.shape)} (e.g. a BatchNorm1d in an MLP "
                        f"head). Leave it out with `DeepControl(exclude=[{name!r}])`, or turn it into a per-channel "
                        f"scale and bias before fit with `lightning_msr.replace_batchnorm(model, 'affine')`."
                    )

            handle.append(layer.register_forward_pre_hook(check))
            self._input_checks.append(handle[0])

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._input_checks:
            handle.remove()
        self._input_checks = []

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
        saved = list(state_dict.get("replaced", []))
        if saved and self._replaced and saved != self._replaced:
            rank_zero_warn(
                f"DeepControl: the checkpoint was saved after replacing {len(saved)} BatchNorm layer(s), but "
                f"{len(self._replaced)} were replaced in this run (first differences: "
                f"{sorted(set(saved) ^ set(self._replaced))[:5]}). Is it the same model?",
                category=MSRWarning,
            )
