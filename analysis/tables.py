"""The results table the original report lacked: every variant's best trial against the grayscale input."""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.load import best_per_variant
from study.results import gain

# (column in the results table, column of the best trial's row in the trials table)
FROM_TRIAL = (
    ("best_trial", "trial_id"), ("status", "status"), ("best_epoch", "best_epoch"),
    ("val_psnr", "best_val_psnr"), ("val_gray_psnr", "val_gray_psnr"),
    ("test_psnr", "best_test_psnr"), ("test_gray_psnr", "test_gray_psnr"),
    ("val_ssim", "best_val_ssim"), ("test_ssim", "best_test_ssim"),
    ("val_colourfulness", "best_val_colourfulness"), ("test_colourfulness", "best_test_colourfulness"),
)
# What matters first: the variant, its gain over the grayscale input, PSNR, colourfulness, status; then
# the rest of the evidence, then the best trial's configuration (``results_table``'s ``config``).
COLUMNS = ("sampling", "output", "test_gain_db", "val_gain_db", "val_psnr", "test_psnr",
           "val_colourfulness", "test_colourfulness", "beats_grayscale", "status", "best_trial", "trials",
           "best_epoch", "val_gray_psnr", "test_gray_psnr", "val_ssim", "test_ssim")
# The page shows these (it must fit a 1,300 px window); report.md and the CSV have every column.
HTML_COLUMNS = ("sampling", "output", "test_gain_db", "val_psnr", "test_psnr", "test_colourfulness", "status",
                "best_trial")
VARIANT_KEYS = ("dataset", "sampling", "output")
EXPLANATION = (
    "One row per variant (sampling x output), represented by its trial with the highest validation PSNR; "
    "metrics are that trial's at its best epoch, PSNR in dB on RGB. `*_gain_db` is the model's PSNR minus the "
    "grayscale input's (`*_gray_psnr`, the grayscale input's PSNR against the original); `beats_grayscale` "
    "is `yes` when the test gain is positive (a model that does not beat its own grayscale input is no "
    "colorizer). Colourfulness is a ratio to the originals' (1 = as colourful). Sorted by validation PSNR. "
    "The page shows the main columns; report.md and the CSV also have the grayscale PSNRs, SSIM and the best "
    "trial's configuration.")
# Columns shown with two decimals (dB, ratios, losses); other numbers are configuration values.
METRIC_SUFFIXES = ("psnr", "colourfulness", "loss", "_s", "seconds")
# Integers that turn into floats when a variant without results leaves a gap.
INTEGER_COLUMNS = ("trials", "depth", "best_epoch", "epochs_run")


def results_table(trials: pd.DataFrame, dataset: str, config: list[str] | tuple[str, ...] = ("depth",)) -> pd.DataFrame:
    """One row per (sampling, output) of ``dataset``; variants without results yet are kept, last.

    ``config``: configuration columns of the best trial, shown after the metrics (the variant's own
    are left out: they are its first columns).
    """
    rows = trials[trials["dataset"] == dataset]
    keys = ["sampling", "output"]
    table = rows.groupby(keys).size().rename("trials").to_frame()
    best = best_per_variant(rows).set_index(keys)
    for column, source in FROM_TRIAL:
        table[column] = best[source]
    table["val_gain_db"] = gain(best, "val")     # the contract's one formula of the gain
    table["test_gain_db"] = gain(best, "test")
    table["beats_grayscale"] = np.where(table["test_gain_db"].isna(), "n/a",
                                        np.where(table["test_gain_db"] > 0, "yes", "no"))
    extra = [c for c in dict.fromkeys(config) if c not in VARIANT_KEYS and c not in COLUMNS and c in best]
    for column in extra:
        table[column] = best[column]
    table = table.reset_index().sort_values(["val_psnr", *keys], ascending=[False, True, True],
                                            na_position="last", kind="stable")
    return table[[*COLUMNS, *extra]].reset_index(drop=True)


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
