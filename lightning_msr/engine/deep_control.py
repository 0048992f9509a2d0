"""Deep Control's surgery on any model: every BatchNorm becomes an automatic gain control.

Ruff, "Deep Control -- an automatic gain control for deep neural networks" (arXiv:1706.03907).
:class:`DeepControlEngine` does the surgery (:func:`lightning_msr.replace_batchnorm` with ``"agc_fold"`` or
``"agc"``) on a model and updates its optimizers' param groups, for Lightning Fabric and plain loops; the
:class:`~lightning_msr.DeepControl` callback runs the same at ``setup("fit")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_msr._checks import UnitInterval, _check_beta_init, _check_bool, _check_names
from lightning_msr.exceptions import MSRConfigurationError, MSRWarning
from lightning_msr.nn.gain_control import AutomaticGainControl
from lightning_msr.surgery import Replacements, replace_batchnorm

__all__ = ["DeepControlEngine", "DeepControlSettings"]


class DeepControlSettings:
    r"""The arguments of Deep Control's surgery, checked once, for :class:`~lightning_msr.DeepControl` and
    :class:`DeepControlEngine`.

    Args:
        beta_init: initial value of every ``beta``, in ``[0, 1]`` (the fraction of the map mean removed; 1
            removes it all, 0 starts as a plain per-channel affine layer). ``beta`` is learnt freely afterwards.
        exclude: module-name patterns (``fnmatch`` syntax, e.g. ``"head.*"``) of BatchNorm layers to keep.
            Every pattern must match a module of the model.
        fold_gain: fold each gain into the conv that feeds its gain control, where there is one.

    Raises:
        MSRConfigurationError: if ``beta_init`` is not in ``[0, 1]``, ``fold_gain`` not a bool, or ``exclude``
            is not a list of patterns.

    Example::

        >>> from lightning_msr.engine.deep_control import DeepControlSettings
        >>> DeepControlSettings(beta_init=0.9)
        DeepControlSettings(beta_init=0.9, exclude=None, fold_gain=True)
    """

    def __init__(
        self, beta_init: UnitInterval = 1.0, exclude: Optional[Sequence[str]] = None, fold_gain: bool = True
    ) -> None:
        self._beta_init = _check_beta_init(beta_init)
        self._exclude = _check_names("exclude", exclude)
        self._fold_gain = _check_bool("fold_gain", fold_gain)
        self._replacement = "agc_fold" if self._fold_gain else "agc"

    def settings(self) -> dict[str, Any]:
        """Every argument by name (after checking)."""
        return {"beta_init": self._beta_init, "exclude": list(self._exclude) or None, "fold_gain": self._fold_gain}

    def __repr__(self) -> str:
        exclude = list(self._exclude) if self._exclude else None
        return f"{type(self).__name__}(beta_init={self._beta_init}, exclude={exclude}, fold_gain={self._fold_gain})"


class DeepControlEngine(DeepControlSettings):
    r"""Replace every BatchNorm of ``model`` with Deep Control's gain control now, and update ``optimizers``.

    Every ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` becomes an :class:`~lightning_msr.nn.AutomaticGainControl`
    (``y = gain * (x - beta * mean_spatial(x)) + bias``, per sample), with the gain folded into the conv feeding
    it (``fold_gain=True``, ``replace_batchnorm(..., "agc_fold")``); the optimizers' param groups get the new
    parameters in the old ones' places. Do it before wrapping the model (``fabric.setup``, DDP). A replaced
    layer that turns out to get ``(N, C)`` features raises at its first forward with an error that names it.

    Args:
        model: the model, changed in place.
        optimizers: optimizer(s) built on ``model`` before the surgery (optional).
        **settings: the arguments of :class:`DeepControlSettings`, exactly those of the ``DeepControl``
            callback.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_msr.engine.deep_control import DeepControlEngine
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> DeepControlEngine(model, optimizer).replaced
        ['1']
        >>> sorted(n for n, p in model.named_parameters())
        ['0.bias', '0.scale', '0.weight', '1.beta', '1.bias']
        >>> sum(len(g["params"]) for g in optimizer.param_groups)
        5
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer], None] = None,
        **settings: Any,
    ) -> None:
        super().__init__(**settings)
        if isinstance(optimizers, torch.optim.Optimizer):
            optimizers = [optimizers]
        self._input_checks: list[RemovableHandle] = []
        # replace_batchnorm refuses an `exclude` pattern that matches no module
        self.replacements = replace_batchnorm(
            model, self._replacement, beta_init=self._beta_init, exclude=self._exclude, optimizers=optimizers
        )
        self._guard_feature_inputs(self.replacements)

    @property
    def replaced(self) -> list[str]:
        """Qualified names of the BatchNorm layers replaced."""
        return list(self.replacements)

    @property
    def has_gain_controls(self) -> bool:
        """Whether the model has gain controls (replaced now or before)."""
        return any(isinstance(m, AutomaticGainControl) for m in self.replacements.module.modules())

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

    def detach(self) -> None:
        """Remove the first-input checks that have not run yet (the surgery stays)."""
        for handle in self._input_checks:
            handle.remove()
        self._input_checks = []

    def state_dict(self) -> dict[str, Any]:
        """The settings and the layers replaced, to check a resumed run against."""
        return {"beta_init": self._beta_init, "replaced": self.replaced}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when the checkpoint was saved after replacing other layers than this run did."""
        check_replaced(list(state_dict.get("replaced", [])), self.replaced)


def check_replaced(saved: list[str], replaced: list[str]) -> None:
    """Warn when a checkpoint was saved after replacing other BatchNorm layers (``saved``) than ``replaced``.

    Example::

        >>> from lightning_msr.engine.deep_control import check_replaced
        >>> check_replaced(["1", "4"], ["1", "4"])  # the same layers: nothing to say
    """
    if saved and replaced and saved != replaced:
        rank_zero_warn(
            f"DeepControl: the checkpoint was saved after replacing {len(saved)} BatchNorm layer(s), but "
            f"{len(replaced)} were replaced in this run (first differences: "
            f"{sorted(set(saved) ^ set(replaced))[:5]}). Is it the same model?",
            category=MSRWarning,
        )
