"""Which model ``study.colorize`` uses: the study's trials, the trial it picks (the best DONE one unless
``--trial`` names another), its checkpoint (local or on an object store, loaded with weights_only: no
pickled code runs) and the device."""
from __future__ import annotations

import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd
import pyarrow.fs as pafs
import torch

from study.cli import ProjectError
from study.urls import masked
from study.config import TrialConfig
from study.engine import CHECKPOINT_FILE, bins_of, build_unet, load_checkpoint, pick_device
from study.results import best_row, default_trial, read_table, resolve

EXIT_NO_MODEL = 2


class ColorizeError(ProjectError, RuntimeError):
    """No usable study, trial, checkpoint or model, or a refused --out (exit status 2); the message names it."""
    exit_status = EXIT_NO_MODEL



# ---------------------------------------------------------------- study, trial, checkpoint


@dataclass
class Loaded:
    model: torch.nn.Module   # in eval mode, on the device
    cfg: TrialConfig
    row: pd.Series           # the trial's row of the trials table
    epoch: int | None        # the epoch the checkpoint was saved after
    location: str            # where the checkpoint was read from


def load_model(study: str, dataset: str | None, trial_id: str | None, device: torch.device) -> Loaded:
    """The chosen trial's model, rebuilt from the config saved with its weights. ``study`` is a study folder (or
    URL), or the folder of one trial run by ``python -m study.trial --out DIR``."""
    folder = trial_folder(study)
    if folder is not None:
        state, location = read_checkpoint(str(folder.resolve()), study)
        row = trial_folder_row(state, folder, study, dataset, trial_id)
    else:
        row = pick_trial(read_trials(study), study, dataset, trial_id)
        state, location = read_checkpoint(row["checkpoint_path"], study)
    try:
        cfg = TrialConfig.from_dict(state["config"])
        # A classification head's bins are saved with its weights; they size its head.
        model = build_unet(cfg.model, cfg.image_size, bins_of(state["model"]))
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ColorizeError(f"the checkpoint of trial {row['trial_id']} ({location}) does not "
                            f"hold a model this code can rebuild: {type(e).__name__}: {e}") from e
    return Loaded(model.to(device).eval(), cfg, row, state.get("epoch"), location)


def trial_folder(study: str) -> Path | None:
    """The checkpoint folder when ``study`` is a single trial's folder (``study.trial --out DIR``: DIR/checkpoint)
    or a checkpoint folder itself, not a study; else None."""
    root = Path(study)
    if "://" in study or (root / "results").exists() or (root / "study.json").exists():
        return None
    return next((f for f in (root / "checkpoint", root) if (f / CHECKPOINT_FILE).is_file()), None)


def trial_folder_row(state: dict, folder: Path, study: str, dataset: str | None, trial_id: str | None) -> pd.Series:
    """A trials-table row for a single trial's checkpoint, from the history saved with it."""
    folder = folder.resolve()
    name = folder.parent.name if folder.name == "checkpoint" else folder.name   # study.trial's --out folder
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    if trial_id is not None and trial_id != name:
        raise ColorizeError(f"{study} is the folder of one trial ({name}), not a study: leave --trial out")
    if dataset is not None and config.get("dataset") != dataset:
        raise ColorizeError(f"{study} is the folder of one trial of dataset {config.get('dataset')!r}, not "
                            f"{dataset!r}: leave --dataset out, or give a study")
    history = [r for r in state.get("history") or [] if isinstance(r, dict)]
    best = best_row(history) if history else {}
    return pd.Series({"trial_id": name, "status": state.get("status") or "trial", "dataset": config.get("dataset"),
                      "output": config.get("output"), "best_val_psnr": best.get("val_psnr"),
                      "val_gray_psnr": best.get("val_gray_psnr"), "best_epoch": best.get("epoch"),
                      "checkpoint_path": str(folder)})


def read_trials(study: str) -> pd.DataFrame:
    from study.driver import check_storage, check_storage_url

    if check_storage_url(study, "--study") != "local":   # the storage rule of study.run, probed read-only
        check_storage(study, study, write=False, option="--study")
    elif Path(study).exists() and not Path(study).is_dir():
        raise ColorizeError(f"--study {study} is a file, not a folder; give a study folder or a trial's folder")
    elif not Path(study).is_dir():
        raise ColorizeError(f"study folder {study} does not exist")
    try:
        trials = read_table(study, "trials")
    except Exception as e:  # unreachable store, corrupt Parquet
        raise ColorizeError(f"cannot read {masked(study)}/results/trials.parquet: "
                            f"{masked(f'{type(e).__name__}: {e}')}") from e
    if trials is None or trials.empty:
        raise ColorizeError(f"{study} has no trials (no results/trials.parquet) and no checkpoint: give a study "
                            f"folder, or the --out folder of python -m study.trial")
    return trials


def pick_trial(trials: pd.DataFrame, study: str, dataset: str | None, trial_id: str | None) -> pd.Series:
    """The trial named (any status), else the best by best_val_psnr among the DONE trials with a checkpoint
    (of ``dataset``).

    A PRUNED trial was stopped because it looked worse than others, a RUNNING one has not finished and
    an ERROR one failed: none is used unless ``--trial`` names it.
    """
    rows = trials
    if trial_id is not None:
        rows = rows[rows["trial_id"] == trial_id]
        if rows.empty:
            raise ColorizeError(f"study {study} has no trial {trial_id!r}; it has {_some(trials['trial_id'])}")
    if dataset is not None:
        rows = rows[rows["dataset"] == dataset]
        if rows.empty:
            raise ColorizeError(f"study {study} has no trial{' ' + trial_id if trial_id else ''} of dataset "
                                f"{dataset!r}; its datasets: {_some(trials['dataset'].unique())}")
    if trial_id is not None:
        row = default_trial(rows, done_only=False)
        if row is None:
            raise ColorizeError(f"trial {trial_id} of study {study} has no checkpoint (it never finished an epoch)")
        return row
    row = default_trial(rows[rows["status"] == "DONE"])   # the contract's rule, among finished trials only
    if row is not None:
        return row
    of = f" of dataset {dataset}" if dataset else ""
    counts = ", ".join(f"{n} {s}" for s, n in rows["status"].value_counts().sort_index().items())
    other = default_trial(rows, done_only=False)
    if other is None:
        raise ColorizeError(f"no trial{of} of study {study} has finished (DONE) and none has a checkpoint "
                            f"({counts}): run the study until a trial finishes")
    raise ColorizeError(f"no trial{of} of study {study} has finished (DONE) ({counts}): there is no finished model "
                        f"to use. To use an unfinished one anyway, name it: --trial {other['trial_id']} "
                        f"(the best with a checkpoint: {other['status']}, {_epochs(other)}, best val PSNR "
                        f"{_db(other.get('best_val_psnr'))})")


def _epochs(row: pd.Series) -> str:
    n = row.get("epochs_run")
    return "? epochs" if n is None or pd.isna(n) else f"{int(n)} epoch{'s' * (int(n) != 1)}"


def _db(value) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{float(value):.2f} dB"


def _some(values, n: int = 10) -> str:
    values = sorted(map(str, values))
    return ", ".join(values[:n]) + (f" and {len(values) - n} more" if len(values) > n else "")


def read_checkpoint(recorded: str, study: str) -> tuple[dict, str]:
    """The checkpoint dict, loaded with weights_only (no pickled code runs), and where it was found.

    A folder on a remote file system (s3://...) is copied to a temporary folder first.
    """
    fs, folder = locate_checkpoint(recorded, study)
    location = folder if isinstance(fs, pafs.LocalFileSystem) else f"{fs.type_name}://{folder}"
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            return load_checkpoint(folder), location
        # torch.load needs a local file; the folder is small (weights and a few previews).
        with tempfile.TemporaryDirectory(prefix="colorize-ckpt-") as tmp:
            pafs.copy_files(folder, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            return load_checkpoint(tmp), location
    except pickle.UnpicklingError as e:
        # torch's message is a page of advice; the line naming the refused global is the news.
        reason = next((line for line in str(e).splitlines() if "Unsupported global" in line), None)
        if reason is None:   # not a pickle of objects at all: damaged, or some other file
            raise ColorizeError(f"{location}/{CHECKPOINT_FILE} is not a checkpoint (it is not a file PyTorch "
                                f"saved: damaged or replaced); rerun the trial, or name another with --trial") from e
        reason = reason.split(" Please use")[0]
        raise ColorizeError(f"refusing checkpoint {location}/{CHECKPOINT_FILE}: it holds more than tensors and "
                            f"plain values, and loading it would run pickled code ({reason.strip()})") from e
    except Exception as e:
        raise ColorizeError(f"{location}/{CHECKPOINT_FILE} is not a checkpoint this project can read "
                            f"({type(e).__name__}: {e}); rerun the trial, or name another with --trial") from e


def locate_checkpoint(recorded: str, study: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, folder) holding the checkpoint: the recorded place, else the same tail in the study.

    A relative path is relative to the study folder (the Ray runner records its checkpoints so).
    A study folder copied to another machine keeps its checkpoints but not their recorded
    absolute paths: ``/old/home/s1/checkpoints/t1`` is found as ``<study>/checkpoints/t1``.
    """
    study_fs, root = _resolve(study)
    if "://" in recorded or PurePosixPath(recorded).is_absolute():
        fs, folder = _resolve(recorded)
    else:
        fs, folder = study_fs, f"{root.rstrip('/')}/{recorded}"
    errors: list[str] = []
    if _has_checkpoint(fs, folder, errors):
        return fs, folder
    parts = [p for p in PurePosixPath(folder).parts if p != "/"]
    for i in range(len(parts)):  # the longest tail first
        candidate = "/".join([root.rstrip("/"), *parts[i:]])
        if _has_checkpoint(study_fs, candidate, errors):
            return study_fs, candidate
    detail = f" (reading failed: {errors[0]})" if errors else ""
    raise ColorizeError(f"checkpoint {recorded}/{CHECKPOINT_FILE} does not exist, nor does a folder with that "
                        f"path's tail under the study folder {study}{detail}")


def _resolve(location: str) -> tuple[pafs.FileSystem, str]:
    try:
        return resolve(location)
    except Exception as e:  # unknown scheme, malformed URI
        raise ColorizeError(f"cannot open {masked(location)}: {type(e).__name__}: {masked(str(e))}") from e


def _has_checkpoint(fs: pafs.FileSystem, folder: str, errors: list[str]) -> bool:
    try:
        return fs.get_file_info(f"{folder}/{CHECKPOINT_FILE}").type == pafs.FileType.File
    except OSError as e:  # e.g. no credentials for a bucket: said in the final message
        errors.append(f"{type(e).__name__}: {e}")
        return False


def choose_device(name: str | None) -> torch.device:
    try:
        device = pick_device(name)
    except RuntimeError as e:
        raise ColorizeError(f"--device {name}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ColorizeError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device
