"""How Tune's saved state reaches the study folder: only the files changed since they were last sent, each whole.

Ray 2.60 copies its whole driver staging folder into the study folder at every save of its experiment
state: every trial's log files each time (more as the study grows; on an object store one request per
file), and on a disk each file is rewritten in place, so a driver killed mid-copy leaves a state file cut
short, which no resume can read. ``ChangedFiles.upload`` takes that copy's place
(``ray_internals.upload_state_with``):

- a trial's file is sent when its size, modification time or inode differ from when it was last sent
  (stat before the read: a file changed while it is read is sent again next time); the few files of the
  study's own state (the folder's top level) are sent every time, as Tune does: a rewrite within the
  clock's tick of the last, at the same size, would look unchanged;
- it replaces its copy whole (``study.results.files.write_bytes``: on a disk, a temporary beside it renamed
  over it), so the study folder holds each file as one save or another left it, never cut;
- the file named ``last`` (Tune's experiment state) goes after the others, the searcher's among them, so
  that a kill between two files leaves the searcher's state at least as new as Tune's (the case the
  searcher's restore handles: it fails a trial asked but never started as an orphan).
"""
from __future__ import annotations

import fnmatch
import os

import pyarrow.fs as pafs

from study.results import is_local, write_bytes


class ChangedFiles:
    """Sends the files of a local folder that changed since last sent; the memory of what was sent is the
    instance's (one per study run: a resumed study sends each file once more)."""

    def __init__(self, last: str = "") -> None:
        self.last = last   # a file name pattern of the top level, sent after the rest
        self._sent: dict[str, tuple[int, int, int]] = {}   # trial file -> (size, mtime_ns, inode) when sent
        self._made: set[str] = set()   # folders made on a disk (an object store has none to make)

    def upload(self, local_path: str, fs: pafs.FileSystem, fs_path: str) -> int:
        """Send the files under ``local_path`` that changed to ``fs_path`` on ``fs``; returns how many."""
        changed = sorted(self._changed(local_path), key=lambda item: self.order(item[0]))
        for rel, signature in changed:
            try:
                with open(os.path.join(local_path, rel), "rb") as f:
                    data = f.read()
            except FileNotFoundError:   # gone from the staging folder since it was listed
                continue
            path = f"{fs_path.rstrip('/')}/{rel}"
            parent = path.rsplit("/", 1)[0]
            write_bytes(fs, path, data, make_parent=is_local(fs) and parent not in self._made)
            self._made.add(parent)
            self._sent[rel] = signature
        return len(changed)

    def _changed(self, local_path: str):
        for folder, _, files in os.walk(local_path):
            for name in files:
                if name.startswith(".tmp"):   # Tune's own temporaries, about to be renamed
                    continue
                path = os.path.join(folder, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                signature = (st.st_size, st.st_mtime_ns, st.st_ino)
                rel = os.path.relpath(path, local_path).replace(os.sep, "/")
                if "/" not in rel or self._sent.get(rel) != signature:
                    yield rel, signature


    def order(self, rel: str) -> tuple[int, str]:
        """Trials' files first, then the study's own, the ``last`` pattern's last."""
        top = "/" not in rel
        return (2 if top and self.last and fnmatch.fnmatch(rel, self.last) else 1 if top else 0), rel
