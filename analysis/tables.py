"""The results table the original report lacked: every variant's best trial against the grayscale input."""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.load import best_per_variant

# (column in the results table, column of the best trial's row in the trials table)
FROM_TRIAL = (
    ("best_trial", "trial_id"), ("status", "status"), ("depth", "depth"), ("best_epoch", "best_epoch"),
    ("val_psnr", "best_val_psnr"), ("val_gray_psnr", "val_gray_psnr"),
    ("test_psnr", "best_test_psnr"), ("test_gray_psnr", "test_gray_psnr"),
    ("val_ssim", "best_val_ssim"), ("test_ssim", "best_test_ssim"),
    ("val_colourfulness", "best_val_colourfulness"), ("test_colourfulness", "best_test_colourfulness"),
)
COLUMNS = ("sampling", "output", "trials", "best_trial", "status", "depth", "best_epoch",
           "val_psnr", "val_gray_psnr", "val_gain_db", "test_psnr", "test_gray_psnr", "test_gain_db",
           "beats_grayscale", "val_ssim", "test_ssim", "val_colourfulness", "test_colourfulness")
EXPLANATION = (
    "One row per variant (sampling x output), represented by its trial with the highest validation PSNR; "
    "metrics are that trial's at its best epoch, PSNR in dB on RGB. `*_gray_psnr` is the grayscale input's "
    "PSNR against the original, `*_gain_db` the model's PSNR minus it; `beats_grayscale` is `yes` when the "
    "test gain is positive (a model that does not beat its own grayscale input is no colorizer). "
    "Colourfulness is a ratio to the originals' (1 = as colourful). Sorted by validation PSNR.")
# Columns shown with two decimals (dB, ratios, losses); other numbers are configuration values.
METRIC_SUFFIXES = ("psnr", "colourfulness", "loss", "_s", "seconds")
# Integers that turn into floats when a variant without results leaves a gap.
INTEGER_COLUMNS = ("trials", "depth", "best_epoch", "epochs_run")


def results_table(trials: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """One row per (sampling, output) of ``dataset``; variants without results yet are kept, last."""
    rows = trials[trials["dataset"] == dataset]
    keys = ["sampling", "output"]
    table = rows.groupby(keys).size().rename("trials").to_frame()
    best = best_per_variant(rows).set_index(keys)
    for column, source in FROM_TRIAL:
        table[column] = best[source]
    table["val_gain_db"] = table["val_psnr"] - table["val_gray_psnr"]
    table["test_gain_db"] = table["test_psnr"] - table["test_gray_psnr"]
    table["beats_grayscale"] = np.where(table["test_gain_db"].isna(), "n/a",
                                        np.where(table["test_gain_db"] > 0, "yes", "no"))
    table = table.reset_index().sort_values(["val_psnr", *keys], ascending=[False, True, True],
                                            na_position="last", kind="stable")
    return table[list(COLUMNS)].reset_index(drop=True)


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """A table as display strings: 2 decimals for dB and ratios, 3 for SSIM and importance, ints as ints."""
    def fmt(column: str, value) -> str:
        if isinstance(value, str):
            return value
        if value is None or pd.isna(value):
            return "n/a"
        if isinstance(value, (int, np.integer)) or column in INTEGER_COLUMNS:
            return str(int(value))
        if column.endswith("gain_db"):
            return f"{value:+.2f}"
        if column.endswith(("ssim", "importance")):
            return f"{value:.3f}"
        if column.endswith(METRIC_SUFFIXES):
            return f"{value:.2f}"
        return f"{value:g}"   # a configuration value (lr 0.0003, dropout 0.1): as written, not rounded away
    return pd.DataFrame({c: [fmt(c, v) for v in table[c]] for c in table.columns})
