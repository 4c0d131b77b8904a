"""Figures without pyplot: one look, fixed size and dpi, byte-identical PNGs on a rerun."""
from __future__ import annotations

from contextlib import contextmanager
from functools import wraps
from pathlib import Path

import matplotlib as mpl
import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

DPI = 100
# Whitegrid look, applied while a figure is built (not globally, so importing
# the package leaves a notebook's own style alone).
STYLE = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper", font_scale=1.1)}
STATUS_COLOURS = {"DONE": "#2a9d55", "PRUNED": "#e07b1a", "RUNNING": "#3c78c8", "ERROR": "#c8323c"}
SPLIT_COLOURS = {"train": "#3c78c8", "val": "#e07b1a", "test": "#2a9d55"}


def styled(build):
    """Decorator: build the figure under STYLE."""
    @wraps(build)
    def wrapper(*args, **kwargs):
        with mpl.rc_context(STYLE):
            return build(*args, **kwargs)
    return wrapper


def new_figure(width: float, height: float) -> Figure:
    # A bare Figure (no pyplot): no global figure registry to leak, works on any backend.
    # Constrained layout moves axes inside the figure, never resizes it, so
    # the PNG is exactly width*DPI x height*DPI pixels.
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save(fig: Figure, path: Path) -> None:
    # No "Software" entry: the PNG bytes then depend on the data alone, not the matplotlib build string.
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})


def pixel_size(fig: Figure) -> tuple[int, int]:
    """(width, height) in pixels of the PNG ``save`` writes."""
    w, h = fig.get_size_inches() * DPI
    return int(round(w)), int(round(h))


@contextmanager
def seeded_numpy(seed: int = 0):
    """seaborn's stripplot jitters with numpy's global RNG: seed it for the plot, then restore it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)
