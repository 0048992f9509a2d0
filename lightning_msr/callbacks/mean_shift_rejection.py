"""Mean Shift Rejection as a Lightning callback.

Ruff, Beck, Bach, "Training Deep Neural Networks Without Minibatch Statistics or Normalization"
(arXiv:1911.13173): zero-mean initialisation of every conv kernel with unit filter magnitude, and a mean
projection of the conv-weight gradients before every optimizer step, keep the network on the zero-mean
"isocline" where the spatial common-mode of each input cannot shift its outputs -- without BatchNorm.
"""

from __future__ import annotations

import contextlib
import weakref
from fnmatch import fnmatchcase
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_msr._checks import (
    PositiveFloat,
    UnitInterval,
    _check_bool,
    _check_choice,
    _check_in_range,
    _check_names,
    _check_positive,
    _check_positive_int,
    _check_seed,
    _check_single_owner,
    _runs_in_worker_processes,
    _shown,
)
from lightning_msr._sharding import is_sharded, local_shard
from lightning_msr.calibration import CalibrationReport, calibrate, gain_parameters, watch_signal
from lightning_msr.exceptions import MSRConfigurationError, MSRWarning
from lightning_msr.functional import (
    KernelGroups,
    KernelWeight,
    adaptive_clip_,
    eligible_weights,
    filter_norms,
    kernel_groups,
    mean_shift,
    project_groups_,
    project_mean_,
    stem_conv,
    zero_mean_init_,
)
from lightning_msr.fused import FusedWeight, fused_unavailable, project_and_clip_, recenter_and_rescale_, sgd_step_
from lightning_msr.fused import unsupported as fused_unsupported
from lightning_msr.nn.gain_control import AutomaticGainControl
from lightning_msr.surgery import find_batchnorm, replace_batchnorm

_INITS = ("zero_mean", "center", "none")
_TINY = torch.finfo(torch.float32).tiny
_BATCHNORM = ("error", "warn", "replace", "affine")
_TIMINGS = ("auto", "backward", "optimizer_step")
_MODES = ("kernel", "filter")
_IMPLEMENTATIONS = ("auto", "fused", "eager")
# Optimizers whose update is linear in the gradient (given their buffers): a zero-mean gradient gives a
# zero-mean update, so the weights stay on the isocline with no re-centring.
_LINEAR_OPTIMIZERS: tuple[type, ...] = (torch.optim.SGD, torch.optim.ASGD)
# A model whose kernels are all this close to zero mean is taken to be initialised (or trained) with MSR.
_ALREADY_CENTRED = 1e-4
# Set on a model once it has been initialised, so that no second fit (or second callback) redraws it.
_INIT_FLAG = "_lightning_msr_initialized"
# ... with the settings it was initialised with, to say so when a later fit asks for others.
_INIT_SETTINGS = "_lightning_msr_init_settings"


def _settings(settings: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in settings.items())


def _unsupported_strategy(strategy: Any) -> Optional[str]:
    """Why ``strategy`` lays parameters out so that a kernel group can be split across ranks, or ``None``.

    FSDP2 (``ModelParallelStrategy`` with ``fully_shard``) keeps whole rows of every weight on one rank and is
    supported; each of its DTensor weights is checked in ``_collect`` (``functional.kernel_groups``).
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


def _parameters_replaced(weights: list[KernelWeight]) -> bool:
    """Whether a module's ``weight`` is no longer the parameter collected (FSDP2's ``fully_shard`` in
    ``configure_model``, which runs after ``setup``, replaces each parameter by a sharded one)."""
    return any(w.module._parameters.get("weight") is not w.parameter for w in weights)


def _broadcast_(trainer: pl.Trainer, tensor: Tensor) -> None:
    """Copy rank 0's values into ``tensor`` on every rank (a no-op outside torch.distributed).

    A sharded (FSDP2) tensor is left alone: each rank holds different rows, drawn from the same seed.
    """
    if is_sharded(tensor):
        return
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(tensor.data, src=0)


def _plain_weight(module: nn.Module) -> bool:
    weight = module._parameters.get("weight")
    return isinstance(weight, nn.Parameter) and not isinstance(weight, nn.parameter.UninitializedParameter)


class MeanShiftRejection(Callback):
    r"""Train conv nets without BatchNorm: zero-mean kernels and mean-free gradients (Mean Shift Rejection).

    Added to a :class:`~lightning.pytorch.Trainer`, this callback changes nothing in the LightningModule:

    * at ``setup("fit")`` -- before checkpoint weights are restored, before ``configure_optimizers`` and
      before DDP broadcasts rank 0's weights -- it initialises every conv kernel to zero mean with filter
      norm ``init_magnitude`` (``init="zero_mean"``), or centres the existing, e.g. pretrained, kernels
      (``init="center"``). Frozen weights (``requires_grad=False``) are left as they are, with a warning. A
      model is never initialised twice (a later fit asking for other settings is warned that nothing is
      redrawn), and a fit resumed from a checkpoint keeps the checkpoint's weights -- a checkpoint trained
      without MSR gets a warning that its kernels are not zero-mean, or with ``init="center"`` is centred
      once restored;
    * for every optimizer step it subtracts ``alpha`` times the kernel-wise mean from the conv-weight
      gradients (``g <- g - alpha * mean(g)``, an exact projection for ``alpha = 1``), so SGD with momentum,
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

    Args:
        alpha: fraction of the kernel mean removed from each gradient, in ``[0, 1]``; ``1`` keeps the kernels
            exactly zero-mean, smaller values are the paper's weighted mean subtraction.
        init: ``"zero_mean"`` draws new zero-mean kernels; ``"center"`` subtracts the kernel mean from the
            existing weights (for pretrained models); ``"none"`` leaves the weights as they are.
        init_magnitude: Euclidean norm of every output filter after ``init="zero_mean"`` (> 0). A conv followed
            by a gain (the scale of a replaced BatchNorm, a ``ChannelAffine``) keeps this norm through
            calibration, which sets the gain instead; the gain makes the filter's gradient proportional to
            ``1 / init_magnitude``, so a filter's relative step goes as ``lr / init_magnitude**2``: ``0.7`` trains
            like ``1.0`` at twice the learning rate for the kernels (measured equal at the best LR of each on the
            Fashion-MNIST ResNet-20, `docs/concepts/settings.md`). A conv without a gain is rescaled by
            calibration, so there this only matters with ``calibrate=False``.
        include_linear: also centre ``nn.Linear`` weights (over their inputs). Off by default, as in the paper.
        include_stem: also act on the stem, the conv that reads the network's input
            (:func:`~lightning_msr.functional.stem_conv`: the first conv layer of a model with several). Off by
            default: a zero-mean kernel on the input discards its local mean (brightness, colour, a silhouette),
            which no later layer can recover; leaving the stem free measured 2-10 points better on Fashion-MNIST.
            The stem is still calibrated and clipped like the other convs. ``True`` is the paper's "every conv".
        batchnorm: what to do when the model contains BatchNorm: ``"warn"`` once, ``"error"``, or replace it
            by a per-channel scale and bias (:func:`lightning_msr.replace_batchnorm`): ``"replace"`` folds the
            scale into the conv feeding the BatchNorm (``replacement="fold"``: the conv becomes a
            :class:`~lightning_msr.nn.ScaledConv2d`, whose ``weight`` MSR keeps zero-mean and whose ``scale``
            it leaves alone; it saves no activation for the scale), ``"affine"`` keeps it a separate
            :class:`~lightning_msr.nn.affine.ChannelAffine` layer after the conv (the same function, more
            activation memory).
        mode: ``"kernel"`` (the paper's per-kernel mean) or ``"filter"`` (mean over each whole output filter,
            i.e. Gradient Centralization).
        recenter: re-centre the kernels after each optimizer step. ``None`` (default) does it for optimizers
            whose update is not linear in the gradient, and when gradients are clipped by value, if
            ``alpha == 1``; ``True``/``False`` force it on or off for every optimizer.
        keep_magnitude: after every optimizer step, rescale each output filter that the step updated back to its
            norm at fit start (the weight stays zero-mean), so steps rotate the kernels instead of growing them.
            Filters that are all zero at fit start (zero-initialised convs with ``init="none"``) have no norm to
            keep and train freely. With ``calibrate=True`` the norms kept are the calibrated ones.
        projection_timing: ``"auto"``, ``"backward"`` (project in each kernel's post-accumulate-grad hook;
            exact for ``alpha == 1`` only) or ``"optimizer_step"`` (project in ``on_before_optimizer_step``).
        exclude: module-name patterns (``fnmatch`` syntax, e.g. ``["stem.*", "head"]``) left untouched. Every
            pattern must match a module of the model.
        strict: raise instead of warning when the model has no conv layer to act on.
        seed: seed of the initialisation draw; ``None`` uses ``torch.initial_seed()``, so ``seed_everything``
            makes it reproducible. The draw never advances the global RNG.
        calibrate: after a fresh ``init="zero_mean"`` draw, set the gains (or filter magnitudes) from the first
            training batch so that every layer starts with BatchNorm's signal (data-dependent initialisation).
            Without it, zero-mean kernels of a fixed norm shrink the signal of most standard architectures by
            orders of magnitude before it reaches the classifier. ``False`` keeps the paper's plain draw.
        residual_scale: standard deviation of the last layer of every residual branch after calibration,
            relative to BatchNorm's 1, in ``[0, 1]``. The default ``0.3`` starts every branch small, so that
            residual sums stay bounded in deep networks (the model zoo's resnet152 starts within 10x of BatchNorm's
            classifier input), but not silent: on a Fashion-MNIST ResNet-20 it measured 10 points better than
            ``0`` (SkipInit, where no branch weight gets a gradient until the branch's scale has moved) after 80
            steps and 3.4 better after 237, and ``1`` (BatchNorm's start) 43 points worse.
        adaptive_clip: unit-wise adaptive gradient clipping (NFNets, Brock et al. 2021) of the conv filters (of
            the convs MSR acts on and of the stem), in ``on_before_optimizer_step`` (after the projection): no
            output filter gets a gradient larger than ``adaptive_clip`` times its own norm
            (:func:`~lightning_msr.functional.adaptive_clip_`). A network without normalisation has nothing that
            undoes an oversized step, so this is what keeps it stable at BatchNorm's learning rates. The same
            bound holds for every row of every ``nn.Linear`` (the classifier included) and every element of the
            per-channel scales and gains (folded ``scale``, ``ChannelAffine``, ``AutomaticGainControl``), relative
            to their own size; the offsets -- biases, gain controls' ``beta`` -- are clipped relative to
            ``max(|b|, 1)``, 1 being the calibrated signal's standard deviation, so a zero-initialised bias still
            moves (relative to its own size it could only grow by ``adaptive_clip * 1e-3`` per step, which measured
            4-7 points worse on a ResNet-20). Without them deep EfficientNets blew up within a few steps at
            BatchNorm's learning rate once the calibration let go, and AlexNet at its first step. ``None`` turns it
            off.
        calibration_samples: how many samples (summed over ranks) the calibration pools, over as many of the first
            training batches as it takes (>= 1): 64 means one batch at batch size 64, 32 at batch size 2, 64 at
            batch size 1. Frozen from one small batch, the scales fit its few samples and the error multiplies
            through depth (a deep EfficientNet passed 5-70x BatchNorm's signal on the next batch after calibrating on
            2 or 8 images, 1.1-2.3x after 64). While it pools, every batch is normalised with the statistics so far,
            as BatchNorm in training mode would; ``keep_magnitude`` takes its norms once it is done.
        implementation: how the per-step work runs. ``"fused"`` uses :mod:`lightning_msr.fused` (a small C kernel,
            compiled once per machine in about a second): with a plain ``torch.optim.SGD`` and nothing that looks at
            the gradients between backward and the step, one pass over each kernel does the projection, the adaptive
            clipping, SGD's update and ``keep_magnitude``'s rescaling (``.grad`` is then left unprojected); when a
            later callback or the LightningModule has an ``on_before_optimizer_step`` (e.g. gradient-norm logging),
            uses ``configure_gradient_clipping`` or manual optimization, or the optimizer is another one, the
            projection and clipping run in one pass in ``on_before_optimizer_step``, where those hooks see the
            projected and clipped gradients, and the rescaling and re-centring in one pass after the step.
            ``"eager"`` runs the same math as PyTorch operations, the projection in backward hooks where exact. Both
            give the same weights within float32 rounding. ``"auto"`` (default) takes the fused path where it can --
            float32 CPU weights, a C compiler, no Trainer gradient clipping (which must see projected gradients), no
            ``projection_timing="backward"`` -- and otherwise runs the eager one with one info message saying why
            (e.g. on GPUs); ``"fused"`` warns instead when it cannot be taken.

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

    def __init__(
        self,
        alpha: UnitInterval = 1.0,
        init: Literal["zero_mean", "center", "none"] = "zero_mean",
        init_magnitude: PositiveFloat = 1.0,
        include_linear: bool = False,
        include_stem: bool = False,
        batchnorm: Literal["error", "warn", "replace", "affine"] = "warn",
        mode: Literal["kernel", "filter"] = "kernel",
        recenter: Optional[bool] = None,
        keep_magnitude: bool = False,
        projection_timing: Literal["auto", "backward", "optimizer_step"] = "auto",
        exclude: Optional[list[str]] = None,
        strict: bool = False,
        seed: Optional[int] = None,
        calibrate: bool = True,
        residual_scale: float = 0.3,
        adaptive_clip: Optional[float] = 0.1,
        implementation: Literal["auto", "fused", "eager"] = "auto",
        calibration_samples: int = 64,
    ) -> None:
        super().__init__()
        self._alpha = _check_in_range("alpha", alpha, 0.0, 1.0)
        self._init = _check_choice("init", init, _INITS)
        self._init_magnitude = _check_positive("init_magnitude", init_magnitude)
        self._include_linear = _check_bool("include_linear", include_linear)
        self._include_stem = _check_bool("include_stem", include_stem)
        self._batchnorm = _check_choice("batchnorm", batchnorm, _BATCHNORM)
        self._mode = _check_choice("mode", mode, _MODES)
        self._recenter = _check_bool("recenter", recenter, allow_none=True)
        self._keep_magnitude = _check_bool("keep_magnitude", keep_magnitude)
        self._timing = _check_choice("projection_timing", projection_timing, _TIMINGS)
        if self._timing == "backward" and self._alpha != 1.0:
            raise MSRConfigurationError(
                f"Expected `projection_timing` to be 'auto' or 'optimizer_step' when `alpha` < 1, but got "
                f"'backward' with alpha={alpha!r}: a weighted mean subtraction is not idempotent, so it must run "
                "once per optimizer step, not once per backward pass."
            )
        self._exclude = _check_names("exclude", exclude)
        self._strict = _check_bool("strict", strict)
        self._seed = _check_seed("seed", seed)
        self._calibrate = _check_bool("calibrate", calibrate)
        self._residual_scale = _check_in_range("residual_scale", residual_scale, 0.0, 1.0)
        self._adaptive_clip = None if adaptive_clip is None else _check_positive("adaptive_clip", adaptive_clip)
        self._implementation = _check_choice("implementation", implementation, _IMPLEMENTATIONS)
        self._calibration_samples = _check_positive_int("calibration_samples", calibration_samples)

        # model-dependent state, filled at setup
        self._weights: Optional[list[KernelWeight]] = None
        self._stem: Optional[nn.Module] = None  # the conv reading the input, left free (include_stem=False)
        self._layouts: dict[int, tuple[nn.Parameter, KernelGroups, str]] = {}
        self._transposed: dict[int, bool] = {}  # per kernel: whether it belongs to a ConvTranspose
        self._grad_handles: dict[int, RemovableHandle] = {}
        self._step_handles: list[RemovableHandle] = []
        self._recenter_optimizers: set[int] = set()
        # keep_magnitude: per kernel, the float32 filter norms at fit start, the filters that were all zero
        # then (None if none was), and the weight's (transposed, groups)
        self._target_norms: dict[int, tuple[Tensor, Optional[Tensor], bool, int]] = {}
        self._optimizer_params: dict[int, tuple[int, list[tuple[nn.Parameter, KernelGroups]]]] = {}
        self._clip_params: dict[int, tuple[int, list[nn.Parameter]]] = {}
        self._gain_params: dict[int, tuple[int, tuple[list[nn.Parameter], list[nn.Parameter]]]] = {}
        self._frozen: list[int] = []  # kernels without a backward hook yet because they do not require grad
        self._project_in_backward = False
        # the fused per-step path (`implementation`): whether this fit takes it, and what the kernel does to the
        # weights of each optimizer (cached per optimizer like `_params_of`, cleared when the kept norms change)
        self._fused = False
        self._fused_weights_of: dict[int, tuple[int, list[FusedWeight]]] = {}
        # the SGD optimizers whose update of the kernels the fused pass does itself, and the gradients set aside
        # while SGD's own loop steps the other parameters
        self._fused_sgd: set[int] = set()
        self._set_aside: dict[int, list[tuple[Tensor, Optional[Tensor]]]] = {}
        self._model_ref: Optional[weakref.ReferenceType] = None
        self._deferred = False
        self._trainer_spawns = False
        self._initialized = False
        self._replaced: dict[str, nn.Module] = {}
        # the first training batch: calibrate the fresh draw (or only watch the signal), then finish the pass
        self._first_pass: Optional[contextlib.ExitStack] = None
        self._first_report: Optional[CalibrationReport] = None
        self._calibration_due = False
        self._acted_on: list[str] = []  # the weights this fit acts on, seen by a second MeanShiftRejection
        self._restored_state = False  # the checkpoint resumed from holds this callback's state (trained with MSR)
        self._restored_norms: Optional[dict[str, Tensor]] = None  # the norms kept by the run resumed from
        self._restored_calibration: Optional[dict[str, Any]] = None  # a calibration the checkpoint was taken in

    # ------------------------------------------------------------------ public read-only views
    @property
    def alpha(self) -> float:
        """Fraction of the kernel mean removed from each gradient."""
        return self._alpha

    @property
    def weights(self) -> list[KernelWeight]:
        """The weights acted on (empty before ``setup``)."""
        return list(self._weights or [])

    @property
    def fused(self) -> bool:
        """Whether the current fit takes the fused per-step path (see ``implementation``)."""
        return self._fused

    @property
    def projects_in_backward(self) -> bool:
        """Whether the current fit projects gradients during backward (see ``projection_timing``)."""
        return self._project_in_backward

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self._alpha, mode=self._mode, include_linear=self._include_linear)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(alpha={self._alpha}, init={self._init!r}, "
            f"init_magnitude={self._init_magnitude}, include_linear={self._include_linear}, "
            f"include_stem={self._include_stem}, "
            f"batchnorm={self._batchnorm!r}, mode={self._mode!r}, recenter={self._recenter}, "
            f"keep_magnitude={self._keep_magnitude}, projection_timing={self._timing!r}, "
            f"calibrate={self._calibrate}, residual_scale={self._residual_scale}, "
            f"adaptive_clip={self._adaptive_clip}, implementation={self._implementation!r}, "
            f"calibration_samples={self._calibration_samples})"
        )

    # ------------------------------------------------------------------ setup: surgery and initialisation
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return  # validate/test/predict never touch the weights
        reason = _unsupported_strategy(trainer.strategy)
        if reason:
            raise MSRConfigurationError(f"MeanShiftRejection: {reason}")
        self._trainer_spawns = _runs_in_worker_processes(trainer)
        self._handle_batchnorm(pl_module)
        self._deferred = not eligible_weights(pl_module) and is_overridden("configure_model", pl_module)
        if self._deferred:
            # Layers built in `configure_model` (which Lightning calls right after this hook) are not there
            # yet: collect and initialise them at fit start instead.
            return
        self._collect(pl_module)
        self._initialize(trainer, pl_module)

    def _handle_batchnorm(self, pl_module: nn.Module) -> None:
        names = list(find_batchnorm(pl_module))
        if not names:
            return
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
            return
        kind = "fold" if self._batchnorm == "replace" else "affine"
        self._replaced = dict(replace_batchnorm(pl_module, kind))
        if self._replaced and self._trainer_spawns:
            rank_zero_warn(
                f"MeanShiftRejection(batchnorm={self._batchnorm!r}) replaced BatchNorm inside the worker processes "
                "of a spawn/fork strategy. The model object in the main process is not converted, and Lightning "
                "loads the trained weights back into it non-strictly, dropping the new layers' parameters. Call "
                f"`lightning_msr.replace_batchnorm(model, {kind!r})` before `trainer.fit`, or use `strategy='ddp'` "
                "or 'ddp_msr'.",
                category=MSRWarning,
            )

    def _collect(self, pl_module: nn.Module) -> None:
        weights = eligible_weights(pl_module, include_linear=self._include_linear, exclude=self._exclude)
        # the free stem (unless excluded): not centred, but calibrated and clipped like the convs MSR acts on
        stem = None if self._include_stem else stem_conv(pl_module)
        self._stem = stem if any(w.module is stem for w in weights) else None
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
            name
            for name, m in pl_module.named_modules()
            if isinstance(m, nn.modules.conv._ConvNd) and not _plain_weight(m)
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
        self._weights = weights
        # of the local shard for an FSDP2 (DTensor) weight; refuses a sharding that splits a group
        self._layouts = {
            id(w.parameter): (
                w.parameter,
                kernel_groups(w.parameter, self._mode, w.transposed, w.groups, keep_magnitude=self._keep_magnitude),
                w.name,
            )
            for w in weights
        }
        self._transposed = {id(w.parameter): w.transposed for w in weights}
        self._model_ref = weakref.ref(pl_module)
        names = {w.name for w in weights}
        _check_single_owner(getattr(pl_module, "_trainer", None), self, names.__contains__, "conv weight(s)")
        self._acted_on = [w.name for w in weights]

    def _initialize(self, trainer: pl.Trainer, pl_module: nn.Module) -> bool:
        """Initialise or centre the weights as ``init`` says; returns whether any weight changed."""
        weights = self._weights or []
        if self._init == "none" or not weights:
            return False
        if getattr(pl_module, _INIT_FLAG, False):
            self._explain_no_redraw(pl_module)
            return False  # never re-initialise a model (second fit, second callback)
        if trainer.ckpt_path is not None:
            rank_zero_info(
                f"MeanShiftRejection: resuming from {trainer.ckpt_path!r}; the checkpoint's weights are kept."
            )
            self._mark_initialized(pl_module)
            return False
        weights = self._leave_frozen_alone(weights)
        if not weights:
            self._mark_initialized(pl_module)
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
        self._mark_initialized(pl_module)
        return True

    def _mark_initialized(self, pl_module: nn.Module) -> None:
        object.__setattr__(pl_module, _INIT_FLAG, True)
        object.__setattr__(pl_module, _INIT_SETTINGS, self._init_settings())
        self._initialized = True

    def _init_settings(self) -> dict[str, Any]:
        if self._init == "zero_mean":
            return {"init": self._init, "init_magnitude": self._init_magnitude, "seed": self._seed}
        return {"init": self._init}

    def _explain_no_redraw(self, pl_module: nn.Module) -> None:
        """A model is initialised once: say so, loudly when this fit asks for other settings than the first."""
        before = getattr(pl_module, _INIT_SETTINGS, None)
        now = self._init_settings()
        if before is None or before == now:
            rank_zero_info("MeanShiftRejection: the model was initialised by an earlier fit; its weights are kept.")
            return
        rank_zero_warn(
            f"MeanShiftRejection: the model was already initialised by an earlier fit ({_settings(before)}), so it "
            f"is not initialised again with {_settings(now)}: the weights it has now are kept. To draw new kernels, "
            "build a new model (or call `lightning_msr.functional.zero_mean_init_` on its conv weights) before `fit`.",
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

    def _check_resumed_kernels(self, trainer: pl.Trainer) -> None:
        """After a checkpoint is restored: if it was not trained with MSR its kernels are not zero-mean.

        With ``init="center"`` they are centred now (what the user asked for); otherwise a warning says so and
        how to centre them -- the checkpoint's weights are never changed without being asked.
        """
        # `trainer.ckpt_path` is set when the checkpoint is restored, after `setup`
        weights = self._weights or []
        if trainer.ckpt_path is None or self._restored_state or self._init == "none" or not weights:
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
                f"MeanShiftRejection(init='center'): the checkpoint {trainer.ckpt_path!r} was not trained with MSR "
                f"(worst mean shift {worst:.3g} in {where!r}); centred the kernels of {len(trainable)} restored "
                "weight(s)."
            )
            return
        rank_zero_warn(
            f"MeanShiftRejection: the checkpoint {trainer.ckpt_path!r} was not trained with MeanShiftRejection: its "
            f"kernels are not zero-mean (worst mean shift {worst:.3g} in {where!r}), and they are kept as they are. "
            "The gradients are projected from now on, so the kernels keep this mean for the rest of training. To "
            "centre the restored kernels, resume with `MeanShiftRejection(init='center')`.",
            category=MSRWarning,
        )

    def _warn_low_precision(self) -> None:
        """Half-precision weights (``precision='bf16-true'``/``'16-true'``) cannot hold the isocline exactly."""
        low = [w for w in self._weights or [] if w.parameter.dtype in (torch.float16, torch.bfloat16)]
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

    # ------------------------------------------------------------------ fit: hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if self._deferred or self._weights is None or _parameters_replaced(self._weights):
            self._deferred = False
            self._handle_batchnorm(pl_module)
            self._collect(pl_module)
            if self._initialize(trainer, pl_module):
                # DDP has already broadcast rank 0's weights: share the new draw the same way
                for w in self._weights or []:
                    _broadcast_(trainer, w.parameter)
        self._check_resumed_kernels(trainer)  # the checkpoint is restored by now (and identical on every rank)
        self._warn_low_precision()  # `precision='*-true'` converts the model after `setup`
        clip_by_value = bool(trainer.gradient_clip_val) and trainer.gradient_clip_algorithm == "value"
        if clip_by_value:
            rank_zero_warn(
                "Gradient clipping by value (`gradient_clip_algorithm='value'`) clips each element on its own, "
                "which breaks the zero-mean condition of the projected gradients; MeanShiftRejection re-centres "
                "the kernels after every step to restore it. Prefer `gradient_clip_algorithm='norm'`, which "
                "keeps the projection.",
                category=MSRWarning,
            )
        if trainer.ckpt_path is not None:
            # Lightning restores a checkpoint after `setup` (where the draw happened) and sets `ckpt_path` then:
            # the weights are the checkpoint's, which are never recalibrated, and a resumed run is not the start
            # whose signal the first-batch check is for (its hooks would also change how later hooks run, e.g.
            # NoiseInjection's in-place noise, and so the resumed run's last bits) -- unless the checkpoint was
            # saved while the calibration was still pooling: then it goes on from the pooled statistics, as the
            # uninterrupted run does
            self._calibration_due = self._restored_calibration is not None
            self._first_report = None if self._calibration_due else CalibrationReport()
        self._fused = self._choose_fused(trainer)
        self._project_in_backward = not self._fused and self._choose_backward(trainer)
        self._recenter_optimizers = set()
        self._optimizer_params = {}
        self._clip_params = {}
        self._gain_params = {}
        self._fused_weights_of = {}
        self._fused_sgd = set()
        self._set_aside = {}
        # after restoring a checkpoint and DDP's broadcast: the norms every rank keeps are identical
        # (a fresh draw that is calibrated has its norms taken once the calibration is complete)
        keep = self._keep_magnitude and not self._calibration_due
        self._target_norms = self._capture_norms(self._restored_norms) if keep else {}
        self._restored_norms = None
        for optimizer in trainer.optimizers:
            if self._needs_recentering(optimizer, clip_by_value):
                self._recenter_optimizers.add(id(optimizer))
            if self._fused and self._fuse_with_sgd(trainer, pl_module, optimizer):
                self._fused_sgd.add(id(optimizer))
                self._step_handles.append(optimizer.register_step_pre_hook(self._fused_step_pre))
                self._step_handles.append(optimizer.register_step_post_hook(self._fused_step_post))
            elif id(optimizer) in self._recenter_optimizers or self._keep_magnitude:
                self._step_handles.append(optimizer.register_step_post_hook(self._after_step))
        if self._project_in_backward:
            self._register_grad_hooks()

    def _choose_fused(self, trainer: pl.Trainer) -> bool:
        """Whether this fit takes the fused per-step path; says why not, once, when it was possible to ask for."""
        if self._implementation == "eager" or not self._weights:
            return False
        reason = self._why_not_fused(trainer)
        if reason is None:
            return True
        if self._implementation == "fused":
            rank_zero_warn(
                f"MeanShiftRejection(implementation='fused') runs the eager per-step path instead: {reason}.",
                category=MSRWarning,
            )
        else:
            rank_zero_info(f"MeanShiftRejection: the eager per-step path runs ({reason}).")
        return False

    def _fuse_with_sgd(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> bool:
        """Whether the fused pass can also do ``optimizer``'s update of the kernels: a plain ``torch.optim.SGD``, and
        nothing that would look at the projected gradients between backward and the step -- no other callback's or
        the LightningModule's ``on_before_optimizer_step``, no ``configure_gradient_clipping``, no manual
        optimization (whose ``training_step`` sees the gradients). Otherwise the gradients are projected and clipped
        in their own pass before the step, where every such hook sees them."""
        if type(optimizer) is not torch.optim.SGD or optimizer.defaults.get("differentiable", False):
            return False
        if optimizer.defaults.get("fused"):  # AMP leaves its gradients scaled for SGD's own fused kernel to unscale
            return False
        if not pl_module.automatic_optimization:
            return False
        if any(is_overridden(name, pl_module) for name in ("on_before_optimizer_step", "configure_gradient_clipping")):
            return False
        others = [cb for cb in trainer.callbacks if cb is not self]
        return not any(is_overridden("on_before_optimizer_step", cb, Callback) for cb in others)

    def _why_not_fused(self, trainer: pl.Trainer) -> Optional[str]:
        if self._timing == "backward":
            return "`projection_timing='backward'` asks for the projection in backward hooks"
        if trainer.gradient_clip_val:
            return (
                "the Trainer clips gradients (`gradient_clip_val`) before the optimizer step, and it must see them "
                "projected"
            )
        for w in self._weights or []:
            why = fused_unsupported(
                w.parameter, transposed=w.transposed, mode=self._mode, keep_magnitude=self._keep_magnitude
            )
            if why is not None:
                return f"the fused kernel cannot take {w.name!r}: {why}"
        if self._stem is not None and self._adaptive_clip is not None:
            why = fused_unsupported(self._stem.weight)
            if why is not None:
                return f"the fused kernel cannot take the stem's weight: {why}"
        return fused_unavailable()

    def _choose_backward(self, trainer: pl.Trainer) -> bool:
        if self._timing == "optimizer_step" or self._alpha != 1.0:
            return False
        if self._timing == "backward":
            return True
        # A DDP communication hook may compress gradients (PowerSGD), which is not linear: project after it.
        return getattr(trainer.strategy, "_ddp_comm_hook", None) is None

    def _needs_recentering(self, optimizer: torch.optim.Optimizer, clip_by_value: bool) -> bool:
        if self._recenter is not None:
            return self._recenter
        if self._alpha != 1.0:
            return False
        return clip_by_value or not isinstance(optimizer, _LINEAR_OPTIMIZERS)

    def _register_grad_hooks(self, keys: Optional[list[int]] = None) -> None:
        self._frozen = []
        for key in self._layouts if keys is None else keys:
            param, layout, _ = self._layouts[key]
            if not param.requires_grad:
                self._frozen.append(key)  # picked up in on_train_batch_start once unfrozen
                continue

            def hook(p: Tensor, layout: KernelGroups = layout) -> None:
                if p.grad is not None:
                    with torch.no_grad():
                        project_groups_(p.grad, layout, 1.0)

            self._grad_handles[key] = param.register_post_accumulate_grad_hook(hook)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # parameters unfrozen since the last batch (e.g. by BackboneFinetuning) come under projection
        if self._frozen and any(self._layouts[key][0].requires_grad for key in self._frozen):
            self._register_grad_hooks(self._frozen)
        if self._first_report is None and self._first_pass is None and self._weights:
            self._open_first_pass(trainer, pl_module)

    def _open_first_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Arm the first training forward: calibrate a fresh draw (see ``calibrate``), or only watch the signal."""
        stack = contextlib.ExitStack()
        if self._calibration_due and any(is_sharded(w.parameter) for w in self._weights or []):
            self._calibration_due = False
            rank_zero_info(
                "MeanShiftRejection: calibration is not supported on sharded (FSDP2) weights yet; the plain "
                "zero-mean draw is kept, and the first batch is only watched."
            )
        if self._calibration_due:
            reduce = None
            if trainer.world_size > 1:
                strategy = trainer.strategy

                def reduce(t: Tensor) -> Tensor:
                    return strategy.reduce(t, reduce_op="sum")

            self._first_report = stack.enter_context(
                calibrate(
                    pl_module,
                    residual_scale=self._residual_scale,
                    convs=[m for m in self._calibrated_convs() if m.weight.requires_grad],  # frozen: kept
                    exclude=self._exclude,
                    reduce=reduce,
                    samples=self._calibration_samples,
                    state=self._restored_calibration,
                )
            )
            self._restored_calibration = None
        else:
            self._first_report = stack.enter_context(watch_signal(pl_module))
        self._first_pass = stack

    def _calibrated_convs(self) -> list[nn.Module]:
        """The convs MSR acts on, and the free stem."""
        convs = [w.module for w in self._weights or []]
        return convs if self._stem is None else [*convs, self._stem]

    def _close_first_pass(self, trainer: pl.Trainer) -> None:
        """After the first forward: remove its hooks, share rank 0's result, say what happened or went wrong."""
        if self._first_pass is None:
            return
        report = self._first_report
        if self._calibration_due and report is not None and not report.complete:
            return  # the statistics pool over the next batches too (`calibration_samples`)
        self._first_pass.close()
        self._first_pass = None
        if self._calibration_due:
            self._calibration_due = False
            model = self._model_ref() if self._model_ref is not None else None
            if model is not None and report is not None and report.calibrated:
                changed = set(report.calibrated)
                for name, module in model.named_modules():
                    if name in changed:
                        for param in module.parameters(recurse=False):
                            _broadcast_(trainer, param)
            if self._keep_magnitude:
                self._target_norms = self._capture_norms()  # the calibrated filter norms are the ones to keep
                self._fused_weights_of = {}  # they hold the old norms
            if report is not None:
                kept = f", {len(report.kept)} conv(s) no normalisation follows kept as drawn" if report.kept else ""
                rank_zero_info(
                    f"MeanShiftRejection: calibrated {len(report.calibrated)} layer(s) on the first "
                    f"{report.passes} training batch(es), {report.samples} samples ({len(report.residual)} residual "
                    f"branch end(s) at scale {self._residual_scale:g}{kept})."
                )
        if report is not None:
            self._warn_signal(report)

    def _warn_signal(self, report: CalibrationReport) -> None:
        if report.failed:
            name, why = next(iter(report.failed.items()))
            rank_zero_warn(
                f"MeanShiftRejection could not calibrate {len(report.failed)} layer(s) on the first training batch, "
                f"first {name!r}: {why}. The layers after it get no usable signal at initialisation. Check the "
                "input size (e.g. AutomaticGainControl on 1x1 maps removes the whole signal), or leave the layer "
                "out with `exclude`.",
                category=MSRWarning,
            )
            return
        problem = report.signal_problem()
        if problem is None:
            return
        name, value, how = problem
        ref = report.input_rms or 1.0
        advice = (
            "Let MeanShiftRejection set the gains from the first batch (`calibrate=True`, the default for "
            "`init='zero_mean'`), or pass `init='zero_mean'` for weights it may redraw."
            if not self._calibrate or self._init != "zero_mean"
            else "Lower the learning rate or check the layer; a smaller `residual_scale` (0: SkipInit) keeps "
            "residual sums bounded."
        )
        rank_zero_warn(
            f"MeanShiftRejection: at the first training batch the signal {how} at {name!r} (RMS {value:.3g}, "
            f"{value / ref:.3g}x the input's {ref:.3g}). "
            + (
                "Training will barely move the weights before it. "
                if how == "vanishes"
                else "The loss and gradients will be huge or non-finite. "
            )
            + advice,
            category=MSRWarning,
        )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._first_pass is not None:
            self._close_first_pass(trainer)
        if self._fused:
            if id(optimizer) not in self._fused_sgd:  # SGD's is done inside its step, with the update
                project_and_clip_(self._fused_weights(optimizer))  # the projection and clipping in one pass
                self._clip_gains(optimizer)
            return
        if not self._project_in_backward and self._alpha != 0.0:
            with torch.no_grad():
                for param, layout in self._params_of(optimizer):
                    if param.grad is not None:
                        project_groups_(param.grad, layout, self._alpha)
        if self._adaptive_clip is not None:
            adaptive_clip_(self._clipped_of(optimizer), self._adaptive_clip)
            self._clip_gains(optimizer)

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
            kept = self._target_norms.get(id(param))
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
            if id(param) not in self._layouts:
                weights.append(FusedWeight.of(param, alpha=0.0, clip=clip))
        self._fused_weights_of[id(optimizer)] = (key, weights)
        return weights

    def _fused_step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Optional[tuple]:
        """Before ``SGD.step``: update the kernels in the fused pass once their gradients are final -- inside the
        closure, after it has run backward (Lightning's automatic optimization steps with a closure), or now (a
        step without a closure, e.g. AMP's ``GradScaler.step``, which runs the closure first)."""
        # `args` are those of the wrapped `step`, starting with the optimizer itself
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if closure is None:
            self._fused_update(optimizer)
            return None

        def closure_then_update() -> Any:
            loss = closure()
            self._fused_update(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_update}
        return (args[0], closure_then_update, *args[2:]), kwargs

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
        ``beta`` -- clipped relative to ``max(|b|, 1)``, 1 being the calibrated signal's standard deviation.
        Cached like :meth:`_params_of`."""
        groups = optimizer.param_groups
        cached = self._gain_params.get(id(optimizer))
        if cached is not None and cached[0] == len(groups):
            return cached[1]
        model = self._model_ref() if self._model_ref is not None else None
        modules = list(model.named_modules()) if model is not None else []
        scales: set[int] = set()
        offsets: set[int] = set()
        for module_name, module in modules:
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
        self._gain_params[id(optimizer)] = (len(groups), found)
        return found

    def _clipped_of(self, optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
        """The parameters ``optimizer`` steps that adaptive clipping acts on: the filters of the convs MSR acts on
        and of the stem -- not their 1-D scales and biases, and not the Linear head. Cached like
        :meth:`_params_of`."""
        groups = optimizer.param_groups
        cached = self._clip_params.get(id(optimizer))
        if cached is not None and cached[0] == len(groups):
            return cached[1]
        wanted = {id(m.weight) for m in self._calibrated_convs()}
        params = [p for group in groups for p in group["params"] if id(p) in wanted]
        self._clip_params[id(optimizer)] = (len(groups), params)
        return params

    def _params_of(self, optimizer: torch.optim.Optimizer) -> list[tuple[nn.Parameter, KernelGroups]]:
        """The kernels ``optimizer`` steps, with their groups: built once, rebuilt only when a param group is added
        (e.g. by ``BackboneFinetuning``), so a step does not walk every parameter of the model."""
        groups = optimizer.param_groups
        cached = self._optimizer_params.get(id(optimizer))
        if cached is not None and cached[0] == len(groups):
            return cached[1]
        found = [
            (param, self._layouts[id(param)][1])
            for group in groups
            for param in group["params"]
            if id(param) in self._layouts
        ]
        self._optimizer_params[id(optimizer)] = (len(groups), found)
        return found

    def _capture_norms(
        self, restored: Optional[dict[str, Tensor]] = None
    ) -> dict[int, tuple[Tensor, Optional[Tensor], bool, int]]:
        """The filter norms to keep: measured now, or for a resumed fit the ones the checkpoint's run kept (the
        weights' own norms equal those only to float32 rounding, and a resumed run must repeat the bits)."""
        captured = {}
        with torch.no_grad():
            for w in self._weights or []:
                target = filter_norms(w.parameter, self._mode, w.transposed, w.groups, dtype=torch.float32)
                kept = (restored or {}).get(w.name)
                # a sharded weight's norms are those of this rank's rows, and the checkpoint holds rank 0's
                if kept is not None and kept.shape == target.shape and not is_sharded(w.parameter):
                    target = kept.to(device=target.device, dtype=target.dtype)
                # a filter that is all zero now has no direction to keep: it is left free (ratio 1)
                free = target == 0
                captured[id(w.parameter)] = (target, free if bool(free.any()) else None, w.transposed, w.groups)
        return captured

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._fused:  # re-centring and rescaling in one pass over each weight
            recenter_and_rescale_([w for w in self._fused_weights(optimizer) if w.parameter.grad is not None])
            return
        recenter = id(optimizer) in self._recenter_optimizers
        with torch.no_grad():
            for param, layout in self._params_of(optimizer):
                if param.grad is None:  # only what this step updated; frozen kernels are left alone
                    continue
                if recenter:
                    project_groups_(param.data, layout, 1.0)
                kept = self._target_norms.get(id(param))
                if kept is not None:
                    target, free, transposed, groups = kept
                    norms = filter_norms(param.data, self._mode, transposed, groups, dtype=torch.float32)
                    ratio = target / norms.clamp(min=_TINY)
                    if free is not None:
                        ratio.masked_fill_(free, 1.0)
                    local_shard(param.data).mul_(ratio.to(param.dtype))

    # ------------------------------------------------------------------ logging
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._first_pass is not None:
            self._close_first_pass(trainer)
        if not self._layouts or getattr(trainer, "barebones", False):  # barebones Trainers disable `self.log`
            return
        connector = getattr(trainer, "_logger_connector", None)
        if connector is not None and not connector.should_update_logs:
            return  # computed on logging steps only
        pl_module.log("msr/mean_shift", self.current_mean_shift(), on_step=True, on_epoch=False)

    def current_mean_shift(self) -> Tensor:
        """The largest :func:`~lightning_msr.functional.mean_shift` over the weights acted on (0 if none)."""
        shifts = [mean_shift(w.parameter, mode=self._mode, **w.layout_kwargs()) for w in self._weights or []]
        return torch.stack(shifts).max() if shifts else torch.zeros(())

    # ------------------------------------------------------------------ teardown and checkpoints
    def _remove_hooks(self) -> None:
        for aside in self._set_aside.values():  # a step that raised between the fused pass and SGD's loop
            for param, grad in aside:
                param.grad = grad
        self._set_aside = {}
        if self._first_pass is not None:
            self._first_pass.close()
            self._first_pass = None
        for handle in list(self._grad_handles.values()) + self._step_handles:
            handle.remove()
        self._grad_handles = {}
        self._step_handles = []
        self._frozen = []

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._project_in_backward = False
        self._fused = False

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"initialized": self._initialized, "alpha": self._alpha, "mode": self._mode}
        report = self._first_report
        if self._calibration_due and self._first_pass is not None and report is not None and not report.complete:
            state["calibration"] = report.state_dict()  # a resumed run goes on pooling where this one is
        if self._keep_magnitude and self._target_norms:
            names = {id(w.parameter): w.name for w in self._weights or []}
            kept = self._target_norms.items()
            state["kept_norms"] = {names[key]: norms.detach().cpu().clone() for key, (norms, *_) in kept}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_state = True
        self._restored_norms = state_dict.get("kept_norms")
        self._restored_calibration = state_dict.get("calibration") if self._calibrate else None
        self._initialized = bool(state_dict.get("initialized", self._initialized))
        self._calibration_due = False  # the weights come from a checkpoint
        model = self._model_ref() if self._model_ref is not None else None
        if model is not None and self._initialized:
            object.__setattr__(model, _INIT_FLAG, True)
