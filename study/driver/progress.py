"""A study's running time, time budget and progress, as the driver sees them.

``StudyClock``: the study's running time counts across interruptions and resumes, never the time
it was down: each run adds its own wall time to what ``status.json`` recorded before. A time budget
is granted at some running time (``granted_at_s``) and is spent ``budget_s`` of running time later.

``Progress``: the progress line (at a steady interval and at each trial's end) and ``status.json``
beside ``study.json`` with the same figures, so another terminal (``python -m study.info``) reads them.
Plain lines, no control characters: the same in a terminal, in CI and in ``ray job logs``.
"""
from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field

from study.cli import UsageError
from study.durations import duration, parse_duration

STATUS_FILE = "status.json"


@dataclass
class StudyClock:
    spent_before_s: float = 0.0               # running time of the study's earlier runs
    budget_s: float | None = None             # None: no budget
    granted_at_s: float = 0.0                 # the study's running time when the budget was given
    started: float = field(default_factory=time.time)   # this run's start (wall clock)

    def spent(self, now: float | None = None) -> float:
        return self.spent_before_s + ((now or time.time()) - self.started)

    def left(self, now: float | None = None) -> float | None:
        if self.budget_s is None:
            return None
        return self.budget_s - (self.spent(now) - self.granted_at_s)

    @property
    def deadline(self) -> float | None:
        """The wall-clock time at which the budget is spent in this run (None: no budget)."""
        if self.budget_s is None:
            return None
        return self.started + self.budget_s - (self.spent_before_s - self.granted_at_s)

    def expired(self, now: float | None = None) -> bool:
        left = self.left(now)
        return left is not None and left <= 0


def status_record(df, total: int, clock: StudyClock, images: float, run_elapsed: float, finished_in_run: int,
                  state: str, pid: int | None = None) -> dict:
    """The figures of the progress line, as status.json holds them (``pid``: the driver's, default this process)."""
    from study.results import best_trials, gain

    counts = {k: int(v) for k, v in df.status.value_counts().items()} if df is not None else {}
    best = best_trials(df) if df is not None else None
    best_rec = None
    if best is not None and not best.empty:
        b = best.iloc[0]
        g = float(gain(best).iloc[0])
        best_rec = {"trial_id": str(b.trial_id), "gain_db": g if math.isfinite(g) else None,
                    "val_psnr": float(b.best_val_psnr), "dataset": str(b.get("dataset", "")),
                    "variant": " ".join(str(b.get(k, "")) for k in ("sampling", "output"))}
    now = time.time()
    ended = sum(counts.get(s, 0) for s in ("DONE", "PRUNED", "ERROR"))
    projected = None
    if finished_in_run > 0 and total > ended:
        projected = now + (total - ended) * run_elapsed / finished_in_run
    elif total <= ended:
        projected = now
    deadline = clock.deadline
    return {"updated": now, "state": state, "host": socket.gethostname(), "pid": pid or os.getpid(),
            "counts": counts, "total": int(total), "best": best_rec,
            "model_images_per_s": images / run_elapsed if run_elapsed > 0 else 0.0,
            "elapsed_s": clock.spent(now), "budget_s": clock.budget_s, "budget_left_s": clock.left(now),
            "budget_ends": deadline, "projected_finish": projected}


def clock_time(t: float, now: float, form: str = "%H:%M:%S") -> str:
    """The local time ``t`` as a clock shows it; one on a later day than ``now`` carries its date (and its
    year when that is a later one): a projection days away must not read as today's."""
    at, today = time.localtime(t), time.localtime(now)
    if at.tm_year > today.tm_year:
        form = f"%Y %b %d {form}"
    elif (at.tm_year, at.tm_yday) > (today.tm_year, today.tm_yday):
        form = f"%b %d {form}"
    return time.strftime(form, at)


def progress_line(rec: dict) -> str:
    c, total, now = rec["counts"], rec["total"], rec.get("updated") or time.time()
    ended = sum(c.get(s, 0) for s in ("DONE", "PRUNED", "ERROR"))
    line = (f"[{time.strftime('%H:%M:%S')}] trials {ended}/{total} ended: {c.get('DONE', 0)} done, "
            f"{c.get('PRUNED', 0)} pruned, {c.get('ERROR', 0)} errored; {c.get('RUNNING', 0)} running, "
            f"{c.get('STOPPED', 0)} stopped")
    b = rec["best"]
    if b is not None:
        g = b["gain_db"]
        line += (f" | best {g:+.2f} dB over gray ({b['trial_id']}, {b['dataset']} {b['variant']})" if g is not None
                 else f" | best {b['val_psnr']:.2f} dB ({b['trial_id']})")
    line += f" | {rec['model_images_per_s']:,.0f} model-images/s | elapsed {duration(rec['elapsed_s'])}"
    if rec["projected_finish"] is not None:
        line += f" | projected finish {clock_time(rec['projected_finish'], now, '%H:%M')}"
    if rec["budget_ends"] is not None:
        ends = clock_time(rec["budget_ends"], now)
        if rec["budget_left_s"] > 0:
            line += f" | budget ends {ends} ({duration(math.ceil(rec['budget_left_s']))} left)"
        elif rec["state"] == "running":
            line += f" | budget spent at {ends}: stopping (trials that trained an epoch stop at its end)"
        else:
            line += f" | budget spent at {ends}"
    return line


def time_budget(args, meta: dict | None, space, clock) -> dict:
    """The study's time budget as study.json records it: ``{"seconds": B or None, "granted_at_s": S}``, a
    budget of B seconds of running time from the study's running time S. ``--time-budget`` on a resume
    grants a new one from now; without it a resumed study keeps its own, and one already spent is refused."""
    recorded = (meta or {}).get("time_budget") or {"seconds": None, "granted_at_s": 0.0}
    if args.time_budget is not None:
        return {"seconds": parse_duration(args.time_budget), "granted_at_s": clock.spent_before_s}
    if meta is None or not args.resume:
        return {"seconds": space.time_budget_s, "granted_at_s": 0.0}
    clock.budget_s, clock.granted_at_s = recorded.get("seconds"), float(recorded.get("granted_at_s") or 0.0)
    if clock.expired(clock.started):
        raise UsageError(f"--resume: the study's time budget ({recorded['seconds']:g} s of running time) is spent; "
                         f"give it more with --time-budget (e.g. --time-budget 1h, counted from now) or run it "
                         f"to the end with --time-budget none (nothing was changed)")
    return recorded


def spent_before(root: str) -> float:
    """The study's running time in its earlier runs, as its last status.json says."""
    from study.results import read_json

    return float((read_json(root, STATUS_FILE) or {}).get("elapsed_s") or 0.0)


def more_trials(root: str, meta: dict, wanted: int, saved: tuple[int, int] | None) -> int:
    """``--resume --num-samples N``: the study's new total of trials (models); lowering it below what
    already started is refused."""
    pack = int(meta.get("pack", 1))
    started = (saved[0] if saved else 0) * pack
    if wanted < started:
        raise UsageError(f"--num-samples {wanted}: the study at {root} already started {started} trials; give "
                         f"at least {started} (its total is {meta.get('num_samples')}), or leave it out")
    if wanted != meta.get("num_samples"):
        print(f"note: the study's total goes from {meta.get('num_samples')} to {wanted} trials; the sampler "
              f"goes on from everything the study already knows")
    return wanted
