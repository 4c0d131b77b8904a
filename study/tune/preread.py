"""A resumed study's Optuna trials, read in a process of their own while the driver checks the study.

Reading every trial of a large study through Optuna's RDB storage is SQLAlchemy work in Python (about 5 s
for 10,000 trials on 2 cores) that would hold the driver's interpreter while it checks the study and starts
Ray. ``OptunaRead`` reads them in a child process on another core, through Optuna's cached storage
(``optuna.storages.get_storage``), and hands that storage back pickled, its cache full (Optuna's storages
pickle, for multiprocessing; the engine is made again on unpickling).

Invariant: what the driver gets is never staler than the database. Optuna's cached storage keeps only
finished trials from a read (a finished trial never changes) and reads every unfinished and newer trial
again when asked, so the driver's first question reads what changed since the child's read. That is how
Optuna 5's cached storage behaves, not a documented promise: ``tests/test_preread.py`` holds it (a trial
ended and a trial added after the read are both seen).

The child only reads. It is started once ``--resume``'s check has found the study in its database (so
it opens nothing that is not there), gets the URL on its standard input (never in its command line, where
a password would show), and is stopped when the driver no longer needs it or exits. Whatever goes wrong
in it, the driver reads the study itself, as without it (``storage`` returns None).
"""
from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import weakref

from study.urls import scrub

log = logging.getLogger("study")


class OptunaRead:
    """The Optuna study ``name`` at ``url``, being read by a child process from now on."""

    def __init__(self, url: str, name: str):
        self._url = url
        self._proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._stop = weakref.finalize(self, _kill, self._proc)   # at the latest when the driver exits
        try:   # the pipe stays open (communicate closes it): the child reads two lines
            self._proc.stdin.write(f"{url}\n{name}\n".encode())
            self._proc.stdin.flush()
        except OSError:   # it died at once: storage() says so
            pass

    def storage(self):
        """Optuna's cached storage with every trial read (waits for the child); None when the child failed."""
        if not self._stop.alive:
            return None
        out, err = self._proc.communicate()
        self._stop()
        if self._proc.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            # A signal stops the driver too; anything else is worth a line (the driver's read takes longer).
            say = log.debug if self._proc.returncode < 0 else log.warning
            say("note: the Optuna study was not read ahead (exit %s: %s); the driver reads it", self._proc.returncode,
                scrub(lines[-1], self._url) if lines else "no message")
            return None
        try:
            return pickle.loads(out)
        except Exception as e:  # noqa: BLE001 - anything the child wrote that is not a storage
            log.debug("the Optuna study read ahead cannot be used: %s", e)
            return None

    def close(self) -> None:
        """Stop the child if it still runs (the driver no longer needs what it reads)."""
        self._stop()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None and not stream.closed:
            stream.close()


def read(url: str, name: str) -> bytes:
    """Every trial of the study ``name`` at ``url`` in Optuna's cached storage, pickled."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.get_storage(url)
    optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)   # fills its cache
    return pickle.dumps(storage, protocol=pickle.HIGHEST_PROTOCOL)


def write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd``: one write may take part of it (a pipe, a signal), and under ``python -u``
    (PYTHONUNBUFFERED) ``sys.stdout.buffer`` is a single write that says how much it took."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


if __name__ == "__main__":
    url, name = sys.stdin.readline().rstrip("\n"), sys.stdin.readline().rstrip("\n")
    write_all(sys.stdout.fileno(), read(url, name))
