"""Small helpers shared by the package's modules.

Argument checks with messages that name the argument, the value and what is allowed; module names shown in
messages; what the callbacks need to know about the Trainer's launcher.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn

from lightning_msr.exceptions import MSRConfigurationError

# Constructor annotations that LightningCLI checks while parsing, so an out-of-range flag such as
# `--trainer.callbacks.alpha=2` is a usage error naming the key (exit 2), not a traceback from `__init__`.
# jsonargparse is an optional extra (`lightning_msr[cli]`): without it these are plain `float`, and to a type
# checker they always are. The checks below still run in `__init__` for every caller.
if TYPE_CHECKING:
    UnitInterval = float
    PositiveFloat = float
    NonNegativeFloat = float
else:
    try:
        from jsonargparse.typing import ClosedUnitInterval as UnitInterval
        from jsonargparse.typing import NonNegativeFloat, PositiveFloat
    except ImportError:  # pragma: no cover - the `cli` extra is not installed
        UnitInterval = PositiveFloat = NonNegativeFloat = float


def _real(value: Any) -> Optional[float]:
    """``value`` as a ``float`` if it is a real number, else ``None``.

    Real numbers are Python ints and floats, ``fractions.Fraction``, ``decimal.Decimal``, numpy scalars and
    0-dim tensors of a real dtype (what a config file, a numpy computation or ``tensor.mean()`` hands
    over). ``bool`` (also ``numpy.bool_`` and bool tensors) is refused: ``alpha=True`` is a mistake, not 1.0.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value.item())
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    if isinstance(value, numbers.Real) or type(value).__name__ == "Decimal":
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            return None
    return None


def _integer(value: Any) -> Optional[int]:
    """``value`` as an ``int`` if it is an integer (Python, numpy or a 0-dim integer tensor), else ``None``."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            return None
        return int(value.item())
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def _check_in_range(name: str, value: Any, low: float, high: float, *, hint: str = "") -> float:
    """Check ``low <= value <= high`` for a real number and return it as ``float``."""
    number = _real(value)
    if number is None:
        raise MSRConfigurationError(
            f"Expected `{name}` to be a number in [{low:g}, {high:g}], but got {value!r} of type "
            f"{type(value).__name__}.{hint}"
        )
    if not low <= number <= high:  # also rejects NaN
        raise MSRConfigurationError(f"Expected `{name}` to be in [{low:g}, {high:g}], but got {value!r}.{hint}")
    return number


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """Check that ``value`` is a finite positive (or non-negative) number."""
    kind = "non-negative" if allow_zero else "positive"
    number = _real(value)
    if number is None:
        raise MSRConfigurationError(
            f"Expected `{name}` to be a {kind} number, but got {value!r} of type {type(value).__name__}."
        )
    ok = number >= 0 if allow_zero else number > 0
    if not ok or not math.isfinite(number):
        raise MSRConfigurationError(f"Expected `{name}` to be a finite {kind} number, but got {number!r}.")
    return number


def _check_finite(name: str, value: Any) -> float:
    """Check that ``value`` is a finite real number and return it as ``float``."""
    number = _real(value)
    if number is None or not math.isfinite(number):
        raise MSRConfigurationError(f"Expected `{name}` to be a finite number, but got {value!r}.")
    return number


def _check_beta_init(value: Any) -> float:
    """Deep Control's initial ``beta``: the fraction of each map's mean removed, documented in ``[0, 1]``."""
    return _check_in_range(
        "beta_init",
        value,
        0.0,
        1.0,
        hint=" `beta` is the fraction of each map's spatial mean that is subtracted: 1 removes it all, 0 none; "
        "beyond 1 the common mode is inverted, below 0 it is amplified.",
    )


def _check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Check that ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise MSRConfigurationError(f"Expected `{name}` to be one of {allowed}, but got {value!r}.")
    return value


def _check_bool(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """Check that ``value`` is a bool (or None when allowed)."""
    if value is None and allow_none:
        return value
    if not isinstance(value, bool):
        allowed = "True, False or None" if allow_none else "True or False"
        raise MSRConfigurationError(f"Expected `{name}` to be {allowed}, but got {value!r}.")
    return value


def _check_seed(name: str, value: Any) -> Optional[int]:
    """Check that ``value`` is an integer seed (any integer type) or None, and return it as ``int``."""
    if value is None:
        return None
    number = _integer(value)
    if number is None:
        raise MSRConfigurationError(f"Expected `{name}` to be an integer or None, but got {value!r}.")
    return number


def _check_positive_int(name: str, value: Any) -> int:
    """Check that ``value`` is an integer >= 1 (any integer type), and return it as ``int``."""
    number = _integer(value)
    if number is None or number < 1:
        raise MSRConfigurationError(f"Expected `{name}` to be an integer >= 1, but got {value!r}.")
    return number


def _check_names(name: str, value: Any) -> tuple[str, ...]:
    """Check a list of module-name patterns and return it as a tuple."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    try:
        items = tuple(value)
    except TypeError:
        items = None
    if items is None or not all(isinstance(v, str) and v for v in items):
        raise MSRConfigurationError(
            f"Expected `{name}` to be a list of module-name patterns (non-empty strings, fnmatch syntax), "
            f"but got {value!r}."
        )
    return items


def _examples(names: Sequence[str], limit: int = 4) -> str:
    """``['a', 'b', ...]``: a few module names (the unnamed root left out) for an error message."""
    named = [n for n in names if n]
    return "[" + ", ".join(repr(n) for n in named[:limit]) + (", ...]" if len(named) > limit else "]")


def _shown(names: Sequence[str], limit: int = 5) -> str:
    """``'a', 'b', ...``: the first ``limit`` module names for an error or warning (the root shown as <root>)."""
    return ", ".join(repr(n or "<root>") for n in names[:limit]) + (", ..." if len(names) > limit else "")


def _check_patterns_match(name: str, patterns: Sequence[str], model: nn.Module) -> None:
    """Refuse a pattern of ``patterns`` (the argument ``name``) that matches no module name of ``model``.

    A pattern that matches nothing is almost always a typo (``"features.O"`` for ``"features.0"``); accepting
    it would silently act on the layer the user meant to leave out.
    """
    if not patterns:
        return
    all_names = [module_name for module_name, _ in model.named_modules(remove_duplicate=False)]
    for pattern in patterns:
        if not any(fnmatchcase(module_name, pattern) for module_name in all_names):
            raise MSRConfigurationError(
                f"The `{name}` pattern {pattern!r} matches no module of {type(model).__name__}. Module names look "
                f"like {_examples(all_names)} (as in `model.named_modules()`; fnmatch syntax, e.g. 'layer1.*')."
            )


def _check_single_owner(
    trainer: Any, callback: Any, acts_on: Callable[[str], bool], what: str = "layer(s)"
) -> None:
    """Refuse ``callback`` when an earlier callback of the same class in ``trainer`` acts on the same layers.

    ``MeanShiftRejection`` and ``NoiseInjection`` record the names they act on in ``_acted_on`` when they
    collect their layers. Callbacks run their hooks in list order, so the later of two callbacks sees what the
    earlier one took, and ``acts_on(name)`` says whether the later one would act on that name too. Two of them
    on the same layers would project the gradients twice or add noise twice. (Two instances with equal
    ``state_key`` -- e.g. two ``DeepControl`` -- are already refused by the Trainer.)
    """
    for other in getattr(trainer, "callbacks", None) or []:
        if other is callback:
            return
        if type(other) is not type(callback):
            continue
        shared = [n for n in getattr(other, "_acted_on", ()) if acts_on(n)]
        if shared:
            shown = ", ".join(repr(n) for n in shared[:3]) + (", ..." if len(shared) > 3 else "")
            raise MSRConfigurationError(
                f"Two {type(callback).__name__} callbacks act on the same {len(shared)} {what} ({shown}): "
                f"{other!r} and {callback!r}. They would both apply their effect to these layers. Keep one, or "
                "split the layers between them with `exclude` (or `module_names`)."
            )


_DISTRIBUTIONS = ("uniform", "gaussian")


def _check_noise_levels(
    distribution: str, scale: float, shift: float, scale_name: str = "scale", shift_name: str = "shift"
) -> tuple[float, float]:
    """Validate a (scale, shift) pair for ``distribution`` and return them as floats."""
    _check_choice("distribution", distribution, _DISTRIBUTIONS)
    if distribution == "uniform":
        scale = _check_in_range(
            scale_name,
            scale,
            0.0,
            1.0,
            hint=" A uniform factor U(1 - scale, 1 + scale) must stay in [0, 2]; for a wider spread use "
            "distribution='gaussian' (clamped to [0, 2]).",
        )
    else:
        scale = _check_positive(scale_name, scale, allow_zero=True)
    shift = _check_positive(shift_name, shift, allow_zero=True)
    return scale, shift


def _runs_in_worker_processes(trainer: Any) -> bool:
    """Whether fit runs in processes started by the Trainer (ddp_spawn, ddp_fork, ddp_notebook)."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)
