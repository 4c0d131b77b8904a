"""One colorization trial: build everything from a TrialConfig, train, evaluate each epoch.

A trial is the training loop (study.engine) with one member: the same loop, checkpoint format,
evaluation and epoch rows as a fused pack (study.pack), at the cost of a plain single-model step
(docs/throughput.md). No Ray or Optuna here: ``report(row, checkpoint_dir)`` is how a caller (the
CLI, or the study's Ray trainable) receives each epoch's metrics and, on the epochs that write one,
a checkpoint folder.

The engine's parts live by concept (study.device, study.optim, study.losses, study.evaluation,
study.checkpoints, study.fused, study.engine); the names callers use are importable from here too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from study.checkpoints import (CHECKPOINT_EVERY, CHECKPOINT_FILE, CHECKPOINT_SECONDS, Report, checkpoint_due,
                               checkpoint_folder, keep_checkpoint, load_checkpoint, rng_states, set_rng_states,
                               sweep_stale_checkpoints)
from study.config import TrialConfig
from study.contract import best_row
from study.data import Splits
from study.device import (BF16_MIN_PIXELS, COMPILE_ENV, DEVICE_HELP, autocast_for, compile_mode, compiled,
                          device_name, pick_device, resolve_precision)
from study.engine import TrialSetup, prepare_trial, run_members, trial_splits
from study.evaluation import (EvalSplit, batch_sums, eval_batch_size, evaluate, evaluate_sums, original_previews,
                              png_bytes, predict, prediction_pngs, write_previews)
from study.losses import HUBER_DELTA, NonFiniteLossError, chroma_weights, loss_fn, make_loss_step
from study.optim import WeightAverage, make_optimizer, make_scheduler

__all__ = ["BF16_MIN_PIXELS", "CHECKPOINT_EVERY", "CHECKPOINT_FILE", "CHECKPOINT_SECONDS", "COMPILE_ENV",
           "DEVICE_HELP", "EvalSplit", "HUBER_DELTA", "NonFiniteLossError", "Report", "TrialSetup", "WeightAverage",
           "autocast_for", "batch_sums", "checkpoint_due", "checkpoint_folder", "chroma_weights", "compile_mode",
           "compiled", "device_name", "eval_batch_size", "evaluate", "evaluate_sums", "keep_checkpoint",
           "load_checkpoint", "loss_fn", "make_loss_step", "make_optimizer", "make_scheduler", "original_previews",
           "pick_device", "png_bytes", "predict", "prediction_pngs", "prepare_trial", "resolve_precision",
           "rng_states", "run_trial", "set_rng_states", "summarize", "sweep_stale_checkpoints", "trial_splits",
           "write_previews"]


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
