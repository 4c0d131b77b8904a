"""Learning curves and the statistical plots (seaborn): PSNR by variant, pruning, importance."""
from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.load import variant_label
from analysis.style import SPLIT_COLOURS, STATUS_COLOURS, new_figure, seeded_numpy, styled

PSNR = "best_test_psnr"
PSNR_LABEL = "test PSNR at best val epoch (dB)"
SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}
CONTINUOUS_MIN_VALUES = 7   # fewer distinct values than this: plotted as categories


# ------------------------------------------------------------------ learning curves


@styled
def curves_figure(epochs: pd.DataFrame, trials: pd.DataFrame, best_id: str) -> Figure:
    """Loss (in the model's own space) and RGB PSNR against epoch for one variant's trials.

    The best trial's lines are labelled, one per split; the variant's other
    trials are drawn faint behind it with "_"-labels (matplotlib's "not in the
    legend"). Other trials appear on the loss panel only when they share the
    best trial's loss function: an L1 and an MSE curve share no scale.
    """
    trials = trials.set_index("trial_id", drop=False)
    best = trials.loc[best_id]
    fig = new_figure(10, 3.8)
    ax_loss, ax_psnr = fig.subplots(1, 2)
    history = {t: h.sort_values("epoch") for t, h in epochs[epochs["trial_id"].isin(trials.index)].groupby("trial_id")}
    others = [t for t in trials.index if t != best_id and t in history]
    _faint(ax_loss, [history[t] for t in others if trials.at[t, "loss"] == best["loss"]], ("train", "val", "test"),
           "loss")
    _faint(ax_psnr, [history[t] for t in others], ("val", "test"), "psnr")
    if best_id in history:
        _lines(ax_loss, history[best_id], ("train", "val", "test"), "loss")
        _lines(ax_psnr, history[best_id], ("val", "test"), "psnr")
        for split in ("val", "test"):
            ax_psnr.axhline(history[best_id][f"{split}_gray_psnr"].iloc[-1], color=SPLIT_COLOURS[split],
                            linestyle="--", linewidth=1, label=f"grayscale input ({SPLIT_NAMES[split]})")
    ax_loss.set(xlabel="epoch", ylabel=f"{best['loss']} loss ({best['output']} space)", title="loss")
    ax_psnr.set(xlabel="epoch", ylabel="PSNR (dB, RGB)", title="PSNR against the original")
    shown = epochs[epochs["trial_id"].isin(history)]["epoch"]
    for ax in (ax_loss, ax_psnr):
        _epoch_ticks(ax, shown)
        ax.legend(fontsize="small")
    n = len(trials)
    fig.suptitle(f"{variant_label((best['dataset'], best['sampling'], best['output']))}: trial {best_id}"
                 f" (best val PSNR {best['best_val_psnr']:.2f} dB)"
                 + (f", {n - 1} other trial{'s' * (n > 2)} faint" if n > 1 else ""))
    return fig


def _lines(ax: Axes, history: pd.DataFrame, splits, metric: str) -> None:
    for split in splits:
        ax.plot(history["epoch"], history[f"{split}_{metric}"], color=SPLIT_COLOURS[split], linewidth=2, marker="o",
                markersize=3, label=SPLIT_NAMES[split], zorder=3)


def _faint(ax: Axes, histories: list[pd.DataFrame], splits, metric: str) -> None:
    """The other trials' curves, faint: one collection per split, not a line per trial (a study of thousands of
    trials would otherwise spend minutes drawing); each curve still darkens where it overlaps another."""
    for split in splits:
        curves = [xy[np.isfinite(xy).all(axis=1)] for xy in
                  (np.column_stack([h["epoch"].to_numpy(float), h[f"{split}_{metric}"].to_numpy(float)])
                   for h in histories)]
        curves = [xy for xy in curves if len(xy)]
        if curves:
            ax.add_collection(LineCollection(curves, colors=SPLIT_COLOURS[split], alpha=0.25, linewidths=0.8,
                                             label=f"_{split}"))
    if histories:
        ax.autoscale_view()


# ------------------------------------------------------------------ PSNR against hyperparameters


def scored(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials with a test PSNR (at least one epoch reported), any status."""
    return trials.dropna(subset=[PSNR]).reset_index(drop=True)


@styled
def psnr_by_variant_figure(trials: pd.DataFrame) -> Figure:
    """Test PSNR by sampling technique and depth (x), output space (colour), one panel per dataset."""
    data = scored(trials)
    data = data.assign(technique=[f"{s}\ndepth {int(d)}" for s, d in zip(data["sampling"], data["depth"])])
    panels = list(data.groupby("dataset", sort=True))
    widths = [max(3.0, 1.6 * subset["technique"].nunique()) for _, subset in panels]
    fig = new_figure(1.5 + sum(widths), 4.4)
    axes = fig.subplots(1, len(panels), squeeze=False, width_ratios=widths)[0]
    for ax, (dataset, subset) in zip(axes, panels):
        with seeded_numpy():
            sns.stripplot(subset, x="technique", y=PSNR, order=sorted(subset["technique"].unique()), hue="output",
                          hue_order=sorted(data["output"].unique()), palette=output_palette(data), dodge=True,
                          jitter=0.15, ax=ax, legend=ax is axes[-1])
        _grayscale_lines(ax, subset)
        ax.set(xlabel="", ylabel=PSNR_LABEL, title=dataset)
    _legend_outside(axes[-1])
    fig.suptitle("Test PSNR by dataset x output x sampling technique x depth")
    return fig


def _legend_outside(ax: Axes) -> None:
    if ax.get_legend() is not None:   # seaborn drops the legend when the hue repeats the x axis
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), fontsize="small")


def continuous(values: pd.Series) -> bool:
    """Plotted on a numeric axis (else as categories): numbers with enough distinct values."""
    return (pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
            and values.nunique() >= CONTINUOUS_MIN_VALUES)


def categories(values: pd.Series) -> tuple[list[str], list[str]]:
    """Display labels per row and their order: numeric order for numbers, 1e-3 style for floats."""
    def label(v) -> str:
        return f"{v:g}" if isinstance(v, (float, np.floating)) else str(v)
    unique = list(pd.unique(values))
    try:
        unique.sort()
    except TypeError:  # mixed types in a column of an older study: order by text
        unique.sort(key=str)
    return [label(v) for v in values], list(dict.fromkeys(label(v) for v in unique))


# Each head's place in the "deep" palette, the same in every figure and every study (a study of uv and
# uv-classes trials paints uv as one of rgb and uv does); other values take the colours after these.
OUTPUT_ORDER = ("rgb", "uv", "uv-classes")


def output_palette(data: pd.DataFrame) -> dict:
    """The colour of each output space present in ``data``, fixed per output (``OUTPUT_ORDER``)."""
    colours = sns.color_palette("deep")
    present = sorted(data["output"].dropna().astype(str).unique())
    others = [o for o in present if o not in OUTPUT_ORDER]
    place = {o: i for i, o in enumerate([*OUTPUT_ORDER, *others])}
    return {o: colours[place[o] % len(colours)] for o in present}


def _grayscale_lines(ax: Axes, data: pd.DataFrame) -> None:
    """The grayscale input's test PSNR per dataset: the bar any colorizer must clear."""
    baselines = sorted(data.groupby("dataset")["test_gray_psnr"].median().dropna().items())
    for i, (dataset, gray) in enumerate(baselines):
        ax.axhline(gray, color="0.35", linestyle="--", linewidth=1)
        # Labels staggered along the line, so two datasets' close baselines stay readable.
        ax.annotate("grayscale input" + (f" ({dataset})" if len(baselines) > 1 else ""),
                    (0.01 + 0.5 * (i % 2), gray), xycoords=("axes fraction", "data"),
                    xytext=(0, 2), textcoords="offset points", fontsize="small", color="0.35")


# ------------------------------------------------------------------ pruning


@styled
def pruning_figure(trials: pd.DataFrame, epochs: pd.DataFrame) -> Figure:
    """Epochs run per trial by status; best val PSNR against epochs run.

    (The best found so far against the seconds spent is ``analysis.tradeoffs.progress_figure``.)
    """
    fig = new_figure(10, 4.2)
    ax_hist, ax_scatter = fig.subplots(1, 2)
    statuses = [s for s in STATUS_COLOURS if s in set(trials["status"])]
    status_style = dict(hue="status", hue_order=statuses, palette=STATUS_COLOURS)
    sns.histplot(trials, x="epochs_run", discrete=True, multiple="stack", ax=ax_hist, **status_style)
    ax_hist.set(xlabel="epochs run", ylabel="trials", title="Epochs run per trial")
    ax_hist.yaxis.set_major_locator(MaxNLocator(integer=True))

    data = trials.dropna(subset=["best_val_psnr"])
    if len(data):
        style = dict(style="dataset", style_order=sorted(data["dataset"].unique())) if data["dataset"].nunique() > 1 else {}
        sns.scatterplot(data, x="epochs_run", y="best_val_psnr", ax=ax_scatter, **status_style, **style)
    ax_scatter.set(xlabel="epochs run", ylabel="best val PSNR (dB)", title="Pruned vs completed")
    for ax in (ax_hist, ax_scatter):
        _epoch_ticks(ax, trials["epochs_run"])

    counts = ", ".join(f"{int((trials['status'] == s).sum())} {s}" for s in statuses)
    fig.suptitle(f"Pruning: {len(trials)} trials ({counts}), {len(epochs)} epochs")
    return fig


def _epoch_ticks(ax: Axes, epochs: pd.Series) -> None:
    """Whole epochs on the x axis. With one epoch the axis spans 0.95-1.05, where MaxNLocator(integer=True)
    finds no integer and falls back to 0.945, 0.960, ...: so a few values are ticked one by one."""
    values = sorted(int(v) for v in epochs.dropna().unique())
    if 0 < len(values) <= 12:
        ax.set_xticks(values)
        if len(values) == 1:
            ax.set_xlim(values[0] - 0.5, values[0] + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# ------------------------------------------------------------------ importance


@styled
def importance_figure(importances: dict[str, float], completed: int) -> Figure:
    data = pd.DataFrame({"parameter": list(importances), "importance": list(importances.values())})
    fig = new_figure(6.4, 1.2 + 0.35 * len(data))
    ax = fig.subplots()
    sns.barplot(data, x="importance", y="parameter", orient="h", color=sns.color_palette("deep")[0], ax=ax)
    ax.set(xlabel="importance (normalised, Optuna)", ylabel="", title=f"Hyperparameter importance (Optuna objective), {completed} completed trials")
    return fig
