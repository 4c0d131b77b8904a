"""Writing and reading the results contract (``study.results.contract``) as Parquet in ``<study>/results/``.

Readers need only pandas + pyarrow::

    pd.read_parquet(f"{study}/results/trials.parquet")

``trials.parquet`` is one file, replaced atomically. ``epochs.parquet`` and ``previews.parquet`` are
*folders* of Parquet parts (``study.results.parts``): each write adds a part and small parts are merged,
so a reader opens a few dozen files however many epochs the study has; ``pd.read_parquet`` reads such a
folder like a file. Every table has all its columns in the contract's types from the study's first write
(epochs and previews: an empty part). Studies of earlier versions (one ``epochs.parquet`` file, or one
file per (trial, epoch)) still read, and their first writer converts their epochs.

``study.json`` beside ``results/`` holds the study's metadata.

Writing (``ResultsWriter``; the driver is the only writer of a study). A change costs one row's typing
and one appended journal line; the tables are written on a cadence, never per change:

- ``add_epochs(trial_id, rows)`` (rows from ``epoch_row``); a re-reported epoch replaces its row.
- ``stage("trials", rows)`` (rows from ``trial_row``): the trials table's rows, by ``trial_id``;
  ``upsert`` is the same for either table.
- ``add_previews(rows)``; originals once per (dataset, resolution).
- ``drop_epochs_after(trial_id, epoch)``: forget epochs a restored trial will run again (rows and previews).
- ``history(trial_id)``: the trial's epoch rows, in order; ``trial(trial_id)``: its trials row.
- The tables are written at the first change after opening, then at the first change at least
  ``interval_s`` (5 s; longer when a write takes long) after the last write, by a writing thread: that
  change does not wait for the write (Parquet encoding and I/O leave Python's lock). ``flush()`` writes
  now and waits; ``close()`` flushes and lets go of the journal and the thread. A write that fails
  raises ``ResultsWriteError`` from the next call, and every call after it: the journal keeps the
  changes, which ``--resume`` writes.

Crashes. Every change goes to the journal (``study.results.journal``) before it counts; the writer that
next opens the study replays it and writes the tables, and ``read_table`` applies it meanwhile. On a
local disk a killed driver loses nothing (a write cut short is done again from the journal), and a
machine that loses power loses at most the changes since the last finished write (every ``interval_s``,
or a little more). On an object store the changes since the last finished write, or the last trial end
(its row is put at once), are lost in a crash. A restored trial re-runs the epochs after its last
checkpoint and reports them again, which replaces their rows, so after ``--resume`` there is still one
row per (trial, epoch); an epoch lost in that window is reported again when Ray Tune's saved state was
taken before it, which holds when the driver flushes as Tune saves its state (the results callback's
``get_state``).

A failed write (folder unwritable, disk full, bucket gone) raises ``ResultsWriteError`` naming the file
and the cause; the file keeps its last good version, no temporary is left behind and the journal keeps
the changes, so ``--resume`` continues once the cause is fixed. Files are created with the process's
umask (a team can read a shared study).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from study.results import journal
from study.results.contract import (
    CURVE_METRICS,
    EPOCH_COLUMNS,
    EPOCH_METRICS,
    KEYS,
    RESULTS_DIR,
    STATUSES,
    SUMMARY_METRICS,
    best_row,
    coerce,
    coerce_row,
)
from study.results.files import (  # the errors and resolve: also read from here by the tests
    ResultsError,  # noqa: F401
    ResultsReadError,  # noqa: F401
    ResultsWriteError,
    delete,
    listing,
    parquet_bytes,
    read_bytes,
    read_parquet,
    resolve,
    schema,
    write_bytes,
)
from study.results.parts import Part, PartsTable, read_folder
from study.results.trials import TrialsTable, combine

JOURNAL = "_journal"   # in results/: hidden from Parquet readers by its underscore


def _stored(fs: pafs.FileSystem, results: str, name: str) -> pa.Table | None:
    """The table as written (without the journal's changes); None when it does not exist."""
    path = f"{results}/{name}.parquet"
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        return None
    if name == "trials" or kind == pafs.FileType.File:   # the oldest layout: one epochs.parquet file
        return read_parquet(fs, path, None if name == "trials" else schema(name))
    return read_folder(fs, path, name)


def _with_changes(name: str, table: pa.Table | None, changes: list[dict]) -> pa.Table | None:
    """``table`` with the journal's changes to it applied, in order."""
    if name == "trials":
        trials = TrialsTable(table)
        for change in changes:
            if change["t"] == "trials":
                trials.put(change["row"])
        return trials.table()
    keys, epoch_at = KEYS[name], KEYS[name].index("epoch")
    added: dict[tuple, dict] = {}
    drops: list[tuple[str, int]] = []
    for change in changes:
        if change["t"] == name:
            added[tuple(change["row"][k] for k in keys)] = change["row"]
        elif change["t"] == "drop":
            added = {k: r for k, r in added.items() if not (k[0] == change["trial_id"] and k[epoch_at] > change["after"])}
            drops.append((change["trial_id"], change["after"]))
    if not added and not drops:
        return table
    new = pa.Table.from_pylist(list(added.values()), schema=schema(name))
    if table is None:
        return new
    df = table.select(keys).to_pandas()
    gone = pd.MultiIndex.from_frame(df).isin(list(added)) if added else pd.Series(False, index=df.index).to_numpy()
    for trial_id, after in drops:
        gone |= ((df["trial_id"] == trial_id) & (df["epoch"] > after)).to_numpy()
    return pa.concat_tables([table.filter(pa.array(~gone)), new])


def read_table(study: str, name: str, *, filesystem: pafs.FileSystem | None = None) -> pd.DataFrame | None:
    """The table as pandas (None when it does not exist yet), in the contract's column types, with the
    changes the journal holds (a running or crashed driver's latest). Opens O(parts) files.

    Raises ``ResultsReadError`` naming the file when it is not readable Parquet.
    """
    fs, root = resolve(study, filesystem)
    results = f"{root}/{RESULTS_DIR}"
    folder = f"{results}/{JOURNAL}"
    for _ in range(3):   # the writer wrote the tables and emptied the journal meanwhile: read again
        names = journal.segments(fs, folder)
        changes = journal.read(fs, folder, names)
        table = _stored(fs, results, name)
        if journal.segments(fs, folder) == names:
            break
    table = _with_changes(name, table, changes)
    if table is None:
        return None
    df = table.to_pandas()
    if not df.empty and all(k in df for k in KEYS[name]):
        df = df.sort_values(KEYS[name], kind="stable").reset_index(drop=True)
    return coerce(name, df)


def write_json(study: str, name: str, obj: dict) -> None:
    fs, root = resolve(study)
    write_bytes(fs, f"{root}/{name}", json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(study: str, name: str) -> dict | None:
    fs, root = resolve(study)
    data = read_bytes(fs, f"{root}/{name}")
    return None if data is None else json.loads(data)


class _Tables(Mapping):
    """``writer.tables``: "trials" from memory; "epochs" writes what is pending and reads the table back."""

    def __init__(self, writer: ResultsWriter):
        self._writer = writer

    def __getitem__(self, name: str) -> pd.DataFrame | None:
        if name == "trials":
            return self._writer._trials.frame()
        if name == "epochs":
            self._writer.flush()
            return read_table(self._writer.study, name, filesystem=self._writer.fs)
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(("trials", "epochs"))

    def __len__(self) -> int:
        return 2


class ResultsWriter:
    """The driver's writer of a study's tables (see the module docstring for the API and its crash window).

    ``filesystem``: a pyarrow filesystem to write through (``study`` is then a path on it).
    """

    def __init__(self, study: str, *, filesystem: pafs.FileSystem | None = None, interval_s: float = 5.0):
        self.study = study
        self.fs, root = resolve(study, filesystem)
        self.results_dir = f"{root}/{RESULTS_DIR}"
        self.epochs_dir = f"{self.results_dir}/epochs.parquet"
        self.previews_dir = f"{self.results_dir}/previews.parquet"
        self.trials_path = f"{self.results_dir}/trials.parquet"
        self.interval_s = interval_s
        for name in listing(self.fs, self.results_dir):   # a killed writer's temporaries (the folders': parts)
            if name.startswith(".tmp-"):
                delete(self.fs, f"{self.results_dir}/{name}")
        self._convert_epochs_file()
        self._trials = TrialsTable(read_parquet(self.fs, self.trials_path))
        self._epochs = PartsTable(self.fs, self.epochs_dir, "epochs", rows=True)
        self._previews = PartsTable(self.fs, self.previews_dir, "previews", rows=False)
        self._journal = journal.Journal(self.fs, f"{self.results_dir}/{JOURNAL}")
        self._last_write, self._pause, self._unwritten = -math.inf, interval_s, False
        self._pool: ThreadPoolExecutor | None = None
        self._writing: Future | None = None   # the write the writing thread is doing
        self._failed: ResultsError | None = None
        replay = journal.read(self.fs, self._journal.folder)
        for change in replay:   # the last driver stopped before writing them
            self._apply(change)
        if replay or self._epochs.dirty and self._epochs.exists or self._previews.stale:
            self._unwritten = True
            self.flush()   # replayed, converted, or a write cut short: the tables hold it all now

    def _convert_epochs_file(self) -> None:
        """The oldest layout, one epochs.parquet file: its rows become the folder's first part.

        Locally the folder is made beside it and renamed into place; on an object store a key and a
        "folder" of keys below it can coexist. Either way the rows are all written before the old file
        goes, so a crash here loses nothing (the next writer converts again).
        """
        kind = self.fs.get_file_info(self.epochs_dir).type
        local = isinstance(self.fs, pafs.LocalFileSystem)
        converting = f"{self.results_dir}/.epochs-converting"
        if kind == pafs.FileType.NotFound and local and Path(converting).is_dir():
            self.fs.move(converting, self.epochs_dir)   # a conversion cut short
            return
        if kind != pafs.FileType.File:
            return
        table = read_parquet(self.fs, self.epochs_dir, schema("epochs"))
        target = converting if local else self.epochs_dir
        if local:
            self.fs.delete_dir_contents(target, missing_dir_ok=True)
        write_bytes(self.fs, f"{target}/{Part(1, 1).name}", parquet_bytes("epochs", table))
        try:
            self.fs.delete_file(self.epochs_dir)
            if local:
                self.fs.move(target, self.epochs_dir)
        except OSError as e:
            raise ResultsWriteError(f"cannot convert {self.epochs_dir} to a folder of files: {e}") from e

    # ---------------------------------------------------------------- changes

    def _apply(self, change: dict) -> None:
        kind = change["t"]
        if kind == "trials":
            self._trials.put(change["row"])
        elif kind == "epochs":
            self._epochs.add(change["row"])
        elif kind == "previews":
            self._previews.add(change["row"])
        elif kind == "drop":
            self._epochs.drop_after(change["trial_id"], change["after"])
            self._previews.drop_after(change["trial_id"], change["after"])

    def _change(self, change: dict) -> None:
        self._check()
        self._journal.append(change)   # first: a change the journal cannot keep is not made
        self._apply(change)
        self._unwritten = True

    def _check(self) -> None:
        if self._failed is not None:   # the tables lack a write: only --resume (the journal) makes them whole
            raise self._failed

    def _write_if_due(self) -> None:
        """At the cadence, hand the changes to the writing thread (the caller does not wait for the write)."""
        if self._last_write == -math.inf:
            self.flush()   # the first after opening, at once: a new study's tables exist from its first change
            return
        self._collect(wait=False)
        if self._writing is None and time.monotonic() - self._last_write >= self._pause:
            plan = self._take()
            if plan is not None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="results-writer")
                self._writing = self._pool.submit(self._write, plan)

    def _take(self) -> tuple | None:
        """What the next write writes, taken from the changes (the writer's thread only)."""
        if not (self._unwritten or self._epochs.dirty or self._previews.dirty):
            return None
        self._unwritten = False
        self._last_write = time.monotonic()
        return self._epochs.take(), self._previews.take(), self._trials.take(), self._journal.rotate()

    def _write(self, plan: tuple) -> tuple[pa.Table | None, float]:
        """Write a plan (in the writing thread, or at once): parts, the trials table, then the journal it
        covers goes. Returns the trials table written and the seconds it took."""
        t0 = time.monotonic()
        epochs, previews, trials, upto = plan
        self._epochs.write(epochs)
        self._previews.write(previews)
        table = None
        if trials is not None:
            table = combine(*trials)
            write_bytes(self.fs, self.trials_path, parquet_bytes("trials", table))
        self._journal.clear(upto)
        return table, time.monotonic() - t0

    def _collect(self, wait: bool) -> None:
        """Take in the writing thread's finished write (``wait``: wait for it); raise what made it fail."""
        if self._writing is None or not (wait or self._writing.done()):
            return
        writing, self._writing = self._writing, None
        self._done(writing.result)

    def _done(self, write) -> None:
        try:
            table, seconds = write()
        except Exception as e:
            self._trials.written(None, ok=False)
            self._failed = e if isinstance(e, ResultsError) else ResultsWriteError(
                f"cannot write the results in {self.results_dir}: {type(e).__name__}: {e}; continue the study with "
                f"--resume (the journal keeps the changes)")
            raise self._failed from e
        self._trials.written(table)
        # A write that takes long (a big study) comes less often: at most ~5% of the time it runs.
        self._pause = max(self.interval_s, 20 * seconds)

    def flush(self) -> None:
        """Write every change not yet written, now, and wait for it. Nothing pending: nothing written."""
        self._check()
        self._collect(wait=True)
        plan = self._take()
        if plan is not None:
            self._done(lambda: self._write(plan))

    def close(self) -> None:
        """Write every change, and let go of the journal and the writing thread (a later change starts them
        again)."""
        self.flush()
        self._journal.close()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tables(self) -> Mapping[str, pd.DataFrame | None]:
        """The tables as pandas (None while empty), in the contract's types: ``tables["trials"]`` from memory."""
        return _Tables(self)

    # ---------------------------------------------------------------- trials

    def trial(self, trial_id: str) -> dict | None:
        """The trial's row in the trials table (its contract's plain values), None when it has none."""
        return self._trials.get(trial_id)

    def stage(self, name: str, rows: list[dict]) -> None:
        """Set trials rows (by ``trial_id``); written with the tables (see the module docstring)."""
        if name != "trials":
            raise ValueError("only trials rows are staged; epochs are added by add_epochs")
        ended = False
        for row in rows:
            row = coerce_row("trials", row)
            self._change({"t": "trials", "row": row})
            ended = ended or row.get("status") not in (None, "RUNNING")
        if ended:
            self._journal.commit()   # a trial's end is never reported again: kept at once on an object store too
        self._write_if_due()

    def upsert(self, name: str, rows: list[dict]) -> None:
        if name == "epochs":
            for trial_id in dict.fromkeys(r["trial_id"] for r in rows):
                self.add_epochs(trial_id, [r for r in rows if r["trial_id"] == trial_id])
            return
        self.stage(name, rows)

    # ---------------------------------------------------------------- epochs

    def add_epochs(self, trial_id: str, rows: list[dict]) -> None:
        """Add epoch rows (``epoch_row``) of one trial; an epoch it has already is replaced."""
        for row in rows:
            if row["trial_id"] != trial_id:
                raise ValueError(f"an epoch row of trial {row['trial_id']} given for trial {trial_id}")
            self._change({"t": "epochs", "row": coerce_row("epochs", row)})
        self._write_if_due()

    def history(self, trial_id: str) -> list[dict]:
        """The trial's epoch rows, by epoch (a missing metric is NaN, as ``epoch_row`` gives it)."""
        rows = sorted(self._epochs.rows_of(trial_id), key=lambda r: r["epoch"])
        return [{k: math.nan if v is None and EPOCH_COLUMNS.get(k) == "float" else v for k, v in r.items()}
                for r in rows]

    def drop_epochs_after(self, trial_id: str, epoch: int) -> None:
        """Forget epochs a restored trial will run again: their rows and previews."""
        if self._epochs.has_after(trial_id, epoch) or self._previews.has_after(trial_id, epoch):
            self._change({"t": "drop", "trial_id": trial_id, "after": int(epoch)})
            self._write_if_due()

    # ---------------------------------------------------------------- previews

    def add_previews(self, rows: list[dict]) -> None:
        """Add preview rows (``preview_rows``); originals of a (dataset, resolution) already stored are skipped."""
        stored = set(self._previews.originals)
        for row in rows:
            row = coerce_row("previews", row)
            if row["kind"] == "prediction" or (row["dataset"], row["resolution"]) not in stored:
                self._change({"t": "previews", "row": row})
        self._write_if_due()

    def has_originals(self, dataset: str, resolution: int) -> bool:
        return (dataset, int(resolution)) in self._previews.originals


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


def trial_row(trial_id: str, config: dict, status: str, history: list[dict], **facts) -> dict:
    """One trials-table row. ``facts`` about the run: ``error``, ``wall_time_s``, ``device``, ``node_id``,
    ``checkpoint_path``, ``optuna_number`` (missing: None, NaN, "", "", "", -1) and any other bookkeeping
    (``started_at``/``finished_at`` as Unix seconds or timestamps, ``restarts``, ``pack_id``, ...), stored
    as given and typed on write. The best and final metrics come from ``history`` (``best_row``)."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {STATUSES}")
    row = {"trial_id": trial_id, **config, "status": status, "error": facts.pop("error", None),
           "epochs_run": len(history), "wall_time_s": float(facts.pop("wall_time_s", math.nan)),
           "device": facts.pop("device", ""), "node_id": facts.pop("node_id", ""),
           "checkpoint_path": facts.pop("checkpoint_path", ""), "optuna_number": int(facts.pop("optuna_number", -1)),
           **facts}
    if history:
        best = best_row(history)
        final = history[-1]
        row["best_epoch"] = int(best["epoch"])
        for k in SUMMARY_METRICS:
            row[f"best_{k}"] = float(best[k])
            row[f"final_{k}"] = float(final[k])
        row["val_gray_psnr"] = float(final["val_gray_psnr"])
        row["test_gray_psnr"] = float(final["test_gray_psnr"])
        if final.get("precision") is not None:
            row["precision_used"] = str(final["precision"])
    return row


def png_files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.png"))}
