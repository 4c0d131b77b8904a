"""A study without Ray: run trial configs one after another into the results contract.

For tests, laptops and the GPU machine (which has no Ray). The real study
(``study.run``) writes the same tables through Ray Tune.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from study.config import TrialConfig
from study.results import ResultsWriter, epoch_row, png_files, preview_rows, trial_row, write_json
from study.train import device_name, pick_device, run_trial


def run_local_study(folder: str | Path, configs: list[TrialConfig], *, data_root=None, cache_dir=None,
                    device=None, log=print) -> list[str]:
    """Train each config; checkpoints go to ``<folder>/checkpoints/<trial id>``. Returns trial ids."""
    folder = Path(folder).resolve()
    writer = ResultsWriter(str(folder))
    write_json(str(folder), "study.json", {"name": folder.name, "space": "local", "runner": "study.local"})
    dev = pick_device(device)
    ids = []
    for n, cfg in enumerate(configs):
        trial_id = f"local_{n:05d}"
        config = {**cfg.to_dict(), "resolution": cfg.image_size}
        rel = f"checkpoints/{trial_id}"  # relative to the study folder, so a copied study still works
        ckpt = folder / rel
        history: list[dict] = []
        t0 = time.time()

        def report(row: dict, ckpt_folder: Path) -> None:
            history.append(row)
            writer.upsert("epochs", [epoch_row(trial_id, row)])
            writer.add_previews(preview_rows(trial_id, config, row["epoch"], png_files(ckpt_folder)))
            if row["best_epoch"] == row["epoch"]:  # keep the best epoch's model, as the Ray runner does
                shutil.rmtree(ckpt, ignore_errors=True)
                shutil.copytree(ckpt_folder, ckpt)
            writer.upsert("trials", [trial_row(trial_id, config, "RUNNING", history, wall_time_s=time.time() - t0,
                                               device=device_name(dev), node_id="local", checkpoint_path=rel)])

        try:
            run_trial(cfg, data_root=data_root, cache_dir=cache_dir, device=device, report=report, log=log)
            status, error = "DONE", None
        except Exception as e:  # a failed trial is a result, the study goes on
            status, error = "ERROR", f"{type(e).__name__}: {e}"
        writer.upsert("trials", [trial_row(trial_id, config, status, history, error=error,
                                           wall_time_s=time.time() - t0, device=device_name(dev),
                                           node_id="local", checkpoint_path=rel if history else "")])
        ids.append(trial_id)
    return ids
