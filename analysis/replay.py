"""Search strategies replayed on recorded learning curves, on a simulated clock: no training.

A *curve* is one recorded configuration: its values on the searched axes and, for each epoch, its val
PSNR (what the study ranks and prunes by), its test gain over the grayscale input (what is reported)
and its recorded seconds. A strategy is an Optuna sampler and pruner (real ones, through ask/tell and
``trial.report``/``should_prune`` on an in-memory study) or a fixed list of configurations (a grid).

The clock: ``concurrency`` workers; a free worker asks for a trial; the sampler's proposal maps to its
*nearest recorded configuration* (one per categorical axis that differs, plus ``|t(a) - t(b)| / (t(hi) -
t(lo))`` per continuous axis, t = log for a log-uniform one; ties go to the smaller id, as in
study.space.replay, which maps a study's trials by the same rule), and the trial
replays that configuration's epochs, each ending its recorded seconds after the previous one. Epoch ends
are handled in time order: the epoch's val PSNR is reported and the pruner asked. A trial's compute is
the sum of the recorded seconds of the epochs it ran. The best found after any epoch end is the epoch
with the highest val PSNR reported so far (the study's best-epoch rule, pruned trials included); its
test gain is what the strategy "found".

No torch and no Ray here: Ray's ASHA is driven by ``scripts/replay_search.py`` through the ``Judge``
interface below.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from study.results import epoch_gain

CONTINUOUS = ("loguniform", "uniform")


@dataclass(frozen=True)
class Axis:
    """One searched parameter: ``kind`` choice (``values`` the choices) or loguniform/uniform (``values``
    the bounds)."""
    name: str
    kind: str
    values: tuple

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.values))
        return trial.suggest_float(self.name, float(self.values[0]), float(self.values[1]),
                                   log=self.kind == "loguniform")

    def coordinate(self, v) -> np.ndarray:
        """A continuous value's place in its range, 0 at the low bound and 1 at the high one."""
        t = np.log if self.kind == "loguniform" else np.asarray
        lo, hi = (float(t(b)) for b in self.values)
        return (np.asarray(t(np.asarray(v, dtype=float)), dtype=float) - lo) / (hi - lo)


def axes_from_meta(space: dict) -> tuple[Axis, ...]:
    """The axes of a curves table's metadata ``space`` (``{name: [choices] or ["loguniform", lo, hi]}``)."""
    out = []
    for name, spec in space.items():
        if isinstance(spec, (list, tuple)) and len(spec) == 3 and spec[0] in CONTINUOUS:
            out.append(Axis(name, spec[0], (float(spec[1]), float(spec[2]))))
        else:
            out.append(Axis(name, "choice", tuple(spec)))
    return tuple(out)


@dataclass(frozen=True)
class Curves:
    """Recorded configurations (rows) by epoch (columns): NaN past a curve's last recorded epoch."""
    ids: tuple[str, ...]
    axes: tuple[Axis, ...]
    params: tuple[dict, ...]
    val: np.ndarray          # val PSNR (dB)
    test_gain: np.ndarray    # test PSNR gain over the grayscale input (dB)
    seconds: np.ndarray      # the epoch's recorded wall time
    length: np.ndarray       # epochs recorded per curve
    failed: np.ndarray       # bool: the curve ended before its planned last epoch (an error, or pruned)

    def __len__(self) -> int:
        return len(self.ids)

    def nearest(self, proposal: dict) -> int:
        """The recorded configuration closest to ``proposal`` (see the module's docstring)."""
        distance = np.zeros(len(self))
        for axis in self.axes:
            column = self._columns[axis.name]
            if axis.kind == "choice":
                distance += np.array([c != proposal[axis.name] for c in column], dtype=float)
            else:
                distance += np.abs(column - axis.coordinate(proposal[axis.name]))
        return int(np.argmin(distance))   # the first of equals: curves are in id order

    @property
    def _columns(self) -> dict:
        cached = self.__dict__.get("_cols")
        if cached is None:
            cached = {a.name: (tuple(p[a.name] for p in self.params) if a.kind == "choice"
                               else a.coordinate([p[a.name] for p in self.params])) for a in self.axes}
            object.__setattr__(self, "_cols", cached)
        return cached

    def best_epoch(self, k: int) -> int:
        """Index of curve ``k``'s best epoch by val PSNR (the earliest on ties)."""
        return int(np.nanargmax(self.val[k, :self.length[k]]))

    def best(self) -> int:
        """The curve whose best epoch has the highest val PSNR (the earlier curve on ties)."""
        scores = [self.val[k, self.best_epoch(k)] for k in range(len(self))]
        return int(np.argmax(scores))

    def found(self, k: int) -> float:
        """Curve ``k``'s test gain at its best epoch: what a study reports for it."""
        return float(self.test_gain[k, self.best_epoch(k)])


def curves_from_frame(rows: pd.DataFrame, key: str, axes: tuple[Axis, ...], planned: pd.Series) -> Curves:
    """Curves from epoch rows (``key``, ``epoch``, the axes, ``val_psnr``, ``test_psnr``,
    ``test_gray_psnr``, ``seconds``); ``planned``: each key's planned epochs. Rows without a finite val
    PSNR (a failed epoch) end their curve."""
    rows = rows[np.isfinite(rows["val_psnr"].astype(float))].sort_values([key, "epoch"], kind="stable")
    ids = tuple(dict.fromkeys(rows[key]))
    width = int(rows.groupby(key)["epoch"].size().max())
    shape = (len(ids), width)
    val, test, seconds = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    params, length = [], np.zeros(len(ids), dtype=int)
    for k, (_, group) in enumerate(rows.groupby(key, sort=False)):
        n = len(group)
        length[k] = n
        val[k, :n] = group["val_psnr"].to_numpy(float)
        test[k, :n] = epoch_gain(group, "test").to_numpy(float)
        seconds[k, :n] = np.nan_to_num(group["seconds"].to_numpy(float), nan=0.0)
        params.append({a.name: _plain(group[a.name].iloc[0]) for a in axes})
    failed = np.array([length[k] < int(planned.get(i, length[k])) for k, i in enumerate(ids)])
    return Curves(ids, axes, tuple(params), val, test, seconds, length, failed)


def _plain(v):
    """A numpy scalar as the Python value Optuna's distributions compare with."""
    return v.item() if hasattr(v, "item") else v


# ------------------------------------------------------------------ strategies


@dataclass(frozen=True)
class Strategy:
    """A sampler and a pruner in a space file's syntax (``{name: tpe, ...}``); ``proposals``: fixed
    configurations tried in this order instead of sampling (a grid), ``note`` what the docs say of it."""
    name: str
    sampler: dict
    pruner: dict
    proposals: tuple[dict, ...] = ()
    note: str = ""


# The strategies any curves can be replayed with (no Ray): Optuna's defaults unless stated.
STRATEGIES = (
    Strategy("random", {"name": "random"}, {"name": "none"}, note="random search, no pruning"),
    Strategy("tpe", {"name": "tpe"}, {"name": "none"}, note="TPE (constant liar), no pruning"),
    Strategy("tpe+median", {"name": "tpe"}, {"name": "median"},
             note="TPE + median pruner (Optuna's defaults: 5 startup trials, from the first epoch)"),
    Strategy("tpe+sha", {"name": "tpe"}, {"name": "successive_halving", "min_resource": 1},
             note="TPE + Optuna's successive halving (min resource 1 epoch, reduction factor 4)"),
    Strategy("tpe+hyperband", {"name": "tpe"}, {"name": "hyperband", "min_resource": 1},
             note="TPE + Optuna's Hyperband (min resource 1 epoch, reduction factor 3)"),
    # Random search with Optuna's pruners: what a space can choose that is closest to Ray's ASHA.
    Strategy("random+median", {"name": "random"}, {"name": "median"},
             note="random search + median pruner (Optuna's defaults)"),
    Strategy("random+sha", {"name": "random"}, {"name": "successive_halving", "min_resource": 1},
             note="random search + Optuna's successive halving (min resource 1 epoch, reduction factor 4)"),
)


class OptunaJudge:
    """Optuna's own pruner: each epoch's val PSNR is reported to the trial, which is asked to stop."""

    def add(self, trial) -> None:
        pass

    def should_stop(self, trial, epoch: int, value: float) -> bool:
        trial.report(value, epoch)
        return trial.should_prune()

    def complete(self, trial, epoch: int, value: float) -> None:
        pass


class OptunaFactories:
    """Optuna's samplers and pruners from a space file's spec, as ``study.space`` makes them (TPE with a
    constant liar, so concurrent asks differ); ``tests/test_replay.py`` holds the two to the same result.
    The replay script passes ``study.space``'s own factories instead."""

    def sampler(self, spec: dict, seed: int):
        import optuna

        opts = {k: v for k, v in spec.items() if k != "name"}
        if spec["name"] == "tpe":
            opts.setdefault("constant_liar", True)
        cls = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}[spec["name"]]
        return cls(seed=seed, **opts)

    def pruner(self, spec: dict):
        import optuna

        cls = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
               "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
               "hyperband": optuna.pruners.HyperbandPruner}[spec["name"]]
        return cls(**{k: v for k, v in spec.items() if k != "name"})

    def judge(self, strategy: Strategy, seed: int, epochs: int):
        return OptunaJudge()


# ------------------------------------------------------------------ the simulated clock


@dataclass
class Run:
    """One replay: after each epoch end (in time order) the compute spent so far, the clock and the test
    gain of the best found; and what became of the trials."""
    strategy: str
    seed: int
    concurrency: int
    compute: np.ndarray
    clock: np.ndarray
    found: np.ndarray
    found_val: np.ndarray
    configs: list[int] = field(default_factory=list)    # each trial's curve, in start order
    pruned: list[bool] = field(default_factory=list)    # each trial: stopped before its curve's end

    def compute_to(self, target: float) -> float:
        """Compute spent when the best found first reached a test gain of ``target`` (inf: never)."""
        hit = np.flatnonzero(self.found >= target - 1e-12)
        return float(self.compute[hit[0]]) if hit.size else math.inf


@dataclass
class _Running:
    trial: object
    curve: int
    epoch: int = 0          # epochs done
    best: float = -math.inf


def simulate(curves: Curves, strategy: Strategy, seed: int, trials: int, concurrency: int,
             factories=None) -> Run:
    """``trials`` trials of ``strategy`` on ``concurrency`` workers (see the module's docstring)."""
    import optuna

    factories = factories or OptunaFactories()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=factories.sampler(strategy.sampler, seed),
                                pruner=factories.pruner(strategy.pruner))
    judge = factories.judge(strategy, seed, int(curves.length.max()))
    trials = min(trials, len(strategy.proposals)) if strategy.proposals else trials
    run = Run(strategy.name, seed, concurrency, *(np.empty(0),) * 4)
    events: list = []
    log: list[tuple[float, float, float, float]] = []
    state = {"compute": 0.0, "val": -math.inf, "test": math.nan}

    def start(now: float) -> None:
        if len(run.configs) >= trials:
            return
        trial = study.ask()
        proposal = (strategy.proposals[len(run.configs)] if strategy.proposals
                    else {a.name: a.suggest(trial) for a in curves.axes})
        k = curves.nearest(proposal)
        run.configs.append(k)
        run.pruned.append(False)
        judge.add(trial)
        heapq.heappush(events, (now + curves.seconds[k, 0], len(run.configs) - 1, _Running(trial, k)))

    for _ in range(concurrency):
        start(0.0)
    while events:
        now, index, r = heapq.heappop(events)
        if _epoch_end(curves, study, judge, r, index, now, state, run, events):
            start(now)
        log.append((state["compute"], now, state["test"], state["val"]))
    columns = list(zip(*log)) if log else [()] * 4
    run.compute, run.clock, run.found, run.found_val = (np.array(c, dtype=float) for c in columns)
    return run


def _epoch_end(curves: Curves, study, judge, r: _Running, index: int, now: float, state: dict, run: Run,
               events: list) -> bool:
    """One epoch of a running trial ends at ``now``: count it, update the best found, ask the judge.
    True when the trial ended (its worker is free)."""
    import optuna

    k, e = r.curve, r.epoch
    value = float(curves.val[k, e])
    state["compute"] += float(curves.seconds[k, e])
    if value > state["val"]:
        state["val"], state["test"] = value, float(curves.test_gain[k, e])
    r.epoch, r.best = e + 1, max(r.best, value)
    last = r.epoch >= curves.length[k]
    stop = judge.should_stop(r.trial, r.epoch, value)
    if last and curves.failed[k]:   # the recorded curve ends here: replay cannot go on
        study.tell(r.trial, state=optuna.trial.TrialState.FAIL)
    elif last:
        judge.complete(r.trial, r.epoch, value)
        study.tell(r.trial, r.best)
    elif stop:
        judge.complete(r.trial, r.epoch, value)
        run.pruned[index] = True
        study.tell(r.trial, state=optuna.trial.TrialState.PRUNED)
    else:
        heapq.heappush(events, (now + curves.seconds[k, r.epoch], index, r))
        return False
    return True


# ------------------------------------------------------------------ many seeds


@dataclass(frozen=True)
class Job:
    strategy: Strategy
    seed: int
    trials: int
    concurrency: int


def _run_job(args) -> Run:
    curves, job, factories = args
    return simulate(curves, job.strategy, job.seed, job.trials, job.concurrency, factories)


def run_jobs(curves: Curves, jobs: list[Job], factories=None, processes: int = 1,
             progress: Callable[[Run], None] = lambda run: None) -> list[Run]:
    """Every job, over ``processes`` worker processes (1: in this one), in the jobs' order."""
    work = [(curves, job, factories) for job in jobs]
    if processes <= 1:
        runs = []
        for w in work:
            runs.append(_run_job(w))
            progress(runs[-1])
        return runs
    import multiprocessing

    pool = multiprocessing.get_context("fork").Pool(processes, initializer=_plain_signals)
    try:
        runs = []
        for run in pool.imap(_run_job, work, chunksize=1):
            runs.append(run)
            progress(run)
        pool.close()
    finally:
        pool.terminate()
        pool.join()
    return runs


def _plain_signals() -> None:
    """A worker dies quietly when its pool ends it (it inherits the command's handlers otherwise)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the parent, which ends the pool


def table_curves(path) -> Curves:
    """The curves of a table ``scripts/record_curves.py`` wrote (its metadata names the space)."""
    import json

    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {})[b"curves"])
    rows = table.to_pandas()
    planned = rows.groupby("config_id")["epochs"].first()
    return curves_from_frame(rows, "config_id", axes_from_meta(meta["space"]), planned)
