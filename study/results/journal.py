"""The results' journal (``results/_journal/``): every change to a study's tables, one JSON line each, kept
from the moment it is made until the writer next writes the tables. A writer that opens the study replays
it (the driver stopped without writing them: a crash), and ``read_table`` applies it, so neither loses a
change the journal holds.

On a local disk each change is appended at once (one ``write``: a killed process loses nothing; the
lines reach the disk itself when the tables are next written, so a machine that loses power loses the
changes of the last write interval). An object store has no append: changes are held in memory and
put as a new segment by ``commit`` (a trial's end, the writer's cadence), so a crash loses the changes
since the last commit.

A change is ``{"t": "trials" | "epochs" | "previews", "row": {...}}`` or
``{"t": "drop", "trial_id": ..., "after": epoch}`` (``drop_epochs_after``); rows are the contract's
plain values (``contract.coerce_row``), UTC datetimes and bytes written as ``{"$time": iso}`` and
``{"$bytes": base64}``.
"""
from __future__ import annotations

import base64
import json
import os
import re
from datetime import datetime

import pyarrow.fs as pafs

from study.results.files import ResultsReadError, delete, is_local, listing, read_bytes, write_bytes, write_error

SEGMENT = re.compile(r"^(\d{8})\.jsonl$")


def _default(value):
    if isinstance(value, datetime):
        return {"$time": value.isoformat()}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if type(value).__module__ == "numpy":
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r} cannot be kept in the results journal")


def _hook(obj: dict):
    if len(obj) == 1:
        if "$time" in obj:
            return datetime.fromisoformat(obj["$time"])
        if "$bytes" in obj:
            return base64.b64decode(obj["$bytes"])
    return obj


def encode(change: dict) -> bytes:
    return json.dumps(change, default=_default, separators=(",", ":")).encode() + b"\n"


def segments(fs: pafs.FileSystem, folder: str) -> list[str]:
    return sorted(name for name in listing(fs, folder) if SEGMENT.match(name))


def read(fs: pafs.FileSystem, folder: str, names: list[str] | None = None) -> list[dict]:
    """The changes in the journal's segments (``names``, or all), in order. A last line cut short (the
    writer was killed mid-write, or is writing it now) is no change yet."""
    out = []
    for name in segments(fs, folder) if names is None else names:
        data = read_bytes(fs, f"{folder}/{name}") or b""
        lines = data.split(b"\n")
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line, object_hook=_hook))
            except ValueError as e:
                if n == len(lines) - 1:   # no newline after it: cut short
                    break
                raise ResultsReadError(f"{folder}/{name} line {n + 1} is not a results change ({e}); move the "
                                       f"file aside to continue without the changes from it on") from e
    return out


class Journal:
    """The writer's end of the journal: ``append`` each change, ``commit`` (object store); ``rotate`` when
    a write of the tables starts and ``clear`` once it is done."""

    def __init__(self, fs: pafs.FileSystem, folder: str):
        self.fs, self.folder = fs, folder
        self.local = is_local(fs)
        found = segments(fs, folder)
        self._next = int(SEGMENT.match(found[-1])[1]) + 1 if found else 1
        self._fd: int | None = None
        self._path = ""
        self._held: list[bytes] = []   # object store: changes not yet put

    def append(self, change: dict) -> None:
        line = encode(change)
        if not self.local:
            self._held.append(line)
            return
        if self._fd is None:
            self._path = f"{self.folder}/{self._next:08d}.jsonl"
            self._next += 1
            try:
                os.makedirs(self.folder, exist_ok=True)
                self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
            except OSError as e:
                raise write_error(self._path, e) from e
        view = memoryview(line)
        end = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            while view:   # one write() in practice; a short write (a full disk) carries on or raises
                view = view[os.write(self._fd, view):]
        except OSError as e:
            try:
                os.ftruncate(self._fd, end)   # no part of a line that failed: later lines follow whole ones
            except OSError:
                pass
            raise write_error(self._path, e, kept="the changes before this one are kept") from e

    def commit(self) -> None:
        """Object store: put the changes held in memory as a new segment (a local journal has them already)."""
        if self._held:
            write_bytes(self.fs, f"{self.folder}/{self._next:08d}.jsonl", b"".join(self._held))
            self._next += 1
            self._held = []

    def rotate(self) -> int:
        """The changes so far are being written to the tables: later ones go to a new segment. Returns the
        last segment ``clear`` may delete once they are (an object store's held changes are the write's)."""
        self.close()
        self._held = []
        return self._next - 1

    def clear(self, upto: int) -> None:
        """Forget the changes in segments up to ``upto``: the tables hold them now."""
        for name in segments(self.fs, self.folder):
            if int(SEGMENT.match(name)[1]) <= upto:
                delete(self.fs, f"{self.folder}/{name}")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
