"""How a study run ends, told truly: its exit status, signals, and resources that can never fit.

Exit statuses of ``python -m study.run`` (README: "Exit status"):
0 the study ran as asked (its trials DONE or PRUNED, or stopped by a time budget);
2 a bad option, file or storage, before anything was written;
3 the study ran but no trial finished (every one failed, or none finished an epoch), so a Ray job
  shows FAILED;
1 any other error once work had started;
130 / 143 stopped by Ctrl-C (SIGINT) / SIGTERM (``ray job stop``, Kubernetes, ``timeout``) at a safe point:
  Ray Tune saved the study's state, and the exact ``--resume`` command is printed (or that nothing was
  started). The same whether the signal reaches the driver alone or its whole process group: the
  private Ray a local study starts runs in a session of its own (``in_own_session``), out of the
  group's reach, and stops with the study; when the driver dies at once (SIGKILL, the OOM killer) a
  watchdog (study/driver/watchdog.py) ends what is left of its Ray.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

from study.cli import UsageError

EXIT_NO_TRIAL_FINISHED = 3
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Signals:
    """SIGINT and SIGTERM stop the study at a safe point through Ray Tune's own graceful stop (its
    SIGUSR1 handler, installed while ``Tuner.fit`` runs): trials stop, Tune saves the experiment state.
    Before Tune runs there is nothing to save: the run stops at once (``KeyboardInterrupt``). A second
    signal stops at once; the same signal again within ``REPEAT_S`` is the same request (``timeout``
    sends it to the process and to its group). Tune's own SIGINT handler is off: it prints
    ``Tuner.restore(...)``, not this project's ``--resume``; and Ray's driver turns SIGTERM into an abort
    with a native dump."""

    REPEAT_S = 1.0

    def __init__(self):
        self.received: int | None = None
        self.started = False    # set once the study has started: a stop leaves it something to resume
        self._at = 0.0
        self._old: dict[int, object] = {}

    def __enter__(self) -> "Signals":
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        # Tune's "interrupted ... Tuner.restore(...)" and "Trials did not complete" lines: ours replace them.
        logging.getLogger("ray.tune.tune").setLevel(logging.CRITICAL)
        # "Failed to fetch metrics ... FileNotFoundError" for a trial stopped (budget, signal) before its first
        # epoch: it has no Ray result files yet, and the study's own tables say what each trial did.
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
        return self

    def install(self) -> None:
        """Handle SIGINT and SIGTERM from now on (again after a library installed its own)."""
        for sig in SIGNAL_EXIT:
            old = signal.signal(sig, self._handle)
            self._old.setdefault(sig, old)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.received is not None:
            if signum == self.received and now - self._at < self.REPEAT_S:
                return
            raise KeyboardInterrupt   # a second signal: stop at once
        self.received, self._at = signum, now
        tune_stop = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
        if not callable(tune_stop):
            raise KeyboardInterrupt   # Tune is not running: nothing to save
        print(f"\n{signal.Signals(signum).name} received: stopping the study at a safe point (Ray Tune saves its "
              f"state); send it again to stop at once", file=sys.stderr, flush=True)
        tune_stop(signal.SIGUSR1, frame)   # Tune's loop ends after its current step and saves

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def request_graceful_stop() -> bool:
    """End Ray Tune's loop after its current step, as Ctrl-C would, through Tune's own SIGUSR1 handler
    (installed while ``Tuner.fit`` runs): Tune saves the experiment state and returns. False outside fit."""
    handler = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
    if not callable(handler):
        return False
    handler(signal.SIGUSR1, None)
    return True


class Stopped(Exception):
    """The study stopped on a signal; ``exit_status`` is 128 + the signal's number.

    ``resume_cmd``: the command that continues it, None when nothing was started (a new study stopped before
    it started). ``at_once``: stopped before a safe point (a second signal, or before Ray Tune ran)."""

    def __init__(self, signum: int, resume_cmd: str | None, at_once: bool = False, started: bool = True):
        self.exit_status = SIGNAL_EXIT.get(signum, 128 + int(signum))
        name = signal.Signals(signum).name
        if resume_cmd is None:
            text = f"stopped by {name} before the study started: nothing was started"
        elif not started:
            text = f"stopped by {name} before this run started anything: the study is as it was. Continue it with:"
        elif at_once:
            text = (f"stopped at once by {name}: Ray Tune's last saved state (at most seconds old) is what --resume "
                    f"continues from:")
        else:
            text = f"stopped by {name}; its state is saved. Continue it with:"
        super().__init__(text if resume_cmd is None else f"{text}\n  {resume_cmd}")


def nothing_started(error: BaseException) -> Stopped | None:
    """The ``Stopped`` of a run that a signal ended before the study started (``KeyboardInterrupt``, or
    study.cli's ``Terminated`` for SIGTERM); None for any other error."""
    from study.cli import Terminated

    signum = {KeyboardInterrupt: signal.SIGINT, Terminated: signal.SIGTERM}.get(type(error))
    return Stopped(signum, None) if signum is not None else None


# Set in the driver that ``in_own_session`` starts: the pid of the command the user started, which stands for it.
OWN_SESSION_ENV = "COLORIZE_STUDY_COMMAND_PID"
# Set there too, to a token of this run: every process the driver starts (its Ray) inherits it, and the
# watchdog ends those still running once the driver has ended.
RUN_TOKEN_ENV = "COLORIZE_STUDY_RUN"


def own_session_wanted() -> bool:
    """Whether this command should run the study in a session of its own: not already in one, and on Linux
    (the parent-death signal ties the study to this process)."""
    return sys.platform.startswith("linux") and OWN_SESSION_ENV not in os.environ


def driver_pid() -> int:
    """The pid that stands for the study's driver (lock, status.json): the command the user started."""
    return int(os.environ.get(OWN_SESSION_ENV) or os.getpid())


def in_own_session(cmd: list[str]) -> int:
    """Run the driver command ``cmd`` in a session (and process group) of its own, passing it SIGINT and
    SIGTERM; returns its exit status (128 + N when signal N ended it).

    Ray's processes join the process group of the driver that starts them: a signal to the whole group
    (``timeout``, ``kill -TERM -PGID``) killed Ray's GCS and raylet under the study, whose driver then
    waited a minute for them and ended without its state saved. In a session of its own the study gets the
    signal once, from this process, as if it had been sent to the driver alone. When this process dies the
    study gets SIGKILL (Linux's parent-death signal), as its Ray does when the driver dies; once the driver
    has ended, however it ended, the watchdog (``start_watchdog``) ends what is left of its Ray."""
    import ctypes
    import subprocess
    import uuid

    prctl = ctypes.CDLL(None, use_errno=True).prctl   # looked up here: the child only calls it
    parent, child, pending = os.getpid(), None, []

    def die_with_parent() -> None:   # in the child, before it runs the command
        prctl(1, int(signal.SIGKILL))   # PR_SET_PDEATHSIG
        if os.getppid() != parent:   # the parent died before that took hold
            os._exit(128 + int(signal.SIGKILL))

    def forward(signum, frame) -> None:
        if child is None:
            pending.append(signum)
        elif child.poll() is None:
            child.send_signal(signum)

    token = uuid.uuid4().hex
    old = {sig: signal.signal(sig, forward) for sig in SIGNAL_EXIT}
    try:
        child = subprocess.Popen(cmd, env={**os.environ, OWN_SESSION_ENV: str(parent), RUN_TOKEN_ENV: token},
                                 start_new_session=True, preexec_fn=die_with_parent)
        start_watchdog(child.pid, f"{RUN_TOKEN_ENV}={token}")
        for signum in pending:
            child.send_signal(signum)
        status = child.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return status if status >= 0 else 128 - status


def start_watchdog(pid: int, marker: str) -> bool:
    """Start study/driver/watchdog.py on the process ``pid`` (a child of this one that leads a session of its
    own, not yet waited for, so its pid is still its own): once it has ended, every process left in its
    session or whose environment holds ``marker`` is killed. Returns whether it started; without pidfds
    (Linux before 5.3) Ray's agents end on their own within about a minute."""
    import subprocess

    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return False
    try:
        env = {k: v for k, v in os.environ.items() if k not in (RUN_TOKEN_ENV, OWN_SESSION_ENV)}
        subprocess.Popen([sys.executable, "-I", str(Path(__file__).with_name("watchdog.py")), str(pidfd), marker,
                          str(pid)],
                         pass_fds=(pidfd,), env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def resume_command(root: str, storage: str, name: str, space_arg: str, optuna_url: str | None,
                   num_samples: int | None = None) -> str:
    """The exact command that continues the study at ``root``, runnable from any folder. ``space_arg``: its
    ``--space`` (a shipped space's name, or the study's own copy of its space file: see study.info's
    space_argument); ``num_samples``: a new total of trials (a finished study runs more only with one)."""
    from study.urls import masked

    where = storage if "://" in storage else str(Path(storage).resolve())
    parts = ["python -m study.run", "--space", space_arg, "--name", name,
             "--storage", masked(where) if "://" in where else where, "--resume"]
    if num_samples is not None:
        parts += ["--num-samples", str(num_samples)]
    if optuna_url:
        parts += ["--optuna-storage", masked(optuna_url)]
    return " ".join(_quote(p) for p in parts)


def _quote(part: str) -> str:
    import shlex
    return part if part.startswith("python -m") else shlex.quote(part)


def outcome(root: str) -> tuple[bool, str]:
    """(whether any trial finished, a one-line account of the trials) from the study's trials table."""
    from study.results import FINISHED, read_table

    trials = read_table(root, "trials")
    if trials is None or trials.empty:
        return False, "no trial started"
    counts = trials.status.value_counts().to_dict()
    account = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    finished = trials.status.isin(FINISHED).any()
    if not finished:
        errors = trials.error.dropna()
        if len(errors):
            first = str(errors.iloc[0]).strip().splitlines()
            account += f"; the first error: {first[-1] if first else ''}"
    return bool(finished), account


def check_outcome(root: str) -> None:
    """Raise ``NoTrialFinished`` when the study ran and none of its trials finished."""
    finished, account = outcome(root)
    if not finished:
        raise NoTrialFinished(f"no trial of the study finished ({account}); each trial's error is in "
                              f"{root}/results/trials.parquet (column error)")


class NoTrialFinished(Exception):
    exit_status = EXIT_NO_TRIAL_FINISHED


def check_capacity(resources: dict, nodes: list[dict], fixed: bool) -> None:
    """A trial's resources against the nodes that could run it: on a fixed Ray (this machine's) a trial no
    node can hold is refused before anything is written; on a cluster that may grow, it is said."""
    want = {"CPU": float(resources.get("cpu", 1)), "GPU": float(resources.get("gpu", 0))}
    if not nodes or any(all(n.get(k, 0.0) >= v for k, v in want.items() if v > 0) for n in nodes):
        return
    best = {k: max(n.get(k, 0.0) for n in nodes) for k in want}
    short = ", ".join(f"{v:g} {k}" for k, v in want.items() if v > best[k])
    largest = ", ".join(f"{best[k]:g} {k}" for k in want)
    if fixed:
        raise UsageError(f"each trial asks for {short}, and this machine's Ray has at most {largest} on a node: "
                         f"no trial could ever start. Lower resources in the space (or --cpus-per-trial / "
                         f"--gpus-per-trial), or give Ray more with --num-cpus / --num-gpus")
    print(f"note: each trial asks for {short}, more than any node of the cluster has now (at most {largest}); "
          f"trials wait until the cluster's autoscaler adds such a node. Stop with Ctrl-C if it has none",
          file=sys.stderr)


def budget_summary(root: str, clock) -> str:
    """What a study stopped by its time budget did, and that it can go on."""
    from study.durations import duration
    from study.results import read_table

    trials = read_table(root, "trials")
    counts = trials.status.value_counts().to_dict() if trials is not None else {}
    account = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trial"
    return (f"time budget spent ({duration(clock.budget_s)} of running time; the study has run "
            f"{duration(clock.spent())} in all): {account}. A stopped trial goes on from its checkpoint at its "
            f"last epoch (one stopped before its first epoch starts again); continue the study with:")


def best_table(root: str) -> str:
    """The best trial per dataset x output, ranked by val PSNR in RGB (the summary of a finished study)."""
    from study.results import best_trials, gain, read_table

    best = best_trials(read_table(root, "trials"), by=["dataset", "output"])
    if best.empty:
        return "no trial finished an epoch"
    best = best.assign(vs_gray=gain(best))
    cols = ["dataset", "output", "trial_id", "status", "best_val_psnr", "val_gray_psnr", "vs_gray",
            "best_test_psnr", "best_test_ssim", "sampling", "depth", "base_filters", "lr", "batch_size",
            "loss", "epochs_run"]
    return best[[c for c in cols if c in best]].to_string(index=False, float_format=lambda v: f"{v:.4g}")
