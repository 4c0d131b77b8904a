"""Issue 13's questions of a study: fidelity against vividness (the Pareto front), what helped, how fast.

Fidelity is the validation PSNR gain over the grayscale input (dB), vividness
the validation colourfulness ratio (1 = as colourful as the originals), both at
each trial's best epoch (``study.contract.best_row``). A regression colorizer
that maximises PSNR paints washed-out colours; the front shows what a study
found between the two.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.figures import categories, continuous, output_palette
from analysis.style import new_figure, seeded_numpy, styled
from study.contract import default_trial, epoch_gain, gain

FIDELITY = "val_gain_db"
VIVIDNESS = "best_val_colourfulness"
FIDELITY_LABEL = "val PSNR gain over grayscale (dB)"
VIVIDNESS_LABEL = "val colourfulness ratio (1 = originals')"
TEST_GAIN = "test_gain_db"


def colorize_default(trials: pd.DataFrame) -> pd.Series | None:
    """The trial ``python -m study.colorize`` uses without ``--trial``: the contract's rule among DONE trials."""
    if trials is None or trials.empty or "status" not in trials:
        return None
    return default_trial(trials[trials["status"] == "DONE"])


def scored(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials with both objectives, with ``val_gain_db`` and ``test_gain_db`` added."""
    data = trials.assign(**{FIDELITY: gain(trials, "val"), TEST_GAIN: gain(trials, "test")})
    return data.dropna(subset=[FIDELITY, VIVIDNESS]).reset_index(drop=True)


def pareto_front(data: pd.DataFrame, x: str = VIVIDNESS, y: str = FIDELITY) -> pd.DataFrame:
    """Rows no other row beats in both ``x`` and ``y`` (both maximised), sorted by ``x``.

    Of rows with equal values the one with the smaller trial id stands for them, so reruns agree.
    """
    data = data.reset_index(drop=True)   # positions, not labels: a concatenated table repeats labels
    ranked = data.sort_values([y, x, "trial_id"], ascending=[False, False, True], kind="stable")
    front, best_x = [], -np.inf
    for index, value in ranked[x].items():   # descending y: a row is on the front when its x beats all above it
        if value > best_x:
            front.append(index)
            best_x = value
    return data.loc[front].sort_values([x, "trial_id"], kind="stable").reset_index(drop=True)


def strip_members(front: pd.DataFrame, count: int = 4) -> pd.DataFrame:
    """Up to ``count`` front members spread evenly from the most faithful to the most vivid."""
    if len(front) <= count:
        return front
    picks = sorted({int(round(i)) for i in np.linspace(0, len(front) - 1, count)})
    return front.iloc[picks].reset_index(drop=True)


@styled
def pareto_figure(trials: pd.DataFrame) -> Figure:
    """Per dataset: every trial's gain against colourfulness, the front joined and ringed, colorize's choice starred."""
    data = scored(trials)
    panels = list(data.groupby("dataset", sort=True))
    fig = new_figure(1.5 + 5.2 * len(panels), 4.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    palette = output_palette(data)
    for ax, (dataset, subset) in zip(axes, panels):
        front = pareto_front(subset)
        sns.scatterplot(subset, x=VIVIDNESS, y=FIDELITY, hue="output", hue_order=sorted(palette), palette=palette,
                        ax=ax, legend=ax is axes[-1], s=30, alpha=0.8)
        ax.step(front[VIVIDNESS], front[FIDELITY], where="post", color="0.2", linewidth=1, zorder=1)
        ax.scatter(front[VIVIDNESS], front[FIDELITY], s=110, facecolors="none", edgecolors="0.1", linewidths=1.3,
                   label="Pareto front", zorder=3)
        chosen = colorize_default(trials[trials["dataset"] == dataset])
        if chosen is not None and chosen["trial_id"] in set(subset["trial_id"]):
            row = subset[subset["trial_id"] == chosen["trial_id"]].iloc[0]
            ax.scatter([row[VIVIDNESS]], [row[FIDELITY]], marker="*", s=260, color="#f2c500", edgecolors="0.1",
                       linewidths=0.8, zorder=4, label="study.colorize default")
            ax.annotate(str(row["trial_id"]), (row[VIVIDNESS], row[FIDELITY]), xytext=(6, 6),
                        textcoords="offset points", fontsize="small")
        ax.axhline(0, color="0.35", linestyle="--", linewidth=1)
        ax.set(xlabel=VIVIDNESS_LABEL, ylabel=FIDELITY_LABEL, title=f"{dataset}: {len(front)} of {len(subset)} "
                                                                       "trials on the front")
        ax.legend(fontsize="small", loc="best")
    fig.suptitle("Fidelity against vividness: one point per trial (at its best validation epoch)")
    return fig


def front_table(trials: pd.DataFrame, dataset: str, levers: list[str]) -> pd.DataFrame:
    """The front of ``dataset`` as a table: objectives, test gain and the levers that vary."""
    data = scored(trials)
    front = pareto_front(data[data["dataset"] == dataset])
    chosen = colorize_default(trials[trials["dataset"] == dataset])
    columns = ["trial_id", FIDELITY, VIVIDNESS, TEST_GAIN, "best_test_colourfulness", "best_epoch",
               *[c for c in levers if c != "dataset"]]
    table = front[columns].rename(columns={VIVIDNESS: "val_colourfulness", "best_test_colourfulness":
                                           "test_colourfulness"})
    table.insert(1, "colorize_default", ["yes" if chosen is not None and t == chosen["trial_id"] else ""
                                         for t in table["trial_id"]])
    return table


# ------------------------------------------------------------------ what helped


def levers(trials: pd.DataFrame, candidates: list[str]) -> list[str]:
    """The configuration values among ``candidates`` that vary within some dataset (dataset itself excluded)."""
    data = scored(trials)
    varying = set()
    for _, subset in data.groupby("dataset"):
        varying |= {c for c in candidates if c != "dataset" and subset[c].astype(str).nunique() > 1}
    return sorted(varying)


@styled
def helped_figure(trials: pd.DataFrame, dataset: str, lever_names: list[str]) -> Figure:
    """One panel per lever: every trial's test gain over grayscale against the lever's value, on ``dataset``."""
    data = scored(trials)
    data = data[data["dataset"] == dataset]
    names = [c for c in lever_names if data[c].astype(str).nunique() > 1]
    if not names:
        raise ValueError(f"no lever varies among the {dataset} trials")
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig = new_figure(max(1.6 + 3.6 * cols, 6.0), 1.0 + 3.1 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    palette = output_palette(data)
    for ax, name in zip(axes, names):
        values = data[name]
        if _numeric_axis(values):
            sns.scatterplot(data, x=name, y=TEST_GAIN, hue="output", hue_order=sorted(palette), palette=palette,
                            ax=ax, legend=False, s=25)
            if values.min() > 0 and values.max() / values.min() >= 20:
                ax.set_xscale("log")   # learning rates and weight decays span decades
            else:
                ax.xaxis.set_major_locator(MaxNLocator(4))   # 0.00075 0.0010 ... would run together
            ax.tick_params(axis="x", labelrotation=20)
        else:
            labels, order = categories(values)
            with seeded_numpy():
                sns.stripplot(data.assign(**{name: labels}), x=name, y=TEST_GAIN, order=order, hue="output",
                              hue_order=sorted(palette), palette=palette, dodge=False, jitter=0.15, ax=ax,
                              legend=False, size=4)
            # The median per value: the eye reads a lever's effect from where the middle moves.
            medians = data.assign(**{name: labels}).groupby(name)[TEST_GAIN].median()
            ax.scatter([order.index(k) for k in medians.index], medians.values, marker="_", s=400, color="0.1",
                       zorder=3)
        ax.axhline(0, color="0.35", linestyle="--", linewidth=1)
        ax.set(xlabel=name, ylabel="test gain over grayscale (dB)")
        ax.tick_params(axis="x", labelsize="small")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    handles = [ax.scatter([], [], color=c, label=o) for o, c in palette.items()]
    fig.legend(handles=handles, title="output", loc="outside right center", fontsize="small")
    fig.suptitle(f"What helped on {dataset}\ntest gain over the grayscale input against each lever "
                 "(bar: median per value)")
    return fig


def _value_labels(values: pd.Series) -> tuple[list[str], list[str]]:
    """Per row, the table's label of its value, and the labels' order: a lever on a numeric axis in
    quartile ranges ("0.0003-0.0008"), so a searched range gives four rows rather than one per trial."""
    if not _numeric_axis(values):
        return categories(values)
    bins = pd.qcut(values, q=min(4, values.nunique()), duplicates="drop")
    names = {iv: f"{max(iv.left, values.min()):.3g}-{iv.right:.3g}" for iv in bins.cat.categories}
    return [names[b] for b in bins], [names[iv] for iv in bins.cat.categories]


def _numeric_axis(values: pd.Series) -> bool:
    """A lever drawn on a numeric axis: many values, or a handful of floats drawn from a range (an lr
    from a log-uniform), whose printed values would crowd a categorical axis."""
    return continuous(values) or (pd.api.types.is_float_dtype(values) and values.nunique() >= 4)


def helped_table(trials: pd.DataFrame, dataset: str, lever_names: list[str]) -> pd.DataFrame:
    """Per lever and value (or quartile range of values): trials, median and best test gain (dB), on ``dataset``;
    largest median first per lever."""
    data = scored(trials)
    data = data[data["dataset"] == dataset]
    parts = []
    for name in lever_names:
        if data[name].astype(str).nunique() <= 1:
            continue
        labels, order = _value_labels(data[name])
        g = data.assign(value=labels).groupby("value")[TEST_GAIN]
        part = pd.DataFrame({"lever": name, "value": order}).merge(
            pd.DataFrame({"trials": g.size(), "median_test_gain_db": g.median(), "best_test_gain_db": g.max()})
            .reset_index(), on="value")
        parts.append(part.sort_values(["median_test_gain_db", "value"], ascending=[False, True], kind="stable"))
    if not parts:
        return pd.DataFrame(columns=["lever", "value", "trials", "median_test_gain_db", "best_test_gain_db"])
    return pd.concat(parts, ignore_index=True)


# ------------------------------------------------------------------ how fast


def device_kind(trials: pd.DataFrame) -> str:
    """"GPU" when any trial ran on CUDA, else "CPU": what the seconds of the progress figure are."""
    devices = trials.get("device", pd.Series(dtype=str)).fillna("").astype(str).str.lower()
    return "GPU" if devices.str.contains("cuda|gpu|nvidia").any() else "CPU"


def progress(trials: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """Every epoch in the order the study finished it, with the device seconds spent so far and, per
    dataset, the best validation gain over grayscale found so far.

    Order: each trial's start (``started_at``) plus its epochs' seconds when every trial has a
    start time, else the search order (Optuna's number, then trial id). A fused pack's members
    share each epoch's seconds: a (pack_id, epoch) is counted once, split among its members.
    """
    columns = ["trial_id", "dataset", "optuna_number", "started_at", "pack_id"]
    info = trials[[c for c in columns if c in trials]].copy()
    rows = epochs[["trial_id", "epoch", "val_psnr", "val_gray_psnr", "seconds"]].merge(info, on="trial_id")
    if rows.empty:
        return rows.assign(device_seconds=[], cumulative_seconds=[], gain_db=[], best_gain_db=[])
    rows = rows.sort_values(["trial_id", "epoch"], kind="stable")
    rows["seconds"] = rows["seconds"].fillna(0.0).clip(lower=0)
    if "pack_id" in rows and rows["pack_id"].notna().any():
        group = rows["pack_id"].astype("string").fillna("t:" + rows["trial_id"].astype(str)) + "/" \
            + rows["epoch"].astype(str)
        rows["device_seconds"] = rows.groupby(group)["seconds"].transform("max") / rows.groupby(group)[
            "seconds"].transform("size")
    else:
        rows["device_seconds"] = rows["seconds"]
    if "started_at" in rows and rows["started_at"].notna().all():
        done = rows["started_at"] + pd.to_timedelta(rows.groupby("trial_id")["seconds"].cumsum(), unit="s")
        rows = rows.assign(_order=done).sort_values(["_order", "trial_id", "epoch"], kind="stable")
    else:
        order = trials.sort_values(["optuna_number", "trial_id"], kind="stable")["trial_id"].tolist()
        rank = {t: i for i, t in enumerate(order)}
        rows = rows.assign(_order=rows["trial_id"].map(rank)).sort_values(["_order", "epoch"], kind="stable")
    rows = rows.drop(columns="_order").reset_index(drop=True)
    rows["cumulative_seconds"] = rows["device_seconds"].cumsum()
    rows["gain_db"] = epoch_gain(rows, "val")
    rows["best_gain_db"] = rows.groupby("dataset")["gain_db"].cummax()
    return rows


@styled
def progress_figure(trials: pd.DataFrame, epochs: pd.DataFrame) -> Figure:
    curve = progress(trials, epochs)
    if curve.empty:
        raise ValueError("no epochs reported")
    kind = device_kind(trials)
    fig = new_figure(7.5, 4.2)
    ax = fig.subplots()
    for dataset, rows in curve.groupby("dataset", sort=True):
        ax.step(rows["cumulative_seconds"], rows["best_gain_db"], where="post", label=dataset, linewidth=2)
    ax.axhline(0, color="0.35", linestyle="--", linewidth=1)
    ax.set(xlabel=f"cumulative {kind} seconds (all trials)", ylabel="best val gain over grayscale so far (dB)",
           title=f"How fast the study found it: {curve['device_seconds'].sum():.0f} {kind} seconds in all")
    ax.legend(fontsize="small")
    return fig
