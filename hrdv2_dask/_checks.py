"""Argument checks shared by the pure modules (numpy and the standard library only)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ConfigError


def as_int(name: str, value: Any, minimum: int, fix: str) -> int:
    """``value`` as a Python int ``>= minimum``, or a :class:`ConfigError` naming it and the fix.

    >>> as_int("tile_px", np.int64(518), 1, "use e.g. 518")
    518
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name} must be an integer, got {value!r}; {fix}.")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value!r}; {fix}.")
    return int(value)
