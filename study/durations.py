"""Durations as the command line and space files give them (``90m``, ``2h``, ``1h30m``, seconds,
``none``) and as messages print them."""
from __future__ import annotations

import math
import re

from study.cli import UsageError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text, what: str = "--time-budget") -> float | None:
    """``90m``, ``2h``, ``1d``, ``45s``, ``1h30m`` or seconds -> seconds; ``none`` -> None (no budget).

    Zero, however written (``0``, ``0s``, ``0.0``, a YAML 0), is refused with a hint to write ``none``:
    one meaning everywhere, and a typo never silently lifts a budget."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower()
        if s in ("none", "off"):
            return None
        parts = re.fullmatch(r"((\d+(\.\d+)?)\s*([smhd]))+|\d+(\.\d+)?", s)
        if not parts:
            raise UsageError(f"{what} {text!r}: give a duration such as 90m, 2h, 1d, 1h30m or seconds (3600), "
                             f"or none")
        if re.fullmatch(r"\d+(\.\d+)?", s):
            seconds = float(s)
        else:
            seconds = sum(float(n) * _UNITS[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)\s*([smhd])", s))
    if seconds == 0:
        raise UsageError(f"{what} {text!r}: a budget must be more than 0; for no budget at all write none")
    if not math.isfinite(seconds) or seconds < 0 or seconds > 366 * 86400:
        raise UsageError(f"{what} {text!r}: must be more than 0 and at most a year (366d)")
    return seconds


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(round(seconds)))
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"
