"""One colorization trial: build everything from a TrialConfig, train, evaluate each epoch.

A trial is the training loop (study.engine.loop) with one member: the same loop, loss, evaluation,
checkpoint format and epoch rows as a fused pack (study.engine.pack), its checkpoint at the folder's
root. No Ray or Optuna here: ``report(row, checkpoint_dir)`` is how a caller (the CLI, or the study's
Ray trainable) receives each epoch's metrics and, on the epochs that write one, a checkpoint folder.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from study.config import TrialConfig
from study.engine.checkpoints import TRIAL, Report
from study.engine.loop import RunOptions, run_members
from study.engine.losses import NonFiniteLossError
from study.results import best_row


def run_trial(cfg: TrialConfig, report: Report | None = None, options: RunOptions | None = None,
              **fields) -> list[dict]:
    """Train ``cfg`` for ``cfg.epochs`` epochs (continuing from ``options.resume_from``); returns the epoch rows.

    ``fields``: RunOptions' fields as keywords, instead of or over ``options``. ``report(row, folder)`` is
    called once per epoch; ``folder`` is a temporary checkpoint folder under the work folder (default: the
    current one) on epochs that write one (see CHECKPOINT_EVERY), else None. The folder is removed once
    ``report`` returns, also on error. A trial whose training loss stops being finite raises
    NonFiniteLossError (``report`` does not see that epoch).
    """
    options = replace(options or RunOptions(), **fields)

    def each(rows: dict[int, dict], folder: Path | None) -> None:
        row = rows[0]
        if "error" in row:
            raise NonFiniteLossError(row["error"])
        if report is not None:
            report(row, folder)

    (member,) = run_members([cfg], each, options, TRIAL)
    return member.history


def summarize(history: list[dict]) -> dict:
    best = best_row(history)
    return {"best_epoch": best["epoch"], "best_val_psnr": best["val_psnr"], "best_test_psnr": best["test_psnr"],
            "gray_val_psnr": best["val_gray_psnr"], "epochs": len(history)}
