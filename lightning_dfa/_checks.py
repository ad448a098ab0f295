"""Argument checks shared by every layer: whole numbers in a range, and the closest valid names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


def check_int(name: str, value: Any, low: int, high: int | None = None, where: str = "") -> int:
    """``value`` if it is an integer (not a bool) in ``[low, high]``, else a ``ValueError`` naming the range."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high):
        return value
    if high is not None:
        what = f"an integer from {low} to {high}"
    else:
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")
    raise ValueError(f"{where}{name} must be {what}, got {value!r}.")


def closest(word: str, options: Iterable[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """The options closest to ``word`` (at most ``n``), for "did you mean" hints."""
    return difflib.get_close_matches(str(word), [str(option) for option in options], n=n, cutoff=cutoff)


def did_you_mean(word: str, options: Iterable[str], n: int = 1, cutoff: float = 0.6) -> str:
    """`` Did you mean 'x'?`` (or ``'x' or 'y'``) for the closest options, else ``""``."""
    close = closest(word, options, n, cutoff)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
