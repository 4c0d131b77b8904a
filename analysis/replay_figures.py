"""What replays of search strategies found, summed up over seeds: a table and a figure (no torch, no Ray).

Every figure is a median over seeds with its interquartile range; "compute" is the recorded seconds of
the epochs the strategy ran, summed over its trials (analysis.replay).
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pandas as pd

from analysis.replay import Curves, Run
from analysis.style import new_figure, styled

WITHIN_DB = 0.1   # "a good colorizer": within this many dB of the table's best configuration, on test
X_FROM_S = 60.0   # the figure starts at a minute of compute (about one epoch): before it, all strategies guess
Y_BELOW_DB = 1.5  # and shows gains down to this far below the best (the search's end game)


def found_at(run: Run, xs: np.ndarray) -> np.ndarray:
    """The test gain of the best found once ``xs`` compute was spent (NaN before the first epoch ended)."""
    if not run.compute.size:
        return np.full(len(xs), np.nan)
    i = np.searchsorted(run.compute, xs, side="right") - 1
    return np.where((i >= 0) & (xs <= run.compute[-1]), run.found[np.clip(i, 0, None)], np.nan)


def compute_to_best(run: Run, curves: Curves, best: int) -> float:
    """Compute spent when the best found became the table's best configuration at its best epoch."""
    target = curves.val[best, curves.best_epoch(best)]
    hit = np.flatnonzero(run.found_val >= target)
    return float(run.compute[hit[0]]) if hit.size else math.inf


NEVER = 1e300   # "never got there" while quartiles are interpolated: a quartile next to one is "never"


def _quartiles(values) -> tuple[float, float, float]:
    values = np.minimum(np.asarray(values, dtype=float), NEVER)
    return tuple(math.inf if v >= NEVER / 1e10 else float(v) for v in np.quantile(values, (0.25, 0.5, 0.75)))


def _fmt(q: tuple[float, float, float], scale: float = 1.0, digits: int = 0) -> str:
    def one(v):
        return "never" if math.isinf(v) else f"{v / scale:,.{digits}f}"
    return f"{one(q[1])} [{one(q[0])}, {one(q[2])}]"


def summary(runs: list[Run], curves: Curves, best: int | None = None) -> pd.DataFrame:
    """One row per (strategy, concurrency): compute to come within WITHIN_DB of the best configuration and
    to find it (median [p25, p75] over seeds, recorded seconds), the gain found at the end, the compute of
    all trials, and how often the best configuration was pruned."""
    best = curves.best() if best is None else best
    target = curves.found(best) - WITHIN_DB
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.strategy, run.concurrency].append(run)
    rows = []
    for (name, concurrency), group in groups.items():
        within = [r.compute_to(target) for r in group]
        exact = [compute_to_best(r, curves, best) for r in group]
        tried = [[p for k, p in zip(r.configs, r.pruned) if k == best] for r in group]
        rows.append({
            "strategy": name, "concurrency": concurrency, "seeds": len(group), "trials": len(group[0].configs),
            f"compute to within {WITHIN_DB} dB (s)": _fmt(_quartiles(within)),
            "seeds within": f"{sum(math.isfinite(v) for v in within)}/{len(group)}",
            "compute to the best (s)": _fmt(_quartiles(exact)),
            "seeds finding the best": f"{sum(math.isfinite(v) for v in exact)}/{len(group)}",
            "test gain found (dB)": _fmt(_quartiles([r.found[-1] for r in group]), digits=2),
            "compute of all trials (s)": _fmt(_quartiles([r.compute[-1] for r in group])),
            "trials pruned": f"{np.mean([np.mean(r.pruned) for r in group]):.0%}",
            "best config pruned (seeds)": f"{sum(any(t) for t in tried)}/{sum(bool(t) for t in tried)}",
            "best config pruned (trials)": f"{sum(map(sum, tried))}/{sum(map(len, tried))}",
        })
    return pd.DataFrame(rows)


@styled
def progress_figure(runs: list[Run], curves: Curves, best: int | None = None, width: float = 9.0):
    """Test gain of the best found against compute, median and IQR over seeds, one panel per concurrency."""
    best = curves.best() if best is None else best
    levels = sorted({r.concurrency for r in runs})
    fig = new_figure(width, 3.4)
    axes = fig.subplots(1, len(levels), sharey=True, squeeze=False)[0]
    top = max(r.compute[-1] for r in runs if r.compute.size)
    xs = np.geomspace(min(X_FROM_S, top / 10), top, 200)
    names = list(dict.fromkeys(r.strategy for r in runs))
    colours = dict(zip(names, [f"C{i}" for i in range(len(names))]))
    for ax, level in zip(axes, levels):
        for name in names:
            group = [r for r in runs if r.strategy == name and r.concurrency == level]
            if not group:
                continue
            y = np.array([found_at(r, xs) for r in group])
            q = np.full((3, len(xs)), np.nan)
            seen = np.isfinite(y).any(axis=0)
            q[:, seen] = np.nanquantile(y[:, seen], [0.25, 0.5, 0.75], axis=0)
            ax.plot(xs / 3600, q[1], color=colours[name], label=name, lw=1.4)
            ax.fill_between(xs / 3600, q[0], q[2], color=colours[name], alpha=0.15, lw=0)
        ax.axhline(curves.found(best), color="k", lw=0.8, ls="--")
        ax.axhline(curves.found(best) - WITHIN_DB, color="k", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("compute (recorded hours, summed over trials)")
        ax.set_title(f"{level} workers", fontsize=10)
    axes[0].set_ylabel("test gain of the best by val (dB)")
    finite = [v for r in runs for v in r.found if math.isfinite(v)]
    axes[0].set_ylim(max(min(finite), curves.found(best) - Y_BELOW_DB), max(finite) + 0.1)
    axes[-1].legend(fontsize=7, loc="lower right")
    return fig
