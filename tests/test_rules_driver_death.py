"""A driver that dies at once (SIGKILL, the OOM killer) leaves no process of its private Ray behind: the
command that starts it also starts a watchdog (study/driver/watchdog.py), which kills every process carrying
the run's token once the driver has ended, however it ended; Ray's own agents would linger about a minute.

The rule is checked on plain processes (any shape: in the driver's session, its own session, its own group,
deaf to SIGTERM, an orphaned grandchild, a process that blanked its environment, a process of neither), and
on real studies whose command or driver is SIGKILLed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import PYTHON, python_env
from test_study import session_processes, space_file

from study.driver.stopping import OWN_SESSION_ENV, RUN_TOKEN_ENV, start_watchdog

GONE_WITHIN_S = 10.0   # after the driver's death; the watchdog itself takes well under a second
RAY_PROCESSES = ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
TRIAL = "ray::ColorizeTrial"   # a trial's worker, training


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie has ended; a pid taken by a new process is not the one seen)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(procs: list[psutil.Process], within_s: float) -> tuple[list[psutil.Process], float]:
    t0 = time.monotonic()
    while alive(procs) and time.monotonic() - t0 < within_s:
        time.sleep(0.1)
    return alive(procs), time.monotonic() - t0


# A stand-in driver: it starts processes of every shape with the token, prints their pids, and waits.
DRIVER = r"""
import os, subprocess, sys, time
shapes = {
    "same group": {},
    "own session": {"start_new_session": True},
    "own group": {"process_group": 0},
    "deaf to SIGTERM": {"start_new_session": True, "preexec_fn": lambda: __import__("signal").signal(15, 1)},
    "its session, no token": {"env": {}},   # as /proc shows a Ray agent's blanked environment
}
pids = {}
for name, kw in shapes.items():
    pids[name] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], **kw).pid
# a grandchild whose parent has gone: reparented, as Ray's agents are once the raylet dies
mid = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', "
                        "'import time; time.sleep(300)'], start_new_session=True).pid)"], stdout=subprocess.PIPE, text=True)
pids["orphaned grandchild"] = int(mid.stdout.readline())
mid.wait()
print("\n".join(f"{k}\t{v}" for k, v in pids.items()), flush=True)
print("ready", flush=True)
time.sleep(300 if sys.argv[1] == "wait" else 0)
"""


@pytest.mark.parametrize("ending", ["SIGKILL", "SIGTERM", "exits"])
def test_the_watchdog_ends_every_process_with_the_token_once_the_driver_has_ended(ending):
    token = f"test-{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, RUN_TOKEN_ENV: token}
    driver = subprocess.Popen([PYTHON, "-c", DRIVER, "wait" if ending != "exits" else "exit"], env=env,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    unmarked = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(300)"])   # no token: never touched
    children = {}
    try:
        assert start_watchdog(driver.pid, f"{RUN_TOKEN_ENV}={token}")
        for line in driver.stdout:
            if line.strip() == "ready":
                break
            if "\t" in line:
                shape, pid = line.rstrip("\n").split("\t")
                children[shape] = psutil.Process(int(pid))
        assert len(children) == 6, children
        if ending != "exits":
            driver.send_signal(getattr(signal, ending))
        driver.wait(timeout=60)
        left, took = wait_gone(list(children.values()), GONE_WITHIN_S)
        assert not left, f"alive {took:.1f} s after the driver ended: {[(p.pid, p.cmdline()) for p in left]}"
        assert unmarked.poll() is None   # only the run's processes
    finally:
        for p in alive(list(children.values())):
            p.kill()
        unmarked.kill()
        driver.kill()


def test_without_a_pidfd_no_watchdog_starts_and_nothing_breaks():
    assert start_watchdog(2 ** 22 + 7, f"{RUN_TOKEN_ENV}=x") is False   # no such process


def _study_processes(sid: int) -> list[psutil.Process]:
    """The command's session, the processes naming it in their environment, and the whole session of the
    driver it started (Ray's agents rename themselves, which blanks the environment /proc shows)."""
    pids = {pid for pid, _ in session_processes(sid)}
    drivers = {pid for pid in pids if pid != sid and _sid(pid) == pid}
    pids |= {p.pid for p in psutil.process_iter() if _sid(p.pid) in drivers}
    out = []
    for pid in sorted(pids):
        try:
            out.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return out


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["the command"])   # its driver then dies of the parent-death signal
def test_a_sigkilled_study_leaves_no_ray_process(tmp_path, cache_dir, victim):
    """A real study, SIGKILLed mid-run (the command the user started, or the driver it runs in a session of
    its own): within seconds no process of its Ray (GCS, raylet, agents, trial workers) is left."""
    space = space_file(tmp_path, "tiny", num_samples=4, max_concurrent=2, params={"epochs": 1000})
    cmd = [PYTHON, "-m", "study.run", "--space", space, "--storage", str(tmp_path / "studies"), "--cache-dir",
           str(cache_dir), "--num-cpus", "2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=python_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    procs: list[psutil.Process] = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, "the study ended before it could be killed"
            procs = _study_processes(proc.pid)
            names = " ".join(" ".join(p.cmdline()) for p in alive(procs))
            if all(n in names for n in (*RAY_PROCESSES, TRIAL)):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the study did not get its Ray and a trial up: {names}")
        driver = [p for p in procs if p.pid != proc.pid and p.environ().get(OWN_SESSION_ENV) == str(proc.pid)
                  and "study.run" in " ".join(p.cmdline())]
        assert len(driver) == 1, [p.cmdline() for p in procs]
        marker = f"{RUN_TOKEN_ENV}={driver[0].environ()[RUN_TOKEN_ENV]}"
        watchdog = [p for p in psutil.process_iter(["cmdline"]) if marker in (p.info["cmdline"] or [])]
        assert len(watchdog) == 1 and alive(watchdog), "no watchdog watches the driver"
        (proc if victim == "the command" else driver[0]).kill()
        left, took = wait_gone(procs, GONE_WITHIN_S)
        assert not left, (f"{took:.1f} s after SIGKILL of {victim}, still alive: "
                          f"{[(p.pid, ' '.join(p.cmdline())[:80]) for p in left]}; the watchdog is "
                          f"{'alive' if alive(watchdog) else 'gone'}")
        assert not wait_gone(watchdog, GONE_WITHIN_S)[0]   # its work done, it is gone too
    finally:
        for p in alive(procs):
            p.kill()
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
