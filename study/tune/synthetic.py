"""A synthetic trial: the engine's epoch rows from a generated curve, at a chosen rate, with no training.

A space with ``synthetic: {epoch_seconds: s}`` (study.space) makes the trainable call ``run_trial`` here
instead of the engine's: everything else in the study is real (Tune, the Optuna searcher and pruner,
the results writer and callback, progress, the time budget, checkpoints and resume). It measures what
the driver costs per result (``python -m study.bench --parts driver``).

The curve is a function of the configuration alone (its hash seeds it): a resumed trial reports the
same values it would have, and two studies of the same space report the same curves. With
``synthetic: {replay: <table>}`` the curve is instead the recorded one of the configuration's nearest
neighbour in a curves table (study.space.nearest_rows): real figures and recorded ``seconds``, to compare
search strategies through the real driver. No torch here (a replayed failure raises the engine's error).
What each result costs the driver is measured by study.tune.timings.
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

CHECKPOINT_FILE = "synthetic.json"
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
