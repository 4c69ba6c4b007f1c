"""Argument checks: every public setting is checked here, with one style of error."""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["flag", "label", "number"]

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")


def number(name: str, value: Any, use: str = "a positive finite number", *, low: float = 0.0,
           high: float = math.inf, low_ok: bool = False, high_ok: bool = False,
           integer: bool = False, none: bool = False) -> Any:
    """``value`` if it is a number in the range, else a ``ValueError`` naming it and ``use``."""
    if value is None and none:
        return None
    kinds = int if integer else (int, float)
    if (isinstance(value, bool) or not isinstance(value, kinds) or math.isnan(value)
            or not (low <= value if low_ok else low < value)
            or not (value <= high if high_ok else value < high)):
        raise ValueError(f"Unexpected value for {name}: {value!r}; use {use}")
    return value if integer else float(value)


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"Unexpected value for {name}: {value!r}; use True or False")
    return value


def label(name: str, value: Any) -> str:
    """A label value or tag fixed for a run (``session_id``): at most 128 letters, digits and
    ``_ . : / -``, so no e-mail address or name with spaces becomes a label."""
    if not isinstance(value, str) or not _LABEL.match(value):
        raise ValueError(f"Unexpected value for {name}: {value!r}; use at most 128 of "
                         "A-Z a-z 0-9 _ . : / - (starting with a letter or digit)")
    return value
