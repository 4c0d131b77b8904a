"""The results contract: table names, columns, their types, statuses and the best-epoch rule.

The one place these are defined. ``study`` (the writers) and ``analysis`` (the
readers) both import it, so this module imports only pandas: no torch, no Ray,
no pyarrow filesystems, nothing at import time but constants.

A study's results are Parquet in ``<study folder>/results/``; each of
``trials.parquet``, ``epochs.parquet`` and ``previews.parquet`` reads as one
table with ``pd.read_parquet`` (the last two are folders of files), every column
in its contract type (``COLUMNS``) from the study's first write.

``trials``   one row per trial: ``trial_id``, every resolved config value as its
             own column, ``status`` (one of ``STATUSES``), ``error``,
             ``epochs_run``, ``best_epoch`` and ``best_*`` metrics (at the
             epoch chosen by ``best_row``), ``final_*`` metrics (last epoch),
             the grayscale baselines, and bookkeeping (``BOOKKEEPING``).
``epochs``   one row per (trial_id, epoch): ``EPOCH_METRICS`` and ``seconds``.
``previews`` one row per (trial_id, dataset, resolution, epoch, image_index, kind):
             PNG bytes; originals and grayscale inputs once per (dataset,
             resolution) with ``trial_id`` "" and ``epoch`` 0.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # pandas is imported where a table is touched: best_row's callers (trials) need none
    import pandas as pd

RESULTS_DIR = "results"
TABLES = ("trials", "epochs", "previews")
KEYS = {
    "trials": ["trial_id"],
    "epochs": ["trial_id", "epoch"],
    "previews": ["trial_id", "dataset", "resolution", "epoch", "image_index", "kind"],
}

# RUNNING: started, not finished (or the driver stopped while it ran). PRUNED trials are finished results.
# STOPPED: stopped by the study's time budget at an epoch's end with a checkpoint; --resume continues it
# (not a failure, and not finished: Optuna is told nothing until it ends).
STATUSES = ("RUNNING", "DONE", "PRUNED", "ERROR", "STOPPED")
FINISHED = ("DONE", "PRUNED")

# What a trial reports after every epoch (besides ``epoch`` and ``seconds``).
EPOCH_METRICS = (
    "train_loss", "val_loss", "test_loss",
    "val_psnr", "val_ssim", "val_colourfulness", "val_gray_psnr",
    "test_psnr", "test_ssim", "test_colourfulness", "test_gray_psnr",
)
# A uv-classes trial's val and test metrics at a few decoding temperatures besides its own (one trial
# gives a curve on the fidelity/vividness front): ``val_psnr_t038`` is val PSNR at T = 0.38. Training
# does not depend on the temperature (without a discriminator), so the curve is what trials at those
# temperatures would measure. Missing (NA) for the other heads. Not in EPOCH_METRICS, which every epoch row has.
CURVE_TEMPERATURES = (1.0, 0.6, 0.38, 0.2)


def curve_key(metric: str, temperature: float) -> str:
    """``metric`` decoded at ``temperature``, without its split: ``psnr_t038``."""
    return f"{metric}_t{round(temperature * 100):03d}"


def curve_column(split: str, metric: str, temperature: float) -> str:
    """The epochs table's column of ``metric`` on ``split`` decoded at ``temperature``: ``val_psnr_t038``."""
    return f"{split}_{curve_key(metric, temperature)}"


CURVE_METRICS = tuple(curve_column(split, m, t) for split in ("val", "test")
                      for t in CURVE_TEMPERATURES for m in ("psnr", "colourfulness"))
# Copied into the trials table at the best epoch (``best_<m>``) and the final epoch (``final_<m>``).
SUMMARY_METRICS = ("val_psnr", "val_ssim", "val_colourfulness", "test_psnr",
                   "test_ssim", "test_colourfulness", "val_loss", "test_loss")
# The metric that chooses a trial's best epoch and ranks trials: PSNR in RGB on the
# validation split, never a loss (an RGB model's and a UV model's losses live in different spaces).
BEST_METRIC = "val_psnr"
TRIAL_SCORE = f"best_{BEST_METRIC}"

# A variant is what the original report compares: dataset x sampling technique x output space.
VARIANT = ("dataset", "sampling", "output")

# Trials-table columns that are facts about a run, not its configuration: never plotted or
# ranked as hyperparameters.
BOOKKEEPING = (
    "trial_id", "status", "error", "epochs_run", "best_epoch", "val_gray_psnr", "test_gray_psnr",
    "wall_time_s", "device", "node_id", "gpu_ids", "checkpoint_path", "optuna_number",
    "started_at", "finished_at", "restarts", "resumed_at_epoch", "pack_id", "pack_size",
    # What the trial computed in (bf16, tf32, fp32; from its latest epoch row): the config's own
    # ``precision`` column keeps what was asked for ("auto" resolves per device).
    "precision_used",
)
# Every column each table has from its first write, by kind ("str", "float", "int": nullable Int64,
# "time": UTC timestamps), besides the trials table's configuration columns (every TrialConfig field
# and ``resolution``): a reader's ``df["best_val_psnr"]`` works while no trial has finished an epoch.
# A pack size, a precision or a best epoch the run does not know yet is missing (NA), never absent.
EPOCH_COLUMNS = {"trial_id": "str", "epoch": "int", **{m: "float" for m in EPOCH_METRICS}, "seconds": "float",
                 **{m: "float" for m in CURVE_METRICS},
                 # what the epoch computed in (bf16, tf32, fp32)
                 "precision": "str"}
TRIAL_COLUMNS = {
    "trial_id": "str", "status": "str", "error": "str", "epochs_run": "int", "best_epoch": "int",
    **{f"{at}_{m}": "float" for m in SUMMARY_METRICS for at in ("best", "final")},
    "val_gray_psnr": "float", "test_gray_psnr": "float", "wall_time_s": "float", "device": "str",
    "node_id": "str", "gpu_ids": "str", "checkpoint_path": "str", "optuna_number": "int",
    "started_at": "time", "finished_at": "time", "restarts": "int", "resumed_at_epoch": "int",
    "pack_id": "int", "pack_size": "int", "precision_used": "str",
}
PREVIEW_COLUMNS = {"trial_id": "str", "dataset": "str", "resolution": "int", "epoch": "int",
                   "image_index": "int", "kind": "str", "png": "bytes"}
COLUMNS = {"trials": TRIAL_COLUMNS, "epochs": EPOCH_COLUMNS, "previews": PREVIEW_COLUMNS}

# Configuration that changes what is measured or shown, not the model.
NOT_HYPERPARAMETERS = ("eval_limit", "preview_count")

# Column types a pandas user expects. Integers are nullable (Int64): a trial that has not
# finished an epoch has no best_epoch, and NaN would turn the column into floats.
TIMESTAMP_COLUMNS = ("started_at", "finished_at")          # UTC
INTEGER_COLUMNS = {
    "trials": ("epochs_run", "best_epoch", "optuna_number", "restarts", "resumed_at_epoch",
               "pack_id", "pack_size", "resolution"),
    "epochs": ("epoch",),
    "previews": ("resolution", "epoch", "image_index"),
}


def best_row(rows: Iterable[dict]) -> dict:
    """The best epoch of a history: highest ``val_psnr``, the earliest epoch on ties.

    Rows whose ``val_psnr`` is missing or NaN never win over a real value.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("best_row needs at least one epoch row")

    def key(r: dict):
        v = r.get(BEST_METRIC)
        v = float("-inf") if v is None or v != v else float(v)
        return (v, -float(r.get("epoch", 0)))

    return max(rows, key=key)


def best_trials(df: pd.DataFrame, by: str | Iterable[str] | None = None, score: str = TRIAL_SCORE) -> pd.DataFrame:
    """The best trial (highest ``best_val_psnr``) of each group of ``by``, sorted by ``by``; with
    ``by=None`` the single best trial overall. Ties go to the smaller ``trial_id``, so reruns pick the
    same trial; trials without a score are left out."""
    if df is None or df.empty or score not in df:
        if df is None:
            import pandas as pd
            df = pd.DataFrame()
        return df.iloc[0:0]
    by = [] if by is None else [by] if isinstance(by, str) else list(by)
    ranked = df.dropna(subset=[score]).sort_values([score, "trial_id"], ascending=[False, True], kind="stable")
    if not by:
        return ranked.head(1).reset_index(drop=True)
    best = ranked.groupby(by, sort=False, dropna=False).head(1)
    return best.sort_values(by, kind="stable").reset_index(drop=True)


def epoch_gain(row, split: str = "val"):
    """PSNR gain over the grayscale input (dB) of an epoch row (a dict, or a table of epoch rows):
    ``<split>_psnr - <split>_gray_psnr``. The one formula of the gain; ``gain`` is it for trial rows."""
    return row[f"{split}_psnr"] - row[f"{split}_gray_psnr"]


def gain(df: pd.DataFrame, split: str = "val", at: str = "best") -> pd.Series:
    """PSNR gain over the grayscale input (dB) of each trial row: ``<at>_<split>_psnr - <split>_gray_psnr``."""
    return df[f"{at}_{split}_psnr"] - df[f"{split}_gray_psnr"]


# Objectives a space may ask Optuna to maximise together (a Pareto front), each taken from an epoch row
# (a study tells Optuna the values of the trial's best epoch, by val PSNR as everywhere): fidelity (PSNR
# gain over the grayscale input, dB) and vividness (colourfulness of the predictions over the originals').
OBJECTIVES = {
    "val_psnr_gain": lambda row: float(epoch_gain(row)),
    "val_colourfulness": lambda row: float(row["val_colourfulness"]),
}


def kinds(name: str) -> dict[str, str]:
    """Column -> kind of every column of table ``name`` whose kind the contract knows (the trials table's
    ``resolution``, a configuration value, is an integer too)."""
    return {**{c: "int" for c in INTEGER_COLUMNS.get(name, ())}, **COLUMNS.get(name, {})}


def coerce(name: str, df: pd.DataFrame) -> pd.DataFrame:
    """The contract's columns (``COLUMNS``: missing ones added, empty) and their types: nullable integers,
    UTC timestamps (from datetimes or Unix seconds).

    Used by readers (of old studies too), so every reader sees the same types; a column already in its
    type is left as it is (a table the writer wrote costs a look at each column).
    """
    import pandas as pd

    df = df.copy()
    for col, kind in COLUMNS.get(name, {}).items():   # the contract's shape, from the first write
        if col not in df:
            df[col] = pd.Series([None] * len(df), index=df.index,
                                dtype={"float": "float64", "int": "Int64", "time": "datetime64[us, UTC]"}.get(
                                    kind, "object"))
    for col in INTEGER_COLUMNS.get(name, ()):
        if col in df and not isinstance(df[col].dtype, pd.Int64Dtype):
            df[col] = pd.to_numeric(df[col], errors="coerce").round().astype("Int64")
    if name == "trials":
        for col in TIMESTAMP_COLUMNS:
            if col in df and not isinstance(df[col].dtype, pd.DatetimeTZDtype):
                df[col] = pd.to_datetime(df[col].map(_timestamp), utc=True).dt.as_unit("us")
    return df


def coerce_row(name: str, row: dict) -> dict:
    """One row of table ``name`` in the contract's types as plain Python values, what ``coerce`` does to a
    table: ints, floats, strs, UTC datetimes (from Unix seconds, datetimes or ISO text), bytes; a missing
    value (None, NaN, NA, NaT, an unreadable number) is None. The epochs and previews tables keep only
    their contract's columns; the trials table keeps the rest (its configuration) with numpy scalars made
    plain. The writer types each row once, as it comes, instead of a whole table on every write."""
    known = kinds(name)
    out = {}
    for key, value in row.items():
        kind = known.get(key)
        if kind is None and name != "trials":
            continue
        if _missing(value):
            out[key] = None
        elif kind is None:
            out[key] = value.item() if type(value).__module__ == "numpy" else value
        else:
            out[key] = _AS[kind](value)
    return out


def _missing(value) -> bool:
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return True
    return isinstance(value, float) and value != value


def _as_int(value) -> int | None:
    try:
        return value if type(value) is int else int(round(float(value)))
    except (TypeError, ValueError, OverflowError):
        return None


def _as_float(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if value != value else value


def _as_time(value):
    from datetime import datetime, timezone

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, timezone.utc)
    if isinstance(value, str) and not value:
        return None
    try:
        stamp = _timestamp(value)
    except (TypeError, ValueError):
        return None
    if _missing(stamp):
        return None
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.to_pydatetime(warn=False)


_AS = {"str": str, "int": _as_int, "float": _as_float, "time": _as_time, "bytes": bytes}


def _timestamp(value):
    """Unix seconds (how drivers record times) or anything pandas reads as a time; missing -> NaT."""
    import pandas as pd

    if value is None or isinstance(value, str) and not value:
        return pd.NaT
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return pd.NaT if value != value else pd.Timestamp(value, unit="s", tz="UTC")
    return pd.Timestamp(value)


def default_trial(trials: pd.DataFrame, done_only: bool = True) -> pd.Series | None:
    """The trial ``study.colorize`` uses when none is named: the best (``best_trials``) of the DONE trials
    with a checkpoint (a pruned or running trial is used only when named); when none has a score, the first
    such; None when there is none. ``done_only=False``: among trials of any status (one named by the user)."""
    if trials is None or trials.empty or "checkpoint_path" not in trials:
        return None
    rows = trials[(trials["checkpoint_path"].fillna("").astype(str) != "")
                  & ((trials["status"] == "DONE") if done_only else True)]
    best = best_trials(rows)
    if not best.empty:
        return best.iloc[0]
    return rows.iloc[0] if not rows.empty else None
