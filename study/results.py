"""The results contract: Parquet tables in ``<study folder>/results/``.

Readers need only pandas + pyarrow::

    pd.read_parquet(f"{study}/results/trials.parquet")

Tables (one Parquet file each, replaced atomically on every write):

``trials``   one row per trial: ``trial_id``, every resolved config value as its
             own column (see ``study.config.TrialConfig``), ``status``
             (RUNNING/DONE/PRUNED/ERROR), ``error``, ``epochs_run``,
             ``best_epoch`` and ``best_*`` metrics (at the epoch of best val
             PSNR), ``final_*`` metrics (last epoch), ``wall_time_s``,
             ``device``, ``node_id``, ``checkpoint_path``, ``optuna_number``.
``epochs``   one row per (trial_id, epoch): losses in the model's own space
             and colour metrics in RGB (``EPOCH_METRICS``), ``seconds``.
``previews`` one row per (trial_id, epoch, image_index, kind): PNG bytes.
             ``kind`` is ``prediction`` for a trial's output, or ``original`` /
             ``grayscale`` (stored once per dataset+resolution, ``trial_id`` "",
             ``epoch`` 0). ``previews.parquet`` is a *folder* of Parquet files,
             one per (trial, epoch), each written once: rewriting all images
             on every epoch would cost gigabytes over a large study.
             ``pd.read_parquet`` reads the folder like a file.

``study.json`` beside ``results/`` holds the study's metadata (name, space,
Optuna storage URL and study name).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

RESULTS_DIR = "results"
TABLES = ("trials", "epochs", "previews")
KEYS = {
    "trials": ["trial_id"],
    "epochs": ["trial_id", "epoch"],
    "previews": ["trial_id", "dataset", "resolution", "epoch", "image_index", "kind"],
}
# Metrics a trial reports after every epoch (besides ``epoch`` and ``seconds``).
EPOCH_METRICS = (
    "train_loss", "val_loss", "test_loss",
    "val_psnr", "val_ssim", "val_colourfulness", "val_gray_psnr",
    "test_psnr", "test_ssim", "test_colourfulness", "test_gray_psnr",
)
# Copied into the trials table at the best (by val PSNR) and the final epoch.
SUMMARY_METRICS = ("val_psnr", "val_ssim", "val_colourfulness", "test_psnr",
                   "test_ssim", "test_colourfulness", "val_loss", "test_loss")
STATUSES = ("RUNNING", "DONE", "PRUNED", "ERROR")


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local folder or a pyarrow URI such as s3://bucket/x."""
    location = str(location)
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def _write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        # Write beside the target and rename: readers never see a partial file.
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:  # An object store's PUT is atomic already.
        with fs.open_output_stream(path) as f:
            f.write(data)


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:  # s3 raises OSError for a missing key in some versions
        if "does not exist" in str(e) or "NoSuchKey" in str(e) or "Path does not exist" in str(e):
            return None
        raise


def write_table(study: str, name: str, df: pd.DataFrame) -> None:
    fs, root = resolve(study)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
    _write_bytes(fs, f"{root}/{RESULTS_DIR}/{name}.parquet", buf.getvalue())


def read_table(study: str, name: str) -> pd.DataFrame | None:
    fs, root = resolve(study)
    path = f"{root}/{RESULTS_DIR}/{name}.parquet"
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type == pafs.FileType.Directory:  # previews: one file per (trial, epoch)
        if not _preview_files(fs, path):
            return None
        return pq.read_table(path, filesystem=fs).to_pandas()
    data = _read_bytes(fs, path)
    return None if data is None else pq.read_table(io.BytesIO(data)).to_pandas()


def _preview_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.base_name.endswith(".parquet") and i.base_name[0] not in "._")


def _preview_file(row: dict) -> str:
    if row["kind"] == "prediction":
        return f"t-{row['trial_id']}-e{int(row['epoch']):04d}.parquet"
    return f"o-{row['dataset']}-{int(row['resolution'])}.parquet"


def write_json(study: str, name: str, obj: dict) -> None:
    fs, root = resolve(study)
    _write_bytes(fs, f"{root}/{name}", json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(study: str, name: str) -> dict | None:
    fs, root = resolve(study)
    data = _read_bytes(fs, f"{root}/{name}")
    return None if data is None else json.loads(data)


def upsert(existing: pd.DataFrame | None, rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Rows replace existing rows with the same keys; order is by keys."""
    if existing is None or existing.empty:
        out = rows
    elif rows.empty:
        out = existing
    else:
        out = pd.concat([existing, rows], ignore_index=True)
    out = out.drop_duplicates(subset=keys, keep="last")
    return out.sort_values(keys, kind="stable").reset_index(drop=True)


class ResultsWriter:
    """Keeps ``trials`` and ``epochs`` in memory and rewrites a table whenever it changes;
    writes each (trial, epoch)'s previews once, as its own file.

    The only writer of a study's tables is the driver (one process), so an
    in-memory copy plus atomic replacement is consistent; rows are keyed, so a
    trial that re-reports an epoch after a restore replaces the row (or file).
    """

    def __init__(self, study: str):
        self.study = study
        self.tables = {name: read_table(study, name) for name in ("trials", "epochs")}
        self.fs, root = resolve(study)
        self.previews_dir = f"{root}/{RESULTS_DIR}/previews.parquet"
        self.preview_files = set(_preview_files(self.fs, self.previews_dir))

    def upsert(self, name: str, rows: list[dict]) -> None:
        if not rows:
            return
        df = pd.DataFrame(rows)
        self.tables[name] = upsert(self.tables[name], df, KEYS[name])
        write_table(self.study, name, self.tables[name])

    def add_previews(self, rows: list[dict]) -> None:
        by_file: dict[str, list[dict]] = {}
        for row in rows:
            by_file.setdefault(_preview_file(row), []).append(row)
        for name, group in sorted(by_file.items()):
            if name.startswith("o-") and name in self.preview_files:
                continue  # originals: once per dataset and resolution
            buf = io.BytesIO()
            df = pd.DataFrame(group).sort_values(KEYS["previews"], kind="stable")
            pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
            _write_bytes(self.fs, f"{self.previews_dir}/{name}", buf.getvalue())
            self.preview_files.add(name)

    def drop_epochs_after(self, trial_id: str, epoch: int) -> None:
        """Forget epochs a restored trial will run again (keeps tables consistent)."""
        df = self.tables["epochs"]
        if df is not None and not df.empty:
            stale = (df["trial_id"] == trial_id) & (df["epoch"] > epoch)
            if stale.any():
                self.tables["epochs"] = df[~stale].reset_index(drop=True)
                write_table(self.study, "epochs", self.tables["epochs"])
        prefix = f"t-{trial_id}-e"
        for name in sorted(self.preview_files):
            if name.startswith(prefix) and int(name[len(prefix):-len(".parquet")]) > epoch:
                self.fs.delete_file(f"{self.previews_dir}/{name}")
                self.preview_files.discard(name)


# ------------------------------------------------------------ row builders
# Shared by the Ray Tune callback and the sequential runner (study/local.py), so
# both write exactly the same contract.


def epoch_row(trial_id: str, row: dict) -> dict:
    out = {"trial_id": trial_id, "epoch": int(row["epoch"])}
    out.update({k: float(row[k]) for k in EPOCH_METRICS})
    out["seconds"] = float(row.get("seconds", float("nan")))
    return out


def preview_rows(trial_id: str, config: dict, epoch: int, files: dict[str, bytes]) -> list[dict]:
    """Rows for the PNGs a checkpoint folder holds (``<kind>_<index>.png``).

    Originals and grayscale inputs are keyed by dataset+resolution only, so a
    study stores them once however many trials write them.
    """
    rows = []
    for name, data in sorted(files.items()):
        kind, index = name[:-4].rsplit("_", 1)
        own = kind == "prediction"
        rows.append({"trial_id": trial_id if own else "", "dataset": config["dataset"],
                     "resolution": int(config["resolution"]), "epoch": int(epoch) if own else 0,
                     "image_index": int(index), "kind": kind, "png": data})
    return rows


def trial_row(trial_id: str, config: dict, status: str, history: list[dict], *, error: str | None = None,
              wall_time_s: float = float("nan"), device: str = "", node_id: str = "",
              checkpoint_path: str = "", optuna_number: int = -1) -> dict:
    assert status in STATUSES, status
    row = {"trial_id": trial_id, **config, "status": status, "error": error,
           "epochs_run": len(history), "wall_time_s": float(wall_time_s), "device": device,
           "node_id": node_id, "checkpoint_path": checkpoint_path, "optuna_number": int(optuna_number)}
    if history:
        best = max(history, key=lambda r: r["val_psnr"])
        final = history[-1]
        row["best_epoch"] = int(best["epoch"])
        for k in SUMMARY_METRICS:
            row[f"best_{k}"] = float(best[k])
            row[f"final_{k}"] = float(final[k])
        row["val_gray_psnr"] = float(final["val_gray_psnr"])
        row["test_gray_psnr"] = float(final["test_gray_psnr"])
    return row


def png_files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.png"))}
