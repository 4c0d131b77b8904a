"""One colorization trial: build everything from a TrialConfig, train, evaluate each epoch.

A trial is the training loop (study.engine) with one member: the same loop, checkpoint format,
evaluation and epoch rows as a fused pack (study.engine.pack), at the cost of a plain single-model step
(docs/throughput.md). No Ray or Optuna here: ``report(row, checkpoint_dir)`` is how a caller (the
CLI, or the study's Ray trainable) receives each epoch's metrics and, on the epochs that write one,
a checkpoint folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from study.config import TrialConfig
from study.engine.checkpoints import Report
from study.engine.data import Splits
from study.engine.loop import run_members
from study.results import best_row


def run_trial(cfg: TrialConfig, *, data_root: str | None = None, cache_dir: str | Path | None = None,
              device: str | None = None, report: Report | None = None, resume_from: Path | str | None = None,
              splits: Splits | None = None, log: Callable[[str], None] = print,
              work_dir: str | Path | None = None, checkpoint_now: Callable[[], bool] | None = None) -> list[dict]:
    """Train ``cfg`` for ``cfg.epochs`` epochs (continuing from ``resume_from``); returns the epoch rows.

    ``report(row, folder)`` is called once per epoch; ``folder`` is a temporary checkpoint folder under
    ``work_dir`` (default: the current directory) on epochs that write one (see CHECKPOINT_EVERY), else
    None. The folder is removed once ``report`` returns, also on error. A trial whose training loss stops
    being finite raises NonFiniteLossError.
    """
    def each(rows: dict[int, dict], folder: Path | None) -> None:
        report(rows[0], folder)

    (member,) = run_members([cfg], single=True, data_root=data_root, cache_dir=cache_dir, device=device,
                            report=each if report is not None else None, resume_from=resume_from, splits=splits,
                            log=log, work_dir=work_dir, checkpoint_now=checkpoint_now)
    return member.history


def summarize(history: list[dict]) -> dict:
    best = best_row(history)
    return {"best_epoch": best["epoch"], "best_val_psnr": best["val_psnr"], "best_test_psnr": best["test_psnr"],
            "gray_val_psnr": best["val_gray_psnr"], "epochs": len(history)}
