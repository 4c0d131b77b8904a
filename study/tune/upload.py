"""How Tune's saved state reaches the study folder: only the files changed since they were last sent, each whole.

Ray 2.60 copies its whole driver staging folder into the study folder at every save of its experiment
state: every trial's log files each time (more as the study grows; on an object store one request per
file), and on a disk each file is rewritten in place, so a driver killed mid-copy leaves a state file cut
short, which no resume can read. ``ChangedFiles.upload`` takes that copy's place
(``ray_internals.upload_state_with``):

- the few files of the study's own state (the folder's top level) are read in the driver's thread just
  after Tune's save, so each is sent as that save left it; this run's at every save, as Tune does, an
  earlier run's (a resumed study's staging folder holds every run's) once;
- a trial's log file is sent when its size, modification time or inode differ from when it was last sent
  (stat before the read: a file changed while it is read is sent again next time), and once its trial
  has ended and its files were sent after, its folder is no longer looked at (a save's cost follows the
  running trials: looking over 10,000 trials' 50,000 files took about a second);
- it replaces its copy whole (``study.results.files.write_bytes``: on a disk, a temporary beside it renamed
  over it), so the study folder holds each file as one save or another left it, never cut;
- the state file named ``last`` (Tune's experiment state) goes after the others, the searcher's among them, so
  that a kill between two files leaves the searcher's state at least as new as Tune's (the case the
  searcher's restore handles: it fails a trial asked but never started as an orphan).
"""
from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Callable

import pyarrow.fs as pafs

from study.results import is_local, write_bytes


# A state file written this long ago, and sent since, is an earlier run's: not sent again.
RECENT_S = 60.0


class ChangedFiles:
    """Sends the files of a local folder that changed since last sent; the memory of what was sent is the
    instance's (one per study run: a resumed study sends each file once more)."""

    def __init__(self, last: str = "") -> None:
        self.last = last   # a file name pattern of the top level, sent after the rest
        self._sent: dict[str, tuple[int, int, int]] = {}   # file -> (size, mtime_ns, inode) when sent
        self._made: set[str] = set()   # folders made on a disk (an object store has none to make)
        self._ending: set[str] = set()   # trials' folders whose trial ended since the last prepare
        self._done: set[str] = set()   # trials' folders sent after their trial ended: never looked at again

    def ended(self, folder: str) -> None:
        """The trial whose log folder (a name in the staging folder) is ``folder`` ended: its files are sent
        once more, at the next save, and then no longer looked at, so that a save's cost follows the
        running trials, not every trial the study ran. Called in the driver's thread."""
        self._ending.add(folder)

    def prepare(self, local_path: str) -> Callable[[pafs.FileSystem, str], int]:
        """Read the study's own state files (the folder's top level) now, and return what sends them and the
        trials' changed files to ``fs_path`` on ``fs``, which Tune runs in its background thread.

        Called in the driver's thread just after Tune's save: Ray 2.60 writes its experiment state into the
        staging folder in place, not renamed, and its background copy of one save runs beside its next
        save, so a copy that read the folder itself could send that file half written (a burst's SIGKILL
        left one so). Read here, each is as the save left it."""
        top = {}
        now = time.time()
        with os.scandir(local_path) as entries:
            for entry in entries:
                if not entry.is_file() or entry.name.startswith(".tmp"):   # Tune's temporaries, being renamed
                    continue
                st = entry.stat()
                signature = (st.st_size, st.st_mtime_ns, st.st_ino)
                # An earlier run's state files (a resumed study's staging folder holds them all) once; this
                # run's at every save: one rewritten within the clock's tick at the same size looks unchanged.
                if self._sent.get(entry.name) == signature and now - st.st_mtime > RECENT_S:
                    continue
                with open(entry.path, "rb") as f:
                    top[entry.name] = f.read(), signature
        ending, self._ending = self._ending, set()
        return lambda fs, fs_path: self.upload(local_path, fs, fs_path, top, ending)

    def upload(self, local_path: str, fs: pafs.FileSystem, fs_path: str, top: dict[str, tuple[bytes, tuple]],
               ending: frozenset[str] | set[str] = frozenset()) -> int:
        """Send the trials' files under ``local_path`` that changed, then the state files ``top`` (name ->
        (bytes, signature)), to ``fs_path`` on ``fs``; the trials' folders ``ending`` are then done. Returns
        how many files were sent."""
        sent = 0
        for rel, signature in sorted(self._changed(local_path)):
            try:
                with open(os.path.join(local_path, rel), "rb") as f:
                    self._put(fs, fs_path, rel, f.read(), sync=False)   # logs: a power loss may cut them
            except FileNotFoundError:   # gone from the staging folder since it was listed
                continue
            self._sent[rel] = signature
            sent += 1
        for name in sorted(top, key=self.goes_last):
            data, signature = top[name]
            self._put(fs, fs_path, name, data)
            self._sent[name] = signature
        self._done |= ending
        return sent + len(top)

    def goes_last(self, name: str) -> tuple[bool, str]:
        """The order of the state files: the ``last`` pattern's after the others."""
        return bool(self.last) and fnmatch.fnmatch(name, self.last), name

    def _put(self, fs: pafs.FileSystem, fs_path: str, rel: str, data: bytes, sync: bool = True) -> None:
        path = f"{fs_path.rstrip('/')}/{rel}"
        parent = path.rsplit("/", 1)[0]
        write_bytes(fs, path, data, make_parent=is_local(fs) and parent not in self._made, sync=sync)
        self._made.add(parent)

    def _changed(self, local_path: str):
        """(relative path, signature) of the trials' files (below the top level) changed since last sent."""
        with os.scandir(local_path) as entries:
            folders = [e.path for e in entries if e.is_dir() and e.name not in self._done]
        for top in folders:
            for folder, _, files in os.walk(top):
                for name in files:
                    if name.startswith(".tmp"):
                        continue
                    path = os.path.join(folder, name)
                    try:
                        st = os.stat(path)
                    except FileNotFoundError:
                        continue
                    signature = (st.st_size, st.st_mtime_ns, st.st_ino)
                    rel = os.path.relpath(path, local_path).replace(os.sep, "/")
                    if self._sent.get(rel) != signature:
                        yield rel, signature
