"""A study's trade-off questions: fidelity against vividness (the Pareto front), what helped, how fast.

Fidelity is the validation PSNR gain over the grayscale input (dB), vividness
the validation colourfulness ratio (1 = as colourful as the originals), both at
each trial's best epoch (``study.results.contract.best_row``). A regression colorizer
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
from study.results import CURVE_TEMPERATURES, best_row, best_trials, curve_column, default_trial, epoch_gain, gain

FIDELITY = "val_gain_db"
VIVIDNESS = "best_val_colourfulness"
FIDELITY_LABEL = "val PSNR gain over grayscale (dB)"
VIVIDNESS_LABEL = "val colourfulness ratio (1 = originals')"
TEST_GAIN = "test_gain_db"
# What a point's marker says: the levers beside the head that buy colour (the head is the point's hue).
LEVER = "colour lever"
LEVER_MARKERS = {"none": "o", "adversarial": "^", "chroma weight": "s", "adversarial + chroma weight": "D"}
CLASSES = "uv-classes"   # the classification head, whose trials have temperature curves
TEMPERATURE_MARKERS = ("o", "s", "^", "D")   # one per CURVE_TEMPERATURES entry, in its order


def colorize_default(trials: pd.DataFrame) -> pd.Series | None:
    """The trial ``python -m study.colorize`` uses without ``--trial``: the contract's rule among DONE trials."""
    if trials is None or trials.empty or "status" not in trials:
        return None
    return default_trial(trials[trials["status"] == "DONE"])


def scored(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials with both objectives, with ``val_gain_db`` and ``test_gain_db`` added."""
    data = trials.assign(**{FIDELITY: gain(trials, "val"), TEST_GAIN: gain(trials, "test")})
    return data.dropna(subset=[FIDELITY, VIVIDNESS]).reset_index(drop=True)


def lever_labels(trials: pd.DataFrame) -> pd.Series:
    """Per trial, the colour levers it used: "adversarial" (a discriminator's weight > 0), "chroma weight"
    (``chroma_weight`` > 0), both, or "none". A study from before a lever existed did not use it."""
    def on(column: str) -> pd.Series:
        values = trials[column] if column in trials else pd.Series(0.0, index=trials.index)
        return pd.to_numeric(values, errors="coerce").fillna(0.0) > 0
    adversarial, chroma = on("adversarial"), on("chroma_weight")
    labels = np.where(adversarial & chroma, "adversarial + chroma weight",
                      np.where(adversarial, "adversarial", np.where(chroma, "chroma weight", "none")))
    return pd.Series(labels, index=trials.index, name=LEVER)


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
    data = data.assign(**{LEVER: lever_labels(data)})
    panels = list(data.groupby("dataset", sort=True))
    fig = new_figure(3.5 + 5.2 * len(panels), 4.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    palette = output_palette(data)
    # Markers only when some trial used a lever: a study of plain regressions keeps its plain dots.
    used = [k for k in LEVER_MARKERS if k in set(data[LEVER])]
    style = (dict(style=LEVER, style_order=used, markers={k: LEVER_MARKERS[k] for k in used})
             if used != ["none"] else {})
    for ax, (dataset, subset) in zip(axes, panels):
        front = pareto_front(subset)
        sns.scatterplot(subset, x=VIVIDNESS, y=FIDELITY, hue="output", hue_order=sorted(palette), palette=palette,
                        ax=ax, legend=ax is axes[-1], s=30 if not style else 40, alpha=0.8, **style)
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
        if ax is axes[-1]:   # beside the panels: inside, a dozen entries hid the most faithful points
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("Fidelity against vividness: one point per trial (at its best validation epoch)"
                 + ("\ncolour: the output head; marker: the colour lever" if style else ""))
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


# ------------------------------------------------------------------ heads: temperature curves, strips

CURVE_COLUMNS = ("trial_id", "best_epoch", "temperature", "rebalance", "val_gain_db", "val_colourfulness",
                 "test_gain_db", "test_colourfulness")


def temperature_curves(trials: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """One row per classification trial x curve temperature (``CURVE_TEMPERATURES``), at the trial's best
    epoch: val and test gain over grayscale and colourfulness ratio, had it decoded at that temperature.

    Columns: ``dataset``, ``CURVE_COLUMNS`` and ``trial_temperature`` (the temperature the trial decodes at).
    A trial with no epoch rows, or whose rows lack the curve (a study from before it was recorded), has no rows.
    """
    heads = trials[trials["output"] == CLASSES].sort_values("trial_id", kind="stable")
    rows = []
    for _, trial in heads.iterrows():
        history = epochs[epochs["trial_id"] == trial["trial_id"]]
        if history.empty:
            continue
        at = history[history["epoch"] == trial.get("best_epoch")] if pd.notna(trial.get("best_epoch")) else history
        # The trials table's best epoch; a table without one (a running trial) falls back on the contract's rule.
        best = at.iloc[0].to_dict() if len(at) == 1 else best_row(history.to_dict("records"))
        for t in CURVE_TEMPERATURES:
            row = {"dataset": trial["dataset"], "trial_id": trial["trial_id"], "best_epoch": int(best["epoch"]),
                   "temperature": t, "rebalance": trial.get("rebalance", np.nan),
                   "trial_temperature": trial.get("temperature", np.nan)}
            for split in ("val", "test"):
                at_t = {f"{split}_psnr": best.get(curve_column(split, "psnr", t), np.nan),
                        f"{split}_gray_psnr": best.get(f"{split}_gray_psnr", np.nan)}
                row[f"{split}_gain_db"] = float(epoch_gain(at_t, split))
                row[f"{split}_colourfulness"] = float(best.get(curve_column(split, "colourfulness", t), np.nan))
            rows.append(row)
    columns = ["dataset", *CURVE_COLUMNS, "trial_temperature"]
    table = pd.DataFrame(rows, columns=columns)
    for column in ("temperature", "rebalance", "trial_temperature", "val_gain_db", "val_colourfulness",
                   "test_gain_db", "test_colourfulness"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype(float)
    table["best_epoch"] = table["best_epoch"].astype("Int64")
    # A trial whose epochs table has no curve values (an older study) has no curve: drop all of its rows.
    if table.empty:
        return table
    drawn = table.groupby("trial_id")["val_gain_db"].transform(lambda g: g.notna().any()).astype(bool)
    return table[drawn].reset_index(drop=True)


@styled
def temperature_figure(trials: pd.DataFrame, curves: pd.DataFrame) -> Figure:
    """Per dataset: each classification trial's val gain against colourfulness as its decoding temperature moves,
    over every trial's point (grey); the temperature it decodes at is ringed."""
    if curves.empty:
        raise ValueError("no classification trial has a temperature curve")
    data = scored(trials)
    panels = list(curves.groupby("dataset", sort=True))
    fig = new_figure(2.6 + 5.4 * len(panels), 4.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (dataset, subset) in zip(axes, panels):
        others = data[data["dataset"] == dataset]
        ax.scatter(others[VIVIDNESS], others[FIDELITY], s=18, color="0.75", zorder=1,
                   label="every trial (its own decoding)")
        ids = sorted(subset["trial_id"].unique())
        colours = dict(zip(ids, sns.color_palette("dark", len(ids))))
        for trial_id in ids:
            curve = subset[subset["trial_id"] == trial_id].sort_values("temperature", ascending=False)
            rebalance = curve["rebalance"].iloc[0]
            ax.plot(curve["val_colourfulness"], curve["val_gain_db"], linewidth=1.3, color=colours[trial_id],
                    zorder=2, label=f"{trial_id}" + (f" (rebalance {rebalance:g})" if pd.notna(rebalance) else ""))
            # One marker per temperature (the legend's key) rather than text: close points' labels would collide.
            for _, point in curve.iterrows():
                ax.scatter([point["val_colourfulness"]], [point["val_gain_db"]], s=28, color=colours[trial_id],
                           marker=TEMPERATURE_MARKERS[CURVE_TEMPERATURES.index(point["temperature"])], zorder=3)
            own = curve[np.isclose(curve["temperature"], curve["trial_temperature"])]
            ax.scatter(own["val_colourfulness"], own["val_gain_db"], s=110, facecolors="none",
                       edgecolors=colours[trial_id], linewidths=1.3, zorder=3,
                       label="_own" if trial_id != ids[0] else "ringed: the trial's own temperature")
        ax.axhline(0, color="0.35", linestyle="--", linewidth=1)
        ax.set(xlabel=VIVIDNESS_LABEL, ylabel=FIDELITY_LABEL, title=f"{dataset}: {len(ids)} classification "
                                                                       f"trial{'s' * (len(ids) > 1)}")
    handles, labels = axes[-1].get_legend_handles_labels()
    for marker, t in zip(TEMPERATURE_MARKERS, CURVE_TEMPERATURES):
        handles.append(axes[-1].scatter([], [], s=28, color="0.3", marker=marker))
        labels.append(f"T = {t:g}")
    axes[-1].legend(handles, labels, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("Decoding temperature: each classification trial at its best validation epoch,\n"
                 "decoded at T = " + ", ".join(f"{t:g}" for t in CURVE_TEMPERATURES)
                 + " (T = 1 the mean colour, towards 0 the most likely one)")
    return fig


def head_groups(trials: pd.DataFrame) -> pd.Series:
    """Per trial, its head and whether the adversarial lever is on: "uv", "uv + adversarial", ..."""
    adversarial = lever_labels(trials).str.contains("adversarial")
    return trials["output"].astype(str) + np.where(adversarial, " + adversarial", "")


def head_members(trials: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """The best trial (the contract's rule: highest val PSNR) of each (output, adversarial on/off) group of
    ``dataset``, in order of output, without the lever first; ``group`` names the group."""
    rows = trials[trials["dataset"] == dataset]
    rows = rows.assign(group=head_groups(rows), _adversarial=lever_labels(rows).str.contains("adversarial"))
    best = best_trials(rows, ["output", "_adversarial"])
    return scored(best).drop(columns="_adversarial") if len(best) else best.drop(columns="_adversarial")


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
        group = (rows["pack_id"].astype("string").fillna("t:" + rows["trial_id"].astype(str)) + "/"
                 + rows["epoch"].astype(str))
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
