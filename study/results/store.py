"""Writing and reading the results contract (``study.results.contract``) as Parquet in ``<study>/results/``.

Readers need only pandas + pyarrow::

    pd.read_parquet(f"{study}/results/trials.parquet")

``trials.parquet`` is one file, replaced atomically. ``epochs.parquet`` and
``previews.parquet`` are *folders* of Parquet files, one per (trial, epoch),
each written once (rewriting a whole table on every epoch costs bytes that grow
with the square of the study's size, and a full PUT each time on s3://);
``pd.read_parquet`` reads such a folder like a file. A study written before
epochs became a folder (one ``epochs.parquet`` file) still reads, and its
first writer converts it.

``study.json`` beside ``results/`` holds the study's metadata.

Writing (``ResultsWriter``; the driver is the only writer of a study):

- ``add_epochs(trial_id, rows)`` writes each (trial, epoch) file at once
  (rows from ``epoch_row``); a re-reported epoch replaces its file.
- ``stage("trials", rows)`` changes the in-memory trials table only;
  ``flush()`` writes each table staged since the last flush, once. Call it
  once at the end of every event (a reported epoch, a finished trial), so
  ``trials.parquet`` is rewritten at most once per event.
  ``upsert("trials", rows)`` is ``stage`` + ``flush``.
- ``add_previews(rows)``: one file per (trial, epoch); originals once per
  (dataset, resolution).
- ``drop_epochs_after(trial_id, epoch)``: forget epochs a restored trial will
  run again (their epoch and preview files).
- ``history(trial_id)``: the trial's epoch rows, in order.

A failed write (folder unwritable, disk full, bucket gone) raises
``ResultsWriteError`` naming the file and the cause; the file keeps its last
good version and no temporary is left behind, so ``--resume`` continues once
the cause is fixed. Files are created with the process's umask (a team can
read a shared study).
"""
from __future__ import annotations

import io
import json
import os
import re
import secrets
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from study.cli import ProjectError
from study.results.contract import (
    CURVE_METRICS,
    EPOCH_METRICS,
    KEYS,
    RESULTS_DIR,
    STATUSES,
    SUMMARY_METRICS,
    best_row,
    coerce,
)

# Every epoch file has this schema, so the folder always reads as one table.
EPOCH_SCHEMA = pa.schema([("trial_id", pa.string()), ("epoch", pa.int64()),
                          *((m, pa.float64()) for m in EPOCH_METRICS), ("seconds", pa.float64()),
                          *((m, pa.float64()) for m in CURVE_METRICS), ("precision", pa.string())])


class ResultsError(ProjectError, RuntimeError):
    """A study's results cannot be read or written; the message names the file and what to do."""
    exit_status = 2


class ResultsWriteError(ResultsError):
    # Raised mid-study: work was partly done (and kept), hence 1 rather than 2.
    exit_status = 1


class ResultsReadError(ResultsError):
    pass


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local folder or a pyarrow URI such as s3://bucket/x."""
    location = str(location)
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def _write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    parent, base = path.rsplit("/", 1)
    try:
        fs.create_dir(parent, recursive=True)
        if isinstance(fs, pafs.LocalFileSystem):
            _write_local(parent, base, data)
        else:  # An object store's PUT is atomic already.
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as e:
        cause = e.strerror or str(e)
        raise ResultsWriteError(
            f"cannot write {path}: {cause}. The results written so far are kept (this file keeps its last "
            f"good version); free space or make {parent} writable, then continue the study with --resume") from e


def _write_local(parent: str, base: str, data: bytes) -> None:
    # Written beside the target and renamed: readers never see a partial file. os.open with 0o666
    # lets the umask decide the mode (mkstemp would make it 0600: unreadable for the rest of a team).
    # The dot prefix hides the temporary from Parquet dataset readers.
    tmp = f"{parent}/.tmp-{secrets.token_hex(6)}-{base}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # a full disk shows here, before the old version is replaced
        os.replace(tmp, f"{parent}/{base}")
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


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


def _parquet_bytes(df: pd.DataFrame, schema: pa.Schema | None = None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False), buf)
    return buf.getvalue()


def _table_path(study: str, name: str) -> tuple[pafs.FileSystem, str]:
    fs, root = resolve(study)
    return fs, f"{root}/{RESULTS_DIR}/{name}.parquet"


def write_table(study: str, name: str, df: pd.DataFrame) -> None:
    """Replace a one-file table (``trials``) atomically."""
    fs, path = _table_path(study, name)
    _write_bytes(fs, path, _parquet_bytes(coerce(name, df)))


def read_table(study: str, name: str) -> pd.DataFrame | None:
    """The table as pandas (None when it does not exist yet), in the contract's column types.

    Raises ``ResultsReadError`` naming the file when it is not readable Parquet.
    """
    fs, path = _table_path(study, name)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return None
        if info.type == pafs.FileType.Directory:  # one file per (trial, epoch)
            if not _data_files(fs, path):
                return None
            # Epoch files written before a column was added read with it empty (the one schema).
            df = pq.read_table(path, filesystem=fs, schema=EPOCH_SCHEMA if name == "epochs" else None).to_pandas()
        else:
            data = _read_bytes(fs, path)
            if data is None:
                return None
            df = pq.read_table(io.BytesIO(data)).to_pandas()
    except (pa.ArrowException, OSError) as e:
        # pyarrow names the in-memory buffer ('<Buffer>'), not the file: say which file it was.
        cause = re.sub(r"^.*'<Buffer>':\s*", "", str(e))
        raise ResultsReadError(
            f"{path} is not a readable Parquet table ({cause}). Restore it from a copy, or move it aside to "
            f"continue without the rows it held") from e
    if name in KEYS and not df.empty and all(k in df for k in KEYS[name]):
        df = df.sort_values(KEYS[name], kind="stable").reset_index(drop=True)
    return coerce(name, df)


def _data_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError as e:
        raise ResultsReadError(f"cannot list {folder}: {e.strerror or e}; it must be a folder of Parquet files "
                               f"(move away whatever is there)") from e
    return sorted(i.base_name for i in infos if i.base_name.endswith(".parquet") and i.base_name[0] not in "._")


def _epoch_file(trial_id: str, epoch: int) -> str:
    return f"t-{trial_id}-e{int(epoch):04d}.parquet"


_EPOCH_FILE = re.compile(r"^t-(.+)-e(\d+)\.parquet$")   # (trial id, epoch) of a per-(trial, epoch) file


def _epoch_bytes(row: dict) -> bytes:
    # Straight to Arrow with the fixed schema and no pandas metadata: a few kB per epoch, not ten.
    table = pa.Table.from_pylist([{f.name: row.get(f.name) for f in EPOCH_SCHEMA}], schema=EPOCH_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _records(df: pd.DataFrame | None) -> list[dict]:
    return [] if df is None else df.to_dict("records")


def _preview_file(row: dict) -> str:
    if row["kind"] == "prediction":
        return _epoch_file(row["trial_id"], row["epoch"])
    return f"o-{row['dataset']}-{int(row['resolution'])}.parquet"


def write_json(study: str, name: str, obj: dict) -> None:
    fs, root = resolve(study)
    _write_bytes(fs, f"{root}/{name}", json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(study: str, name: str) -> dict | None:
    fs, root = resolve(study)
    data = _read_bytes(fs, f"{root}/{name}")
    return None if data is None else json.loads(data)


class ResultsWriter:
    """The driver's writer of a study's tables (see the module docstring for the API).

    Keeps ``trials`` and ``epochs`` in memory as rows keyed like the tables (the driver is
    the only writer, so an in-memory copy plus atomic files is consistent); a trial that
    re-reports an epoch after a restore replaces the row (and file). Work per event does not
    grow with the number of epochs already written.
    """

    def __init__(self, study: str):
        self.study = study
        self.fs, root = resolve(study)
        self.results_dir = f"{root}/{RESULTS_DIR}"
        self.epochs_dir = f"{self.results_dir}/epochs.parquet"
        self.previews_dir = f"{self.results_dir}/previews.parquet"
        kind = self.fs.get_file_info(self.epochs_dir).type
        if kind == pafs.FileType.File:
            self._convert_epochs_file(read_table(study, "epochs"))
        elif (kind == pafs.FileType.NotFound and isinstance(self.fs, pafs.LocalFileSystem)
              and Path(self.results_dir, ".epochs-converting").is_dir()):
            self.fs.move(f"{self.results_dir}/.epochs-converting", self.epochs_dir)   # a conversion cut short
        self._trials: dict[str, dict] = {}
        self._epochs: dict[str, dict[int, dict]] = {}
        for row in _records(read_table(study, "trials")):
            self._trials[row["trial_id"]] = row
        for row in _records(read_table(study, "epochs")):
            self._epochs.setdefault(row["trial_id"], {})[int(row["epoch"])] = row
        self._frames: dict[str, pd.DataFrame | None] = {}
        self._dirty = False
        # (folder, trial id) -> epochs that have a file there, so a restore finds its files at once.
        self._files: dict[tuple[str, str], set[int]] = {}
        self.preview_files: set[str] = set()
        for folder in (self.epochs_dir, self.previews_dir):
            for name in _data_files(self.fs, folder):
                if folder == self.previews_dir:
                    self.preview_files.add(name)
                match = _EPOCH_FILE.match(name)
                if match:
                    self._files.setdefault((folder, match[1]), set()).add(int(match[2]))

    def _convert_epochs_file(self, df: pd.DataFrame | None) -> None:
        """A study from before epochs became a folder: write its rows as files, then remove the old file.

        Locally the folder is made beside it and renamed into place; on an object store a key and a
        "folder" of keys below it can coexist. Either way the rows are all written before the old file
        goes, so a crash here loses nothing (the next writer converts again).
        """
        local = isinstance(self.fs, pafs.LocalFileSystem)
        target = f"{self.results_dir}/.epochs-converting" if local else self.epochs_dir
        if local:
            self.fs.delete_dir_contents(target, missing_dir_ok=True)
        for row in _records(df):
            _write_bytes(self.fs, f"{target}/{_epoch_file(row['trial_id'], row['epoch'])}", _epoch_bytes(row))
        try:
            self.fs.delete_file(self.epochs_dir)
            if local:
                self.fs.move(target, self.epochs_dir)
        except OSError as e:
            raise ResultsWriteError(f"cannot convert {self.epochs_dir} to a folder of files: {e}") from e

    @property
    def tables(self) -> dict[str, pd.DataFrame | None]:
        """The tables as pandas (None while empty), in the contract's types; built on demand."""
        for name in ("trials", "epochs"):
            if name not in self._frames:
                rows = (list(self._trials.values()) if name == "trials"
                        else [r for by_epoch in self._epochs.values() for r in by_epoch.values()])
                self._frames[name] = None if not rows else coerce(name, pd.DataFrame(rows).sort_values(
                    KEYS[name], kind="stable").reset_index(drop=True))
        return dict(self._frames)

    # ---------------------------------------------------------------- trials

    def stage(self, name: str, rows: list[dict]) -> None:
        """Change the in-memory trials table; nothing is written until ``flush()``."""
        if name != "trials":
            raise ValueError("only trials rows are staged; epochs are written per (trial, epoch) by add_epochs")
        for row in rows:
            self._trials[row["trial_id"]] = dict(row)
        if rows:
            self._frames.pop("trials", None)
            self._dirty = True

    def flush(self) -> None:
        """Write the trials table if rows were staged since the last flush: once per event."""
        if self._dirty:
            write_table(self.study, "trials", self.tables["trials"])
            self._dirty = False

    def upsert(self, name: str, rows: list[dict]) -> None:
        if name == "epochs":
            for trial_id in dict.fromkeys(r["trial_id"] for r in rows):
                self.add_epochs(trial_id, [r for r in rows if r["trial_id"] == trial_id])
            return
        self.stage(name, rows)
        self.flush()

    # ---------------------------------------------------------------- epochs

    def add_epochs(self, trial_id: str, rows: list[dict]) -> None:
        """Write each row (``epoch_row``) as its own (trial, epoch) file; keep it in memory too."""
        for row in rows:
            if row["trial_id"] != trial_id:
                raise ValueError(f"an epoch row of trial {row['trial_id']} given for trial {trial_id}")
            epoch = int(row["epoch"])
            _write_bytes(self.fs, f"{self.epochs_dir}/{_epoch_file(trial_id, epoch)}", _epoch_bytes(row))
            self._files.setdefault((self.epochs_dir, trial_id), set()).add(epoch)
            self._epochs.setdefault(trial_id, {})[epoch] = dict(row)
            self._frames.pop("epochs", None)

    def history(self, trial_id: str) -> list[dict]:
        """The trial's epoch rows, by epoch."""
        by_epoch = self._epochs.get(trial_id, {})
        return [dict(by_epoch[e]) for e in sorted(by_epoch)]

    def drop_epochs_after(self, trial_id: str, epoch: int) -> None:
        """Forget epochs a restored trial will run again: rows, epoch files and preview files."""
        by_epoch = self._epochs.get(trial_id, {})
        for e in [e for e in by_epoch if e > epoch]:
            del by_epoch[e]
            self._frames.pop("epochs", None)
        for folder in (self.epochs_dir, self.previews_dir):
            known = self._files.get((folder, trial_id), set())
            for e in sorted(e for e in known if e > epoch):
                name = _epoch_file(trial_id, e)
                try:
                    self.fs.delete_file(f"{folder}/{name}")
                except FileNotFoundError:
                    pass
                except OSError as err:
                    raise ResultsWriteError(f"cannot delete {folder}/{name}: {err}") from err
                known.discard(e)
                if folder == self.previews_dir:
                    self.preview_files.discard(name)

    # ---------------------------------------------------------------- previews

    def add_previews(self, rows: list[dict]) -> None:
        by_file: dict[str, list[dict]] = {}
        for row in rows:
            by_file.setdefault(_preview_file(row), []).append(row)
        for name, group in sorted(by_file.items()):
            if name.startswith("o-") and name in self.preview_files:
                continue  # originals: once per dataset and resolution
            df = pd.DataFrame(group).sort_values(KEYS["previews"], kind="stable")
            _write_bytes(self.fs, f"{self.previews_dir}/{name}", _parquet_bytes(df))
            self.preview_files.add(name)
            if group[0]["kind"] == "prediction":
                self._files.setdefault((self.previews_dir, group[0]["trial_id"]), set()).add(int(group[0]["epoch"]))

    def has_originals(self, dataset: str, resolution: int) -> bool:
        return f"o-{dataset}-{int(resolution)}.parquet" in self.preview_files


# ------------------------------------------------------------ row builders
# Shared by the Ray Tune callback and the sequential runner (study/local.py), so
# both write exactly the same contract.


def epoch_row(trial_id: str, row: dict) -> dict:
    out = {"trial_id": trial_id, "epoch": int(row["epoch"])}
    out.update({k: float(row[k]) for k in EPOCH_METRICS})
    out["seconds"] = float(row.get("seconds", float("nan")))
    # A classification head's temperature curve (the other heads have none: missing in the table).
    out.update({k: float(row[k]) for k in CURVE_METRICS if row.get(k) is not None})
    # What the epoch computed in (bf16/tf32/fp32): the trials table's precision_used is the last epoch's.
    out["precision"] = str(row.get("precision") or "")
    return out


def preview_rows(trial_id: str, config: dict, epoch: int, files: dict[str, bytes]) -> list[dict]:
    """Rows for PNGs named ``<kind>_<index>.png`` (a checkpoint folder's, or ``study.engine.trial.original_previews``).

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
              checkpoint_path: str = "", optuna_number: int = -1, **bookkeeping) -> dict:
    """One trials-table row. ``bookkeeping``: more facts about the run (``started_at``/``finished_at``
    as Unix seconds or timestamps, ``restarts``, ``pack_id``, ...), stored as given and typed on write."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {STATUSES}")
    row = {"trial_id": trial_id, **config, "status": status, "error": error,
           "epochs_run": len(history), "wall_time_s": float(wall_time_s), "device": device,
           "node_id": node_id, "checkpoint_path": checkpoint_path, "optuna_number": int(optuna_number),
           **bookkeeping}
    if history:
        best = best_row(history)
        final = history[-1]
        row["best_epoch"] = int(best["epoch"])
        for k in SUMMARY_METRICS:
            row[f"best_{k}"] = float(best[k])
            row[f"final_{k}"] = float(final[k])
        row["val_gray_psnr"] = float(final["val_gray_psnr"])
        row["test_gray_psnr"] = float(final["test_gray_psnr"])
        if "precision" in final:
            row["precision_used"] = str(final["precision"])
    return row


def png_files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.png"))}
