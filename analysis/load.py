"""Reading a study folder with pandas alone: the three Parquet tables and study.json.

The tables follow the results contract, ``study.results.contract`` (pandas only: importing
it imports no torch and no Ray, so the analysis runs wherever pandas and pyarrow
do, e.g. a laptop with a copied study folder). Files are replaced atomically by
the study's writer, so a study that is still running reads fine.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from study.results import (
    BOOKKEEPING,
    EPOCH_METRICS,
    KEYS,
    NOT_HYPERPARAMETERS,
    STATUSES,
    SUMMARY_METRICS,
    TABLES,
    VARIANT,
    best_trials,
    coerce,
)

# Columns every table is given, so that a table written before any trial
# reported an epoch (no best_* columns yet) or a missing table reads the same
# way as a full one.
COLUMNS = {
    "trials": ["trial_id", *VARIANT, "depth", "resolution", "loss", "status", "error", "epochs_run",
               "optuna_number", "best_epoch", *(f"best_{m}" for m in SUMMARY_METRICS),
               "val_gray_psnr", "test_gray_psnr"],
    "epochs": ["trial_id", "epoch", *EPOCH_METRICS, "seconds"],
    "previews": ["trial_id", "dataset", "resolution", "epoch", "image_index", "kind", "png"],
}


class NotAStudyError(Exception):
    """The folder holds neither study.json nor results/: nothing to analyse."""


@dataclass
class Study:
    folder: Path
    meta: dict
    trials: pd.DataFrame
    epochs: pd.DataFrame
    previews: pd.DataFrame
    warnings: list[str] = field(default_factory=list)
    present: dict[str, bool] = field(default_factory=dict)   # which tables exist on disk
    unreadable: set[str] = field(default_factory=set)        # tables that exist but could not be read

    @property
    def name(self) -> str:
        # Never the absolute path: the report must read the same wherever the folder was copied.
        return str(self.meta.get("name") or self.folder.name)

    def status_counts(self) -> dict[str, int]:
        counts = self.trials["status"].value_counts()
        return {s: int(counts.get(s, 0)) for s in STATUSES}

    def hyperparameters(self) -> list[str]:
        """Configuration columns that take more than one value among trials with results."""
        scored = self.trials.dropna(subset=["best_test_psnr"])
        config = [c for c in self.trials.columns if c not in {*BOOKKEEPING, *NOT_HYPERPARAMETERS}
                  and not c.startswith(("best_", "final_"))]
        return sorted(c for c in config if scored[c].astype(str).nunique() > 1)


def load_study(folder: str | Path) -> Study:
    folder = Path(folder)
    if not folder.is_dir():
        raise NotAStudyError(f"{folder} is not a folder")
    if not (folder / "study.json").is_file() and not (folder / "results").is_dir():
        raise NotAStudyError(f"{folder} is not a study folder: it has neither study.json nor results/ "
                             "(a study folder is what `python -m study.run` or study.local.run_local_study write)")
    warnings: list[str] = []
    meta = _read_meta(folder, warnings)
    present = {name: (folder / "results" / f"{name}.parquet").exists() for name in TABLES}
    before = len(warnings)
    tables, unreadable = {}, set()
    for name in TABLES:
        tables[name] = _read_table(folder, name, warnings)
        if present[name] and len(warnings) > before:
            unreadable.add(name)
        before = len(warnings)
    return Study(folder, meta, tables["trials"], tables["epochs"], tables["previews"], warnings, present,
                 unreadable)


def _read_meta(folder: Path, warnings: list[str]) -> dict:
    path = folder / "study.json"
    if not path.is_file():
        warnings.append("study.json is missing: the study's name and Optuna storage are unknown")
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        warnings.append(f"study.json is unreadable ({e}); carrying on without it")
        return {}
    return meta if isinstance(meta, dict) else {}


def _read_table(folder: Path, name: str, warnings: list[str]) -> pd.DataFrame:
    path = folder / "results" / f"{name}.parquet"
    df = None
    if not path.exists():  # previews.parquet is a folder of files (one per trial and epoch)
        warnings.append(f"results/{name}.parquet is missing: {_needs(name)} cannot be made")
    else:
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # a truncated copy, a foreign file: report it, analyse the rest
            warnings.append(f"results/{name}.parquet is unreadable ({type(e).__name__}: {e}): "
                            f"{_needs(name)} cannot be made")
    df = pd.DataFrame() if df is None else df
    for column in COLUMNS[name]:
        if column not in df.columns:
            df[column] = pd.Series(dtype=object if column in ("png", "error") else float)
    # Sorted once here so every figure and table iterates in the same order on every run.
    return coerce(name, df.sort_values(KEYS[name], kind="stable").reset_index(drop=True))


def _needs(name: str) -> str:
    return {"trials": "tables, curves and hyperparameter plots",
            "epochs": "learning curves and the pruning picture",
            "previews": "visual grids"}[name]


# ------------------------------------------------------------------ variants


def best_per_variant(trials: pd.DataFrame) -> pd.DataFrame:
    """The trial with the highest best_val_psnr of each variant, sorted by variant.

    Ranked by PSNR in RGB, never by loss: RGB and UV losses are in different
    spaces. Ties go to the smaller trial id, so reruns pick the same trial.
    """
    return best_trials(trials, VARIANT)


def variants(trials: pd.DataFrame) -> list[tuple[str, str, str]]:
    return sorted({tuple(map(str, v)) for v in trials[list(VARIANT)].dropna().itertuples(index=False)})


def variant_label(variant) -> str:
    return " / ".join(map(str, variant))


def slug(*parts) -> str:
    """A file-name part: letters, digits, ".", "_", "-" kept; anything else becomes '-'."""
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(p)).strip("-") or "x" for p in parts)

