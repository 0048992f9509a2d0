"""Small reusable argument checks with messages that name the argument, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

from lightning_msr.exceptions import MSRConfigurationError


def _check_in_range(name: str, value: Any, low: float, high: float, *, hint: str = "") -> float:
    """Check ``low <= value <= high`` for a real number and return it as ``float``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MSRConfigurationError(
            f"Expected `{name}` to be a number in [{low:g}, {high:g}], but got {value!r} of type "
            f"{type(value).__name__}.{hint}"
        )
    if not low <= float(value) <= high:  # also rejects NaN
        raise MSRConfigurationError(f"Expected `{name}` to be in [{low:g}, {high:g}], but got {value!r}.{hint}")
    return float(value)


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """Check that ``value`` is a finite positive (or non-negative) number."""
    kind = "non-negative" if allow_zero else "positive"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MSRConfigurationError(
            f"Expected `{name}` to be a {kind} number, but got {value!r} of type {type(value).__name__}."
        )
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value or value == float("inf"):
        raise MSRConfigurationError(f"Expected `{name}` to be a finite {kind} number, but got {value!r}.")
    return value


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
    """Check that ``value`` is an integer seed or None."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise MSRConfigurationError(f"Expected `{name}` to be an integer or None, but got {value!r}.")
    return value


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
