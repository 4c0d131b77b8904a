"""Ends what is left of a study's private Ray once its driver has ended, however it ended (SIGKILL too).

When the driver dies at once, Ray's GCS and raylet die with it (Ray's own fate sharing), but its dashboard
and runtime-env agents stay: they first try to tell the dead GCS that the raylet died and wait a minute for
it. So the command that starts the driver (``in_own_session``) starts this watchdog beside it, with the
driver's pidfd: once the driver has ended, the watchdog SIGKILLs every process of the run, then exits. A
process is the run's when it is in the driver's session (the driver leads a session of its own), or when it
carries the run's token in its environment (the driver set it before Ray started, so a process that left
the session has it). Both are needed: Ray's agents rename themselves (setproctitle), which blanks the
environment /proc shows, and a trial's worker may start a session of its own. The watchdog runs in a
session of its own, so a signal to the command's process group leaves it to its work.

Run as a file (``python -I watchdog.py FD NAME=TOKEN SID``): it needs the standard library only, and
starting it costs no import of the project.
"""
from __future__ import annotations

import os
import select
import signal
import sys
import time
from pathlib import Path

SWEEP_S = 10.0     # how long it keeps killing processes that still carry the token (one may be starting)
POLL_S = 0.2


def wait_for_end(pidfd: int) -> None:
    """Block until the process of ``pidfd`` has ended (a pidfd reads ready then)."""
    while True:
        try:
            ready, _, _ = select.select([pidfd], [], [])
        except InterruptedError:
            continue
        if ready:
            return


def marked(marker: bytes, sid: int) -> list[int]:
    """The live processes (zombies aside) in session ``sid`` or whose environment holds ``marker``
    (``NAME=TOKEN``), this one aside. A process whose pid is ``sid`` is not the dead leader but a stranger
    that got its pid (and leads a session of its own): left alone."""
    me, out = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in (me, sid):
            continue
        try:
            ours = os.getsid(int(d.name)) == sid or marker in (d / "environ").read_bytes().split(b"\0")
            if ours and not _zombie(d):
                out.append(int(d.name))
        except OSError:   # gone meanwhile (ProcessLookupError too), or not ours to read
            pass
    return out


def _zombie(proc: Path) -> bool:
    return (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def sweep(marker: bytes, sid: int, within_s: float = SWEEP_S) -> int:
    """SIGKILL every process of the run (``marked``) until none is left (or ``within_s`` ran out); how many."""
    deadline, killed = time.monotonic() + within_s, set()
    while True:
        pids = marked(marker, sid)
        if not pids or time.monotonic() > deadline:
            return len(killed)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(POLL_S)


def main(argv: list[str]) -> int:
    pidfd, marker, sid = int(argv[0]), argv[1].encode(), int(argv[2])
    for sig in (signal.SIGINT, signal.SIGHUP):   # a terminal's Ctrl-C or hang-up is for the study, not for this
        signal.signal(sig, signal.SIG_IGN)
    wait_for_end(pidfd)
    sweep(marker, sid)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
