"""The settings of Mean Shift Rejection, defined once for the callback and the engine.

:class:`MSRSettings` holds and checks every argument of :class:`~lightning_msr.MeanShiftRejection` (the Lightning
callback) and :class:`~lightning_msr.MSREngine` (the same work for Lightning Fabric and plain PyTorch loops): both
classes take exactly these arguments, with these defaults and meanings, because both inherit them from here.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch

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
)
from lightning_msr.exceptions import MSRConfigurationError
from lightning_msr.functional import MODES

__all__ = ["MSRSettings"]

INITS = ("zero_mean", "center", "none")
BATCHNORM = ("error", "warn", "replace", "affine")
TIMINGS = ("auto", "backward", "optimizer_step")
IMPLEMENTATIONS = ("auto", "fused", "grouped", "eager")
# Optimizers whose update is linear in the gradient (given their buffers): a zero-mean gradient gives a
# zero-mean update, so the weights stay on the isocline with no re-centring.
LINEAR_OPTIMIZERS: tuple[type, ...] = (torch.optim.SGD, torch.optim.ASGD)


class MSRSettings:
    r"""The arguments of Mean Shift Rejection, checked once: what :class:`~lightning_msr.MeanShiftRejection` and
    :class:`~lightning_msr.MSREngine` are configured with.

    Both classes inherit these arguments (the callback takes exactly these; the engine takes the model and its
    optimizers first), so a setting means the same thing with the Trainer, with Fabric and in a plain loop.
    Every argument is checked here, and a bad value raises with the argument's name and what is allowed.

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
        mode: ``"filter"`` (default: the mean over each whole output filter, Gradient Centralization's group)
            or ``"kernel"`` (the paper's mean over each ``(output, input)`` kernel). Both reject a common-mode
            shift of the filter's whole input; ``"kernel"`` also blocks every input channel's local mean, which
            costs capacity: on Fashion-MNIST ``"filter"`` measured 0.7-1.6 points better at batch 128 (a ResNet-8
            at convergence 91.2 against 90.4, BatchNorm 92.0) and level at batch 2-8, at a best learning rate
            about BatchNorm's, half the kernel-wise one's; ``"kernel"`` tolerates 2-4x higher learning rates
            (`docs/concepts/settings.md`, "The zero-mean constraint itself"). A ``ConvTranspose`` keeps its
            kernels zero-mean in both modes.
        recenter: re-centre the kernels after each optimizer step. ``None`` (default) does it for optimizers
            whose update is not linear in the gradient, and when gradients are clipped by value, if
            ``alpha == 1``; ``True``/``False`` force it on or off for every optimizer.
        keep_magnitude: after every optimizer step, rescale each output filter that the step updated back to its
            norm at fit start (the weight stays zero-mean), so steps rotate the kernels instead of growing them.
            Filters that are all zero at fit start (zero-initialised convs with ``init="none"``) have no norm to
            keep and train freely. With ``calibrate=True`` the norms kept are the calibrated ones.
        scale_invariant: train every kernel, and the free stem (not centred), as a weight-normalised filter
            (Salimans & Kingma 2016) -- the spherical motion a filter has under BatchNorm (Wan et al. 2021),
            without a minibatch statistic. The
            forward pass sees each output filter at its norm at fit start (as with ``keep_magnitude``; with
            ``calibrate=True`` the calibrated one); the optimizer steps a virtual weight of a norm of its own, which
            weight decay shrinks and the gradient grows, with the gradient of a scale-invariant filter: its radial
            part removed and the rest scaled by ``kept norm / virtual norm``
            (:func:`~lightning_msr.functional.to_virtual_` in the optimizer's step pre-hook, after any gradient
            clipping; :func:`~lightning_msr.functional.from_virtual_` after the step). The effective learning rate
            of the filter directions so rises as weight decay shrinks the virtual norms, as under BatchNorm.
            Off by default: on Fashion-MNIST at batch 128 it closed two thirds of a short run's gap to BatchNorm
            on a ResNet-8 (one block per stage; all of it came from the stem: the kernels alone moved nothing) but
            not on a ResNet-20 nor at convergence (10 epochs), and it was behind the defaults at batch 2-8 (figures
            in `docs/concepts/settings.md`, "Scale-invariant filters"). The fused path does not take it; a
            ``ConvTranspose`` kernel's filters are its output channels, as for ``keep_magnitude``.
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
            steps and 3.4 better after 237. ``1`` (BatchNorm's start) gained 0.6-1.0 points in short runs of
            Fashion-MNIST ResNets at batch 128, each at its best learning rate, but was level at convergence,
            diverged from 4x its best learning rate, and blew efficientnet_b2 up at batch 2 at BatchNorm's learning
            rate (`docs/concepts/settings.md`): an option for a shallow ResNet, not the default.
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
            ``"grouped"`` runs the same math as PyTorch operations on all the kernels at once
            (:class:`~lightning_msr.functional.KernelBank`: every gradient the step projects or clips copied into one
            buffer, three operations per kind of kernel for the projection and about fifteen for all the clipping --
            23 operator calls a step on a ResNet, 19 on MobileNetV2 -- so the number of kernel launches on a GPU does
            not grow with depth; the projection at the step). ``"eager"`` runs it weight by weight, the projection in
            backward hooks where exact. All three give the same weights within float32 rounding. ``"auto"``
            (default) takes the fused path where it can -- float32 CPU weights, a C compiler, no Trainer gradient
            clipping (which must see projected gradients), no ``projection_timing="backward"`` -- and otherwise the
            grouped one for weights off the CPU (GPUs) and the eager one on the CPU (where the grouped one measured
            slower: copies and segment reductions cost more than the launches they save), with one info message
            saying why; ``"fused"`` warns instead when it cannot be taken.


    Raises:
        MSRConfigurationError: for an argument out of range, of the wrong type, or not one of the allowed values.

    Example::

        >>> from lightning_msr import MSRSettings
        >>> MSRSettings(alpha=0.5).alpha
        0.5
        >>> MSRSettings(init="random")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        lightning_msr.exceptions.MSRConfigurationError: Expected `init` to be one of 'zero_mean', ..., but got 'random'.
    """

    def __init__(
        self,
        alpha: UnitInterval = 1.0,
        init: Literal["zero_mean", "center", "none"] = "zero_mean",
        init_magnitude: PositiveFloat = 1.0,
        include_linear: bool = False,
        include_stem: bool = False,
        batchnorm: Literal["error", "warn", "replace", "affine"] = "warn",
        mode: Literal["kernel", "filter"] = "filter",
        recenter: Optional[bool] = None,
        keep_magnitude: bool = False,
        scale_invariant: bool = False,
        projection_timing: Literal["auto", "backward", "optimizer_step"] = "auto",
        exclude: Optional[list[str]] = None,
        strict: bool = False,
        seed: Optional[int] = None,
        calibrate: bool = True,
        residual_scale: float = 0.3,
        adaptive_clip: Optional[float] = 0.1,
        implementation: Literal["auto", "fused", "grouped", "eager"] = "auto",
        calibration_samples: int = 64,
    ) -> None:
        self._alpha = _check_in_range("alpha", alpha, 0.0, 1.0)
        self._init = _check_choice("init", init, INITS)
        self._init_magnitude = _check_positive("init_magnitude", init_magnitude)
        self._include_linear = _check_bool("include_linear", include_linear)
        self._include_stem = _check_bool("include_stem", include_stem)
        self._batchnorm = _check_choice("batchnorm", batchnorm, BATCHNORM)
        self._mode = _check_choice("mode", mode, MODES)
        self._recenter = _check_bool("recenter", recenter, allow_none=True)
        self._keep_magnitude = _check_bool("keep_magnitude", keep_magnitude)
        self._scale_invariant = _check_bool("scale_invariant", scale_invariant)
        self._timing = _check_choice("projection_timing", projection_timing, TIMINGS)
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
        self._implementation = _check_choice("implementation", implementation, IMPLEMENTATIONS)
        self._calibration_samples = _check_positive_int("calibration_samples", calibration_samples)

    @property
    def alpha(self) -> float:
        """Fraction of the kernel mean removed from each gradient."""
        return self._alpha

    def settings(self) -> dict[str, Any]:
        """Every argument by name, as given to ``__init__`` (after checking): ``MSREngine(model, **s.settings())``
        is configured like ``s``."""
        return {
            "alpha": self._alpha,
            "init": self._init,
            "init_magnitude": self._init_magnitude,
            "include_linear": self._include_linear,
            "include_stem": self._include_stem,
            "batchnorm": self._batchnorm,
            "mode": self._mode,
            "recenter": self._recenter,
            "keep_magnitude": self._keep_magnitude,
            "scale_invariant": self._scale_invariant,
            "projection_timing": self._timing,
            "exclude": list(self._exclude) or None,
            "strict": self._strict,
            "seed": self._seed,
            "calibrate": self._calibrate,
            "residual_scale": self._residual_scale,
            "adaptive_clip": self._adaptive_clip,
            "implementation": self._implementation,
            "calibration_samples": self._calibration_samples,
        }

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.settings().items() if k not in ("exclude", "strict", "seed")}
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"
