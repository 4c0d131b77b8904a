"""A table kept as a folder of Parquet parts: ``epochs.parquet/`` and ``previews.parquet/``.

Each write of the table adds one part, ``part-<lo>-<hi>.parquet``, with the rows changed since the last
(``lo`` = ``hi``: the write's number). Whenever the newest ``FANOUT`` parts cover as many writes each,
they are merged into one part covering them all (``lo`` of the first, ``hi`` of the last), so a table
written N times is O(FANOUT x log N) parts, not one file per (trial, epoch), and each row is rewritten
O(log N) times over a study. A part past ``MERGE_BYTES`` (previews: PNGs) is not merged further.

A row that is replaced or dropped (a restored trial runs an epoch again) is removed from the part that
holds it by rewriting that part in place, after its new version is written: a reader never misses it.
A reader listing the folder mid-merge can, for a moment, see both the merged part and the parts it
replaces; ``read_folder`` leaves out a part whose writes another part covers (and a writer deletes it),
and keeps the newest row of a key that two files hold.

Files of earlier versions: one file per (trial, epoch), ``t-<trial>-e<epoch>.parquet``, and previews'
originals, ``o-<dataset>-<resolution>.parquet``. They read as before; a writer turns epochs files into a
part (their rows are small) and leaves previews files in place (dropping them when their epoch is).
"""
from __future__ import annotations

import bisect
import os
import re
import shutil
import threading
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from study.results.contract import KEYS
from study.results.files import (delete, is_local, listing, parquet_bytes, read_parquet, schema, unreadable,
                                 write_bytes)

PART = re.compile(r"^part-(\d+)-(\d+)\.parquet$")
TRIAL_EPOCH = re.compile(r"^t-(.+)-e(\d+)\.parquet$")   # earlier versions: one file per (trial, epoch)
ORIGINALS = re.compile(r"^o-(.+)-(\d+)\.parquet$")     # earlier versions: a (dataset, resolution)'s originals
FANOUT = 8
MERGE_BYTES = 64 << 20
ORIGIN = "_origin"   # while loading: the file a row came from


@dataclass(frozen=True, order=True)
class Part:
    lo: int
    hi: int
    size: int = field(default=0, compare=False)

    @property
    def name(self) -> str:
        return f"part-{self.lo:06d}-{self.hi:06d}.parquet"

    @property
    def span(self) -> int:
        return self.hi - self.lo + 1


@dataclass(frozen=True)
class Plan:
    """One write of a folder table: the rows of its new part ``seq`` (None: no new part) and the rows to
    remove from the files that hold them (``stale``: origin -> keys)."""
    seq: int | None
    rows: list[dict]
    stale: dict


@dataclass
class Contents:
    parts: list[Part]    # live parts, by lo
    legacy: list[str]    # files of earlier versions
    dead: list[str]      # parts another part covers (a merge cut short) and temporaries of a killed writer


def contents(fs: pafs.FileSystem, folder: str) -> Contents:
    files = listing(fs, folder)
    live: list[Part] = []
    dead = [name for name in files if name.startswith(".tmp-")]
    for part in sorted((Part(int(m[1]), int(m[2]), size) for name, size in files.items() if (m := PART.match(name))),
                       key=lambda p: (p.lo, -p.hi)):   # a covering part comes before the parts it covers
        if live and part.hi <= live[-1].hi:
            dead.append(part.name)
        else:
            live.append(part)
    legacy = sorted(n for n in files if n.endswith(".parquet") and n[0] not in "._" and not PART.match(n))
    return Contents(live, legacy, dead)


def read_files(fs: pafs.FileSystem, folder: str, name: str, files: list[str], columns: list[str] | None = None,
               origins: bool = False) -> pa.Table | None:
    """The rows of ``files``, earlier versions' files first, then parts in order (None when there are none),
    every column in the contract's type; with ``origins``, each row's part in the ``_origin`` column ("" for
    an earlier version's file)."""
    legacy = [f for f in files if not PART.match(f)]
    tables = [] if not legacy else [_read_legacy(fs, folder, name, legacy, columns)]
    for file in (f for f in files if PART.match(f)):
        table = read_parquet(fs, f"{folder}/{file}", schema(name), columns)
        if table is not None:
            tables.append(table)
    if origins:
        names = [""] * bool(legacy) + [f for f in files if PART.match(f)]
        tables = [t.append_column(ORIGIN, pa.array([file] * len(t), pa.string())) for t, file in zip(tables, names)]
    return pa.concat_tables(tables) if tables else None


def _read_legacy(fs: pafs.FileSystem, folder: str, name: str, files: list[str], columns: list[str] | None):
    """Earlier versions' files, thousands of them: read together (a file without the newest columns reads
    them empty)."""
    arrow = schema(name)
    try:
        table = pq.read_table([f"{folder}/{f}" for f in files], filesystem=fs, schema=arrow, columns=columns)
        return table.combine_chunks()   # a chunk per file otherwise: every later step would walk them all
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as e:
        raise unreadable(folder, e) from e


def newest(table: pa.Table, name: str) -> tuple[pa.Table, pa.Table]:
    """(the rows that are the last of their key, the others): a key in two files keeps the later file's row."""
    keys = table.select(KEYS[name]).to_pandas()
    older = keys.duplicated(KEYS[name], keep="last").to_numpy()
    if not older.any():
        return table, table.slice(0, 0)
    return table.filter(pa.array(~older)), table.filter(pa.array(older))


def read_folder(fs: pafs.FileSystem, folder: str, name: str) -> pa.Table | None:
    """What a reader sees of a folder table: None when it does not exist, else every row once."""
    for attempt in range(3):
        found = contents(fs, folder)
        files = found.legacy + [p.name for p in found.parts]
        if not files:
            return None if fs.get_file_info(folder).type == pafs.FileType.NotFound else schema(name).empty_table()
        try:
            table = read_files(fs, folder, name, files)
        except FileNotFoundError:   # the writer converted an earlier version's files meanwhile: list again
            if attempt == 2:
                raise
            continue
        return schema(name).empty_table() if table is None else newest(table, name)[0]


def _origin(file: str) -> int | str:
    """A row's origin: the write number of a part (the part that covers it now holds it), or a legacy file."""
    m = PART.match(file)
    return int(m[1]) if m else file


class PartsTable:
    """The writer's side of a folder table: rows added or dropped since the last write (``pending``, and
    ``stale`` rows to remove from the files that hold them), taken by ``take`` and written by ``write``. With ``rows``, each
    trial's rows are kept for ``rows_of`` (epochs: a trial's history); previews keep only their keys.

    On opening, the folder's rows are read once into one Arrow table; a trial's rows become Python dicts
    only when the trial is touched (a resumed study of 10,000 trials opens without 200,000 dicts).
    """

    def __init__(self, fs: pafs.FileSystem, folder: str, name: str, *, rows: bool):
        self.fs, self.folder, self.name, self.rows = fs, folder, name, rows
        self.keys = KEYS[name]
        self._epoch_at = self.keys.index("epoch")
        found = contents(fs, folder)
        for dead in found.dead:
            delete(fs, f"{folder}/{dead}")
        if is_local(fs):   # a conversion cut short: redone (the store finishes one that had swapped)
            shutil.rmtree(self._aside("converting"), ignore_errors=True)
            self._retire()
        self.parts = found.parts
        self.exists = bool(found.parts or found.legacy)
        self._seq = max((p.hi for p in self.parts), default=0)
        self.pending: dict[tuple, dict] = {}
        self.stale: dict[int | str, set[tuple]] = {}        # origin -> keys to remove from it
        self._trials: dict[str, dict[tuple, list]] = {}     # trial -> key -> [row or None, origin or None]
        self._legacy: dict[str, dict[int, str]] = {}        # trial -> epoch -> its file of an earlier version
        self.originals: set[tuple[str, int]] = set()        # previews: (dataset, resolution) stored
        self._load(found)

    def _load(self, found: Contents) -> None:
        read = found.legacy if self.rows else []   # epochs files become a part; previews files stay as they are
        for file in found.legacy:
            if (m := TRIAL_EPOCH.match(file)) and not self.rows:
                self._legacy.setdefault(m[1], {})[int(m[2])] = file
            elif (m := ORIGINALS.match(file)) and not self.rows:
                self.originals.add((m[1], int(m[2])))
        columns = None if self.rows else self.keys
        table = read_files(self.fs, self.folder, self.name, read + [p.name for p in found.parts], columns, True)
        if table is None:
            self._base, self._spans = None, {}
            return
        table, older = newest(table, self.name)
        for row in older.select([*self.keys, ORIGIN]).to_pylist():   # a write cut short left a key twice
            if row[ORIGIN]:
                self.stale.setdefault(_origin(row[ORIGIN]), set()).add(tuple(row[k] for k in self.keys))
        if read:
            table = self._convert(table, read)
        self._base = table.sort_by([(k, "ascending") for k in self.keys])
        trial_ids = self._base["trial_id"].to_pylist()
        self._spans: dict[str, tuple[int, int]] = {}
        start = 0
        for i in range(1, len(trial_ids) + 1):
            if i == len(trial_ids) or trial_ids[i] != trial_ids[start]:
                self._spans[trial_ids[start]] = (start, i)
                start = i
        if "" in self._spans and "dataset" in self.keys:
            self.originals |= {(k[1], k[2]) for k in self._trial("")}

    def _convert(self, table: pa.Table, files: list[str]) -> pa.Table:
        """Earlier versions' rows (those no part holds) are written as a part now; their files go at the next
        write (a crash between leaves a row in both: the part's wins). A local folder of such files only is
        swapped whole for one holding the part, and the old one removed meanwhile: unlinking 200,000 files
        would double a resume that reads them."""
        legacy = pc.equal(table[ORIGIN], "")
        rows = table.filter(legacy).drop_columns([ORIGIN])
        swap = is_local(self.fs) and not self.parts
        if len(rows) or swap:
            part = self._put(self._seq + 1, self._seq + 1, rows, self._aside("converting") if swap else self.folder)
            self.parts.append(part)
            self._seq = part.hi
            table = table.set_column(table.column_names.index(ORIGIN), ORIGIN,
                                     pc.if_else(legacy, part.name, table[ORIGIN]))
        if swap:
            os.rename(self.folder, self._aside("retired"))
            os.rename(self._aside("converting"), self.folder)
            self._retire()
        else:
            for file in files:
                self.stale.setdefault(file, set())
        return table

    def _aside(self, what: str) -> str:
        """A hidden folder beside this table's: ``.epochs-converting``, ``.epochs-retired``."""
        parent, base = self.folder.rsplit("/", 1)
        return f"{parent}/.{base.split('.')[0]}-{what}"

    def _retire(self) -> None:
        """Remove the retired folder of a conversion (this one's, or one a killed writer left) meanwhile."""
        if os.path.isdir(self._aside("retired")):
            threading.Thread(target=shutil.rmtree, args=(self._aside("retired"),), kwargs={"ignore_errors": True},
                             name="results-retired", daemon=True).start()

    def _trial(self, trial_id: str) -> dict[tuple, list]:
        got = self._trials.get(trial_id)
        if got is None:
            got = self._trials[trial_id] = {}
            start, stop = self._spans.pop(trial_id, (0, 0))
            for row in self._base.slice(start, stop - start).to_pylist() if stop else []:
                origin = _origin(row.pop(ORIGIN))
                got[tuple(row[k] for k in self.keys)] = [row if self.rows else None, origin]
        return got

    def rows_of(self, trial_id: str) -> list[dict]:
        return [entry[0] for entry in self._trial(trial_id).values()]

    def add(self, row: dict) -> None:
        """Add a row (in the contract's plain values); one of the same key is replaced."""
        key = tuple(row[k] for k in self.keys)
        entries = self._trial(key[0])
        old = entries.get(key)
        if old is not None and old[1] is not None:
            self.stale.setdefault(old[1], set()).add(key)
        entries[key] = [row if self.rows else None, None]
        self.pending[key] = row
        legacy = self._legacy.get(key[0], {}).pop(key[self._epoch_at], None)
        if legacy is not None:   # an earlier version's file of this (trial, epoch) is replaced as a whole
            self.stale.setdefault(legacy, set())
        if key[0] == "" and "dataset" in row:
            self.originals.add((row["dataset"], row["resolution"]))

    def has_after(self, trial_id: str, epoch: int) -> bool:
        """Whether the trial has rows of epochs after ``epoch`` (what ``drop_after`` would drop)."""
        return (any(k[self._epoch_at] > epoch for k in self._trial(trial_id))
                or any(e > epoch for e in self._legacy.get(trial_id, {})))

    def drop_after(self, trial_id: str, epoch: int) -> None:
        """Drop the trial's rows of epochs after ``epoch``."""
        entries = self._trial(trial_id)
        for key in [k for k in entries if k[self._epoch_at] > epoch]:
            _, origin = entries.pop(key)
            if origin is None:
                self.pending.pop(key, None)
            else:
                self.stale.setdefault(origin, set()).add(key)
        files = self._legacy.get(trial_id, {})
        for e in [e for e in files if e > epoch]:
            self.stale.setdefault(files.pop(e), set())

    @property
    def dirty(self) -> bool:
        return bool(self.pending or self.stale or not self.exists)

    def take(self) -> Plan | None:
        """What to write now (None: nothing), counted as written from now on: later changes to these rows
        remove them from the part the plan makes. The writer's thread only; ``write`` may run in another."""
        if not self.dirty:
            return None
        plan = Plan(None, [], self.stale)
        if self.pending or not self.exists:
            self._seq += 1
            plan = Plan(self._seq, list(self.pending.values()), self.stale)
            for key in self.pending:
                entry = self._trials[key[0]].get(key)
                if entry is not None and entry[1] is None:
                    entry[1] = self._seq
        self.pending, self.stale, self.exists = {}, {}, True
        return plan

    def write(self, plan: Plan | None) -> None:
        """Write a plan: its new part, then the parts that lose rows, then merges (see the module). Plans are
        written one at a time, in the order taken; only this touches ``parts``."""
        if plan is None:
            return
        if plan.seq is not None:
            self.parts.append(self._put(plan.seq, plan.seq, pa.Table.from_pylist(plan.rows, schema=schema(self.name))))
        by_part: dict[Part, set[tuple]] = {}
        for origin, keys in plan.stale.items():
            if isinstance(origin, str):
                delete(self.fs, f"{self.folder}/{origin}")
            elif (part := self._holder(origin)) is not None:
                by_part.setdefault(part, set()).update(keys)
        for part, keys in by_part.items():
            self._remove(part, keys)
        self._merge()

    def _put(self, lo: int, hi: int, table: pa.Table, folder: str | None = None) -> Part:
        data = parquet_bytes(self.name, table)
        part = Part(lo, hi, len(data))
        write_bytes(self.fs, f"{folder or self.folder}/{part.name}", data)
        return part

    def _holder(self, origin: int) -> Part | None:
        i = bisect.bisect_right([p.lo for p in self.parts], origin) - 1
        return self.parts[i] if i >= 0 and self.parts[i].lo <= origin <= self.parts[i].hi else None

    def _remove(self, part: Part, keys: set[tuple]) -> None:
        table = read_parquet(self.fs, f"{self.folder}/{part.name}", schema(self.name))
        if table is None:
            return
        keep = [tuple(r[k] for k in self.keys) not in keys for r in table.select(self.keys).to_pylist()]
        # The same name: a reader sees the part before or after, and the folder never loses its schema.
        new = self._put(part.lo, part.hi, table.filter(pa.array(keep, pa.bool_())))
        self.parts[self.parts.index(part)] = new

    def _merge(self) -> None:
        while len(self.parts) >= FANOUT:
            group = self.parts[-FANOUT:]
            if len({p.span for p in group}) != 1 or any(p.size >= MERGE_BYTES for p in group):
                return
            tables = [t for p in group if (t := read_parquet(self.fs, f"{self.folder}/{p.name}", schema(self.name)))]
            merged = self._put(group[0].lo, group[-1].hi, pa.concat_tables(tables) if tables
                               else schema(self.name).empty_table())
            for p in group:   # after the merged part is whole: a reader may see both for a moment, never neither
                delete(self.fs, f"{self.folder}/{p.name}")
            self.parts[-FANOUT:] = [merged]
