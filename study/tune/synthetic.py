"""A synthetic trial: the engine's epoch rows from a generated curve, at a chosen rate, with no training.

A space with ``synthetic: {epoch_seconds: s}`` (study.space) makes the trainable call ``run_trial`` here
instead of the engine's: everything else in the study is real (Tune, the Optuna searcher and pruner,
the results writer and callback, progress, the time budget, checkpoints and resume). It measures what
the driver costs per result (``python -m study.bench --parts driver``).

The curve is a function of the configuration alone (its hash seeds it): a resumed trial reports the
same values it would have, and two studies of the same space report the same curves. With
``synthetic: {replay: <table>}`` the curve is instead the recorded one of the configuration's nearest
neighbour in a curves table (study.space.nearest_rows): real figures and recorded ``seconds``, to compare
search strategies through the real driver. No torch here (a replayed failure raises the engine's error). ``DriverTimings`` and ``TimedPruningScheduler`` measure, in a synthetic study's
driver, what each result costs it.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from study.config import TrialConfig
from study.results import CURVE_TEMPERATURES, EPOCH_METRICS, best_row, curve_column
from study.tune.pruning import OptunaPruningScheduler

CHECKPOINT_FILE = "synthetic.json"
# A reported result's wall time (Unix seconds) as it left the trial: not in the results contract, so the
# epochs table leaves it out; the results callback measures report-to-row latency with it.
REPORTED_AT = "reported_at"
_NO_FOLDER = object()   # run_trial's work_dir for rows without checkpoint folders (synthetic_rows)
# The grayscale input's PSNR on both splits (dB): a fixed baseline, as a real dataset's is.
GRAY_PSNR = 22.0


def _unit(cfg: TrialConfig, salt: str) -> float:
    """A number in [0, 1) fixed by the configuration and ``salt``."""
    text = json.dumps({**cfg.to_dict(), "_": salt}, sort_keys=True, default=str)
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / float(1 << 48)


def curve_row(cfg: TrialConfig, epoch: int) -> dict:
    """Epoch ``epoch``'s metrics of ``cfg``'s curve: val PSNR rising towards a configuration's plateau
    (0.5 to 4.5 dB over the grayscale input) with a little per-epoch wobble; the other metrics follow it."""
    plateau = GRAY_PSNR + 0.5 + 4.0 * _unit(cfg, "plateau")
    rate = 0.15 + 0.5 * _unit(cfg, "rate")
    rise = 1.0 - math.exp(-rate * epoch)
    row = {"epoch": epoch}
    for split, shift in (("val", 0.0), ("test", -0.1)):
        psnr = GRAY_PSNR + (plateau - GRAY_PSNR) * rise + shift + 0.05 * (_unit(cfg, f"{split}{epoch}") - 0.5)
        row.update({f"{split}_loss": 0.02 * 10 ** (-(psnr - GRAY_PSNR) / 10), f"{split}_psnr": psnr,
                    f"{split}_ssim": min(0.7 + 0.05 * (psnr - GRAY_PSNR), 0.999),
                    f"{split}_colourfulness": 0.3 + 0.1 * rise, f"{split}_gray_psnr": GRAY_PSNR})
    row["train_loss"] = row["val_loss"] * 0.9
    if cfg.output == "uv-classes":   # a classification head's temperature curve, as the engine records it
        for split in ("val", "test"):
            for t in CURVE_TEMPERATURES:
                row[curve_column(split, "psnr", t)] = row[f"{split}_psnr"] - 0.2 * (1.0 - t)
                row[curve_column(split, "colourfulness", t)] = row[f"{split}_colourfulness"] * (1.5 - t)
    return row


def synthetic_rows(cfg: TrialConfig, replay: str | Path | None = None) -> list[dict]:
    """Every epoch row ``run_trial`` reports for ``cfg`` (none pruned), at once."""
    return run_trial(cfg, report=lambda row, folder: None, epoch_seconds=0, work_dir=_NO_FOLDER, log=lambda s: None,
                     replay=replay)


def replayed_rows(cfg: TrialConfig, table: str | Path) -> tuple[list[dict], str | None]:
    """The recorded epoch rows (contract metrics and recorded ``seconds``) of ``cfg``'s nearest configuration
    in the curves table ``table`` (study.space.replay), up to ``cfg.epochs``, and the error that ended the
    recorded curve there (None when it did not)."""
    from study.space import nearest_rows, read_curves

    rows, space = read_curves(table)
    values = cfg.to_dict()
    out, error = [], None
    for r in nearest_rows(rows, space, values).to_dict("records")[:cfg.epochs]:
        recorded = r.get("error") if isinstance(r.get("error"), str) and r.get("error") else None   # else None/NaN
        if recorded or not math.isfinite(float(r["val_psnr"])):
            error = recorded or "the recorded epoch has no figures"
            break
        out.append({"epoch": int(r["epoch"]), **{m: float(r[m]) for m in EPOCH_METRICS if m in r},
                    "seconds": float(r["seconds"])})
    return out, error


def _curve(cfg: TrialConfig, epoch_seconds: float, replay) -> tuple[list[dict], str | None]:
    """Every epoch row of ``cfg``'s curve (generated, or replayed from ``replay``), without the best-epoch
    keys, and the error that ends a replayed curve early."""
    if replay is not None:
        rows, error = replayed_rows(cfg, replay)
        return [{**r, "lr": cfg.lr, "precision": "fp32"} for r in rows], error
    return [{**curve_row(cfg, e), "lr": cfg.lr, "seconds": epoch_seconds, "precision": "fp32"}
            for e in range(1, cfg.epochs + 1)], None


def _read_epoch(folder: Path | str | None) -> int:
    if not folder:
        return 0
    return int(json.loads((Path(folder) / CHECKPOINT_FILE).read_text())["epoch"])


def run_trial(cfg: TrialConfig, *, report: Callable[[dict, Path | None], None], epoch_seconds: float,
              resume_from: Path | str | None = None, work_dir: Path | str | None = None,
              checkpoint_now: Callable[[], bool] | None = None, log: Callable[[str], None] = print,
              replay: str | Path | None = None) -> list[dict]:
    """Report ``cfg``'s epochs after ``resume_from``'s (a folder this wrote), one every ``epoch_seconds``,
    each with a checkpoint folder (a JSON of the epoch) as ``report(row, folder)`` of study.engine.run_trial
    receives them; returns the rows. Rows have the engine's keys (epoch, the metrics, lr, seconds,
    precision, best_val_psnr, best_epoch). ``replay``: a curves table whose nearest configuration's recorded
    rows are reported instead of generated ones; a recorded failure raises the engine's NonFiniteLossError
    after the epochs before it."""
    cfg.validate()
    start = _read_epoch(resume_from)
    if start:
        log(f"resumed from {resume_from} after epoch {start}")
    curve, error = _curve(cfg, epoch_seconds, replay)
    history = [dict(r) for r in curve[:start]]   # the best epoch so far counts them too
    work = Path(work_dir) if work_dir not in (None, _NO_FOLDER) else Path.cwd()
    due = time.monotonic()
    for row in curve[start:]:
        due += epoch_seconds
        time.sleep(max(due - time.monotonic(), 0.0))   # the rate holds however long reporting took
        row = dict(row)
        history.append(row)
        best = best_row(history)
        row.update(best_val_psnr=best["val_psnr"], best_epoch=best["epoch"])
        _report(row, report, work_dir is _NO_FOLDER, work)
    if error is not None:
        from study.engine import NonFiniteLossError
        raise NonFiniteLossError(f"replayed: {error}")
    return history


def _report(row: dict, report, no_folder: bool, work: Path) -> None:
    """One row to ``report``, with a checkpoint folder of its epoch unless ``no_folder``."""
    if no_folder:
        report(dict(row), None)
        return
    folder = work / f"synthetic-checkpoint-{row['epoch']:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        (folder / CHECKPOINT_FILE).write_text(json.dumps({"epoch": row["epoch"]}))
        report(dict(row), folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class DriverTimings:
    """What each result costs the driver, measured in the driver: from the moment the pruning scheduler
    gets it (the first of the project's hooks Tune calls for a result; then the searcher's, then the
    callbacks') to the end of the results callback's ``on_trial_result``; the callback's own part; and
    the report-to-row latency (``REPORTED_AT``). Written to ``<study>/driver_timings.json`` as the study
    ends. Only a synthetic study's driver keeps one (a real study's results would grow it without end)."""
    FILE = "driver_timings.json"

    def __init__(self):
        self._started: dict[str, float] = {}
        self.driver_ms: list[float] = []
        self.callback_ms: list[float] = []
        self.latency_ms: list[float] = []
        self.reported_at: list[float] = []

    def scheduler_got(self, trial_id: str) -> None:
        self._started[trial_id] = time.perf_counter()

    def callback_done(self, trial_id: str, result: dict, callback_started: float) -> None:
        end = time.perf_counter()
        started = self._started.pop(trial_id, callback_started)
        self.driver_ms.append(round((end - started) * 1e3, 4))
        self.callback_ms.append(round((end - callback_started) * 1e3, 4))
        if REPORTED_AT in result:
            self.reported_at.append(float(result[REPORTED_AT]))
            self.latency_ms.append(round((time.time() - float(result[REPORTED_AT])) * 1e3, 3))

    def record(self) -> dict:
        return {"driver_ms": self.driver_ms, "callback_ms": self.callback_ms, "latency_ms": self.latency_ms,
                "reported_at": self.reported_at}


class TimedPruningScheduler(OptunaPruningScheduler):
    """The study's pruning scheduler, noting when each result reaches it (``DriverTimings``). Ray pickles
    it without the timings: a resumed synthetic study runs untimed."""

    def __init__(self, searcher, driver, timings: DriverTimings | None):
        super().__init__(searcher, driver)
        self.timings = timings

    def __getstate__(self):
        return {**super().__getstate__(), "timings": None}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self.timings is not None:
            self.timings.scheduler_got(trial.trial_id)
        return super().on_trial_result(tune_controller, trial, result)
