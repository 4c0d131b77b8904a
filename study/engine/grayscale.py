"""This process's rule for grayscale photos in a dataset's splits: "left out" (the default) or "kept"
(``COLORIZE_ALLOW_GRAYSCALE=1``). A study records the rule it started with; ``study.engine.data``
applies it. Kept apart from the data module so that a command checks a study's rule without torch.
"""
from __future__ import annotations

import os

ALLOW_GRAYSCALE_ENV = "COLORIZE_ALLOW_GRAYSCALE"


def grayscale_allowed() -> bool:
    return os.environ.get(ALLOW_GRAYSCALE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def grayscale_rule() -> str:
    """What this process does with grayscale images: "left out" of the splits, or "kept" (a study records
    it: PSNR from one rule cannot be compared with the other's)."""
    return "kept" if grayscale_allowed() else "left out"
