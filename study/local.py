"""A study without Ray: run trial configs one after another into the results contract.

For tests, laptops and the GPU machine (which has no Ray). The real study
(``study.run``) writes the same tables through Ray Tune.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from study.config import TrialConfig
from study.engine import device_name, grayscale_rule, original_previews, pick_device, run_trial, trial_splits
from study.results import ResultsWriteError, ResultsWriter, epoch_row, png_files, preview_rows, trial_row, write_json


def run_local_study(folder: str | Path, configs: list[TrialConfig], *, data_root=None, cache_dir=None,
                    device=None, log=print) -> list[str]:
    """Train each config; checkpoints go to ``<folder>/checkpoints/<trial id>``. Returns trial ids.

    A trial that fails is an ERROR row and the study goes on; a results write that fails
    (``ResultsWriteError``) stops the study, keeping what was written.
    """
    folder = Path(folder).resolve()
    writer = ResultsWriter(str(folder))
    write_json(str(folder), "study.json", {"name": folder.name, "space": "local", "runner": "study.local",
                                           "grayscale": grayscale_rule()})
    dev = pick_device(device)
    splits_by_key: dict[tuple, object] = {}
    ids = []
    for n, cfg in enumerate(configs):
        trial_id = f"local_{n:05d}"
        config = {**cfg.to_dict(), "resolution": cfg.image_size}
        rel = f"checkpoints/{trial_id}"  # relative to the study folder, so a copied study still works
        ckpt = folder / rel
        history: list[dict] = []
        t0 = time.time()
        meta = {"device": device_name(dev), "node_id": "local", "started_at": t0}

        def report(row: dict, ckpt_folder: Path | None) -> None:
            history.append(row)
            writer.add_epochs(trial_id, [epoch_row(trial_id, row)])
            # No folder: no checkpoint this epoch (study.engine.trial writes one only when it matters).
            if ckpt_folder is not None:
                writer.add_previews(preview_rows(trial_id, config, row["epoch"], png_files(ckpt_folder)))
                if row["best_epoch"] == row["epoch"]:  # keep the best epoch's model, as the Ray runner does
                    shutil.rmtree(ckpt, ignore_errors=True)
                    shutil.copytree(ckpt_folder, ckpt)
            writer.stage("trials", [trial_row(trial_id, config, "RUNNING", history, wall_time_s=time.time() - t0,
                                              checkpoint_path=rel if ckpt.exists() else "",
                                              finished_at=time.time(), **meta)])
            writer.flush()

        try:
            splits = _splits(splits_by_key, cfg, data_root, cache_dir)
            _write_originals(writer, config, splits, cfg.preview_count)
            # Temporary checkpoint folders inside the study folder this command owns, not wherever it was started.
            run_trial(cfg, data_root=data_root, cache_dir=cache_dir, device=device, report=report, log=log,
                      splits=splits, work_dir=folder)
            status, error = "DONE", None
        except ResultsWriteError:
            raise  # the results cannot be kept: going on would compute what is then lost
        except Exception as e:  # a failed trial is a result, the study goes on
            status, error = "ERROR", f"{type(e).__name__}: {e}"
        writer.stage("trials", [trial_row(trial_id, config, status, history, error=error,
                                          wall_time_s=time.time() - t0, finished_at=time.time(),
                                          checkpoint_path=rel if history and ckpt.exists() else "", **meta)])
        writer.flush()
        ids.append(trial_id)
    return ids


def _splits(cache: dict, cfg: TrialConfig, data_root, cache_dir):
    """Each dataset decoded once per study, not once per trial."""
    key = (cfg.dataset, cfg.image_size, cfg.train_limit, cfg.eval_limit)
    if key not in cache:
        cache[key] = trial_splits(cfg, data_root, cache_dir)
    return cache[key]


def _write_originals(writer: ResultsWriter, config: dict, splits, count: int) -> None:
    """The test images and their grayscale inputs, once per (dataset, resolution): trials write predictions only."""
    if not writer.has_originals(config["dataset"], config["resolution"]):
        writer.add_previews(preview_rows("", config, 0, original_previews(splits.test, count)))
