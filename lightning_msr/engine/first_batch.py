"""The first-batch work of Mean Shift Rejection: calibrate a fresh draw, or watch the signal once.

:class:`FirstBatch` arms the first training forward passes with :func:`lightning_msr.calibration.calibrate`
(after a fresh zero-mean draw: the gains are set so that every layer starts with BatchNorm's signal, pooled over
the first batches until ``calibration_samples`` samples) or :func:`~lightning_msr.calibration.watch_signal`
(otherwise: a signal that vanishes or explodes on its way to the head is reported). It is opened before a training
forward and closed before the optimizer step; the Lightning callback does both from its batch hooks,
:class:`~lightning_msr.MSREngine` from a forward pre-hook of the model and a step pre-hook of the optimizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Callable, Optional

from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_msr._sharding import is_sharded
from lightning_msr.calibration import CalibrationReport, calibrate, watch_signal
from lightning_msr.exceptions import MSRWarning

__all__ = ["FirstBatch"]


class FirstBatch:
    """The first training batches of one run: calibrating (``due``) or only watching the signal.

    Args:
        model: the model (its parameters are changed in place by the calibration).
        convs: the convs to calibrate (those MSR acts on and the free stem).
        residual_scale: as ``MeanShiftRejection``'s.
        samples: ``MeanShiftRejection``'s ``calibration_samples``.
        exclude: ``MeanShiftRejection``'s ``exclude``.
        advice_calibrate: whether the settings allow a calibration at all (for the advice of a warning).
        due: calibrate (a fresh draw) rather than watch.
        state: the pooled statistics of a calibration that a checkpoint was taken in, to go on from.
        done: nothing left to do (a resumed run whose calibration was complete).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_msr.engine.first_batch import FirstBatch
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        >>> first = FirstBatch(model, [model[0], model[2]], residual_scale=0.3, samples=2, exclude=(),
        ...                    advice_calibrate=True, due=True)
        >>> first.start()
        >>> _ = model(torch.randn(2, 1, 8, 8))
        >>> first.finish(broadcast=lambda tensor: None), first.report.complete
        (True, True)
    """

    def __init__(
        self,
        model: nn.Module,
        convs: Sequence[nn.Module],
        *,
        residual_scale: float,
        samples: int,
        exclude: Sequence[str],
        advice_calibrate: bool,
        due: bool,
        state: Optional[dict[str, Any]] = None,
        done: bool = False,
    ) -> None:
        self._model = model
        self._convs = list(convs)
        self._residual_scale = residual_scale
        self._samples = samples
        self._exclude = tuple(exclude)
        self._advice_calibrate = advice_calibrate
        self.due = due
        self._state = state
        self._stack: Optional[contextlib.ExitStack] = None
        self.report: Optional[CalibrationReport] = CalibrationReport() if done else None

    @property
    def pending(self) -> bool:
        """Not opened yet: the next training forward is the first."""
        return self.report is None and self._stack is None

    @property
    def open(self) -> bool:
        return self._stack is not None

    def start(self, reduce: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        """Arm the next training forward: calibrate (``due``), or only watch the signal. ``reduce`` sums a tensor
        over processes (``None``: one process)."""
        if not self.pending:
            return
        stack = contextlib.ExitStack()
        if self.due and any(is_sharded(m.weight) for m in self._convs):
            self.due = False
            rank_zero_info(
                "MeanShiftRejection: calibration is not supported on sharded (FSDP2) weights yet; the plain "
                "zero-mean draw is kept, and the first batch is only watched."
            )
        if self.due:
            self.report = stack.enter_context(
                calibrate(
                    self._model,
                    residual_scale=self._residual_scale,
                    convs=[m for m in self._convs if m.weight.requires_grad],  # frozen: kept
                    exclude=self._exclude,
                    reduce=reduce,
                    samples=self._samples,
                    state=self._state,
                )
            )
            self._state = None
        else:
            self.report = stack.enter_context(watch_signal(self._model))
        self._stack = stack

    def finish(self, broadcast: Callable[[Tensor], None]) -> bool:
        """After a training forward: unless the calibration pools over more batches, remove its hooks, share rank
        0's result (``broadcast`` copies rank 0's values into a tensor) and say what happened or went wrong.
        Returns whether a calibration completed now (its norms are then the ones ``keep_magnitude`` keeps)."""
        if self._stack is None:
            return False
        report = self.report
        if self.due and report is not None and not report.complete:
            return False  # the statistics pool over the next batches too (`calibration_samples`)
        self._stack.close()
        self._stack = None
        calibrated = False
        if self.due:
            self.due = False
            calibrated = True
            if report is not None and report.calibrated:
                changed = set(report.calibrated)
                for name, module in self._model.named_modules():
                    if name in changed:
                        for param in module.parameters(recurse=False):
                            broadcast(param)
            if report is not None:
                kept = f", {len(report.kept)} conv(s) no normalisation follows kept as drawn" if report.kept else ""
                rank_zero_info(
                    f"MeanShiftRejection: calibrated {len(report.calibrated)} layer(s) on the first "
                    f"{report.passes} training batch(es), {report.samples} samples ({len(report.residual)} residual "
                    f"branch end(s) at scale {self._residual_scale:g}{kept})."
                )
        if report is not None:
            self._warn_signal(report)
        return calibrated

    def close(self) -> None:
        """Remove the hooks without finishing (teardown, detach); a calibration still pooling keeps its statistics
        for :meth:`state_dict` (a checkpoint saved after ``fit`` ended midway resumes it)."""
        if self._stack is not None:
            report = self.report
            if self.due and report is not None and not report.complete:
                self._state = report.state_dict()
            self._stack.close()
            self._stack = None

    def state_dict(self) -> Optional[dict[str, Any]]:
        """The pooled statistics while a calibration is still pooling (a resumed run goes on from them), else
        ``None``."""
        report = self.report
        if self.due and self._stack is not None and report is not None and not report.complete:
            return report.state_dict()
        return self._state if self.due else None

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
            if not self._advice_calibrate
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
