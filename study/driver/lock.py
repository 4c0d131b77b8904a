"""One driver per study: a lock file in the study folder, on a local disk or an object store.

Two drivers of the same study would both write its tables and one driver's trials
would vanish from them. ``StudyLock(root)`` writes ``<root>/driver.lock`` holding the
owner (host, pid, a random token) and a heartbeat time that a thread refreshes every
``heartbeat_s`` seconds. A second driver finds the lock and is refused
(``LockError``). A driver that crashed leaves its lock behind; the lock counts as
stale, and is taken over with a note, once its heartbeat is older than
``STALE_BEATS`` heartbeats, or at once when its owner was on this host and that
process is gone.

Object stores (s3://, gs://) have no atomic "create if absent" through pyarrow, so
there the lock is written, then read back after a moment: of two drivers starting in
the same instant, the one whose token is not there gives way. Heartbeats use wall
clocks: hosts sharing a study need roughly synchronised clocks (NTP).
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from typing import TYPE_CHECKING

from study.cli import ProjectError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

LOCK_FILE = "driver.lock"
HEARTBEAT_S = float(os.environ.get("COLORIZE_LOCK_HEARTBEAT_S", "15"))
STALE_BEATS = 4
SETTLE_S = 1.0   # object stores: how long to wait before reading a just-written lock back


class LockError(ProjectError):
    """Another driver holds the study."""


def _read(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}   # half-written or not JSON: treated as stale below (no heartbeat)
    except OSError as e:   # the storage itself failed: never guess that the lock is free
        raise LockError(f"cannot read the study lock {path}: {e}; check the storage and try again") from None


def _alive_here(record: dict) -> bool | None:
    """Whether the owner process lives, when it ran on this host (None: another host, cannot tell)."""
    if record.get("host") != socket.gethostname():
        return None
    try:
        pid = int(record.get("pid", -1))
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    try:   # a killed driver whose parent has not reaped it yet is a zombie: dead for our purpose
        import psutil
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:  # noqa: BLE001 - psutil missing or the process just went: the kill(0) answer stands
        return True


def describe(record: dict, now: float | None = None) -> str:
    age = (now or time.time()) - float(record.get("heartbeat", 0))
    return (f"driver pid {record.get('pid', '?')} on {record.get('host', '?')} (started "
            f"{record.get('started_at', '?')}, last heartbeat {age:.0f} s ago)")


def stale_reason(record: dict, heartbeat_s: float = HEARTBEAT_S, now: float | None = None) -> str | None:
    """Why the lock may be taken over, or None while its owner looks alive."""
    if not record or "heartbeat" not in record:
        return "the lock file is unreadable"
    if _alive_here(record) is False:
        return f"process {record.get('pid')} on this host is gone"
    age = (now or time.time()) - float(record["heartbeat"])
    if age > STALE_BEATS * float(record.get("heartbeat_s", heartbeat_s)):
        return f"its last heartbeat is {age:.0f} s old"
    return None


def holder(root: str) -> dict | None:
    """The live lock record of the study at ``root``, or None (no lock, or a stale one)."""
    # pyarrow and pandas load here, not for a command that refuses a bad option
    from study.results import resolve

    fs, path = resolve(root)
    record = _read(fs, f"{path}/{LOCK_FILE}")
    return None if record is None or stale_reason(record) else record


def check_unlocked(root: str) -> None:
    """Refuse (``LockError``) a study another live driver runs."""
    held = holder(root)
    if held is not None:
        raise LockError(refusal(root, held))


def refusal(root: str, record: dict) -> str:
    return (f"the study at {root} is being run by another {describe(record)}; wait for it to end, or use "
            f"--name for a new study. If that driver is dead (another host), its lock "
            f"{root.rstrip('/')}/{LOCK_FILE} goes stale after {STALE_BEATS * HEARTBEAT_S:.0f} s without a heartbeat")


class StudyLock:
    def __init__(self, root: str, heartbeat_s: float = HEARTBEAT_S, log=print, pid: int | None = None):
        """``pid``: the process that stands for the driver (the command the user started; default this one)."""
        self.root = root
        import pyarrow.fs as pafs

        from study.results import resolve

        self.fs, folder = resolve(root)
        self.folder = folder.rstrip("/")
        self.path = f"{self.folder}/{LOCK_FILE}"
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.heartbeat_s = heartbeat_s
        self.log = log
        self.token = secrets.token_hex(8)
        self.record = {"host": socket.gethostname(), "pid": pid or os.getpid(), "token": self.token,
                       "started_at": time.strftime("%Y-%m-%d %H:%M:%S"), "heartbeat_s": heartbeat_s}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    # ---- taking and giving back
    def acquire(self) -> "StudyLock":
        existing = _read(self.fs, self.path)
        if existing is not None:
            reason = stale_reason(existing, self.heartbeat_s)
            if reason is None:
                raise LockError(refusal(self.root, existing))
            self.log(f"note: taking over a stale lock of the study ({reason}): {describe(existing)}")
            self._delete()
        self.fs.create_dir(self.folder, recursive=True)
        if self.local:
            try:   # O_EXCL: of two drivers racing here exactly one creates the file
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise LockError(refusal(self.root, _read(self.fs, self.path) or {})) from None
            with os.fdopen(fd, "w") as f:
                f.write(self._payload())
        else:
            self._write()
            time.sleep(SETTLE_S)
            seen = _read(self.fs, self.path) or {}
            if seen.get("token") != self.token:
                raise LockError(refusal(self.root, seen))
        self._thread = threading.Thread(target=self._beat, name="study-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if (_read(self.fs, self.path) or {}).get("token") == self.token:
            self._delete()

    def __enter__(self) -> "StudyLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- internals
    def _payload(self) -> str:
        return json.dumps({**self.record, "heartbeat": time.time()}, indent=1)

    def _write(self) -> None:
        data = self._payload().encode()
        if self.local:   # replace atomically: a reader never sees half a record
            tmp = f"{self.path}.{self.token}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        else:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)

    def _delete(self) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                seen = _read(self.fs, self.path)
                if seen is not None and seen.get("token") not in (None, self.token):
                    if not self.lost:
                        self.log(f"warning: another driver took over the study's lock: {describe(seen)}")
                    self.lost = True
                    continue
                self._write()
            except (OSError, LockError) as e:   # a storage hiccup: try again next beat; ours until stale
                self.log(f"warning: could not refresh the study lock {self.path}: {e}")
