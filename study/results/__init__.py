"""The results store: the results contract (table names, columns and their types, statuses, the
best-epoch rule and the gain over grayscale) and its Parquet writer and readers for a study folder
on a local disk or an object store. Imports neither torch nor Ray: ``analysis`` reads through it.

The contract imports nothing heavy; the store's names load pandas and pyarrow when first used, so a
command that only validates its options never pays for them.
"""
from study.results.contract import (BOOKKEEPING, CURVE_TEMPERATURES, EPOCH_METRICS, FINISHED, KEYS,
                                    NOT_HYPERPARAMETERS, OBJECTIVES, STATUSES, SUMMARY_METRICS, TABLES, VARIANT,
                                    best_row, best_trials, coerce, curve_column, curve_key, default_trial,
                                    epoch_gain, gain)

# Name -> the module that defines it, loaded when the name is first used.
STORE = {**dict.fromkeys(("ResultsWriteError", "is_local", "resolve", "write_bytes"), "files"),
         **dict.fromkeys(("ResultsWriter", "epoch_row", "png_files", "preview_rows", "read_json", "read_table",
                          "trial_row", "write_json"), "store")}


def __getattr__(name: str):
    if name in STORE:
        import importlib
        return getattr(importlib.import_module(f"study.results.{STORE[name]}"), name)
    raise AttributeError(f"module 'study.results' has no attribute {name!r}")


__all__ = ["BOOKKEEPING", "CURVE_TEMPERATURES", "EPOCH_METRICS", "FINISHED", "KEYS", "NOT_HYPERPARAMETERS",
           "OBJECTIVES", "ResultsWriteError", "ResultsWriter", "STATUSES", "SUMMARY_METRICS", "TABLES",
           "VARIANT", "best_row", "best_trials", "coerce", "curve_column", "curve_key", "default_trial",
           "epoch_gain", "epoch_row", "gain", "is_local", "png_files", "preview_rows", "read_json", "read_table",
           "resolve", "trial_row", "write_bytes", "write_json"]
