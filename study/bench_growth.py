"""The driver's bookkeeping per result as the study grows: the same hooks, in studies of 100 to 10,000 trials.

``python -m study.bench --parts driver --growth 100,1000,10000 [--epochs E] [--concurrency C] --storage DIR``

For each size N, a study folder under DIR is filled with N ended trials (an Optuna SQLite study, as the
driver keeps one, and the results tables; a tenth run all their epochs, the rest were pruned after one to
five), then the driver's own parts, made as ``study.tune.backend.build_tuner`` makes them (the Optuna
searcher, the pruning scheduler and the results callback, given one ``DriverState``), take ``--new``
more trials at ``--concurrency`` through the hooks Ray Tune calls, in the order it calls them. What each
result costs them is timed as in a synthetic study's driver (study.tune.timings.DriverTimings: from the
scheduler getting it to the end of the callback's ``on_trial_result``). Ray's own controller is not in it:
this is the part of the driver that could grow with the study; ``--parts driver`` without ``--growth``
measures the whole driver against bare Ray Tune.
"""
from __future__ import annotations

import contextlib
import io
import math
import random
import time
from pathlib import Path

import numpy as np
import optuna
from sqlalchemy import event

from study.bench_driver import emit, prepared
from study.bench_space import PARAMS_CONSTANT, space_text
from study.config import TrialConfig
from study.driver import StudyClock
from study.results import ResultsWriter, epoch_row, trial_row
from study.space import load_space
from study.tune import (METRIC, STEP_METRIC, DriverState, DriverTimings, OptunaSearcher, ResultsCallback,
                        TimedPruningScheduler, open_study, synthetic_rows)

NAME = "growth"
DISTRIBUTIONS = {"depth": optuna.distributions.IntDistribution(2, 3),
                 "sampling": optuna.distributions.CategoricalDistribution(["maxpool-upsample", "strided-transposed"]),
                 "output": optuna.distributions.CategoricalDistribution(["rgb", "uv"]),
                 "lr": optuna.distributions.FloatDistribution(3.0e-4, 3.0e-3, log=True)}


def _pool(rng: random.Random, epochs: int, size: int = 64) -> list[tuple[dict, list[dict]]]:
    """Drawn configurations and their synthetic curves, for the filled trials to share (curves cost)."""
    out = []
    for _ in range(size):
        params = {"depth": rng.choice([2, 3]), "sampling": rng.choice(DISTRIBUTIONS["sampling"].choices),
                  "output": rng.choice(["rgb", "uv"]),
                  "lr": 10 ** rng.uniform(math.log10(3e-4), math.log10(3e-3))}
        out.append((params, synthetic_rows(TrialConfig(**PARAMS_CONSTANT, epochs=epochs, **params))))
    return out


def _ended_trial(rng: random.Random, pool: list, epochs: int) -> tuple[dict, list[dict], bool]:
    """A configuration, the rows it reported, and whether it ran to its last epoch (a tenth did)."""
    params, rows = rng.choice(pool)
    done = rng.random() < 0.1
    return params, rows if done else rows[:rng.randint(1, min(5, epochs))], done


def fill(root: Path, url: str, n: int, epochs: int, name: str = NAME, space=None) -> None:
    """Add ``n`` ended trials to the study at ``root``: to its Optuna study ``name`` (made with ``space``'s
    sampler and pruner when given) and to its results tables."""
    storage = optuna.storages.RDBStorage(url)
    # The filling only: one fsync per trial would make it take minutes. The measured driver runs as usual.
    event.listen(storage.engine, "connect", lambda conn, _: conn.execute("PRAGMA synchronous=OFF"))
    if space is not None:
        open_study(storage, name, space, 0, ())
    study_id = storage.get_study_id_from_name(name)
    first = len(storage.get_all_trials(study_id, deepcopy=False))
    writer = ResultsWriter(str(root))
    rng = random.Random(n)
    pool = _pool(rng, epochs)
    for number in range(first, first + n):
        params, rows, done = _ended_trial(rng, pool, epochs)
        values = {r["epoch"]: r[STEP_METRIC] for r in rows}
        trial = optuna.trial.create_trial(
            params=params, distributions=DISTRIBUTIONS, intermediate_values=values,
            state=optuna.trial.TrialState.COMPLETE if done else optuna.trial.TrialState.PRUNED,
            value=rows[-1][METRIC] if done else rows[-1][STEP_METRIC])
        storage.create_new_trial(study_id, template_trial=trial)
        tid = f"filled_{number:05d}"
        cfg = TrialConfig(**PARAMS_CONSTANT, epochs=epochs, **params)
        writer.add_epochs(tid, [epoch_row(tid, r) for r in rows])
        writer.upsert("trials", [trial_row(tid, {**cfg.to_dict(), "resolution": cfg.image_size},
                                           "DONE" if done else "PRUNED", rows, optuna_number=number)])
    writer.close()


def _parts(root: Path, url: str, total: int):
    """The driver's parts as build_tuner makes them, timed as a synthetic study's are."""
    from ray.tune.experiment import Trial  # noqa: F401 - Tune's own trial objects are handed to the hooks

    space = load_space(str(root / "space.yaml"))
    driver = DriverState(storage_url=url, space=space, study_root=str(root), total=total, clock=StudyClock())
    searcher = OptunaSearcher(NAME, driver, seed=0)
    timings = DriverTimings()
    scheduler = TimedPruningScheduler(searcher, driver, timings)
    callback = ResultsCallback(searcher, driver, timings=timings)
    callback.setup()
    return searcher, scheduler, callback, timings


def drive(root: Path, url: str, new: int, concurrency: int, total: int) -> tuple[DriverTimings, float]:
    """``new`` trials through the driver's hooks, ``concurrency`` at once, in Tune's order of calls."""
    searcher, scheduler, callback, timings = _parts(root, url, total)
    wall = feed(searcher, scheduler, callback, new, concurrency)
    searcher.close()
    callback.writer.close()
    return timings, wall


def feed(searcher, scheduler, callback, new: int, concurrency: int) -> float:
    """Run ``new`` synthetic trials through the parts' hooks, as Tune calls them; returns the seconds taken."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    live: list[tuple[Trial, list[dict]]] = []
    trials: list[Trial] = []
    started, t0 = 0, time.perf_counter()
    while started < new or live:
        while started < new and len(live) < concurrency:
            tid = f"new_{started:05d}"
            config = searcher.suggest(tid)
            trial = Trial("ColorizeTrial", config=config, trial_id=tid, stub=True)
            trial.set_status(Trial.RUNNING)
            trials.append(trial)
            callback.on_trial_start(0, trials, trial)
            live.append((trial, synthetic_rows(searcher.driver.space.resolve(config))))
            started += 1
        trial, rows = live.pop(0)
        row = {**rows.pop(0), "training_iteration": 1}
        decision = scheduler.on_trial_result(None, trial, row)
        searcher.on_trial_result(trial.trial_id, row)
        trial.update_last_result(row)
        callback.on_trial_result(0, trials, trial, row)
        if decision == TrialScheduler.STOP or not rows:
            searcher.on_trial_complete(trial.trial_id, row)
            trial.set_status(Trial.TERMINATED)
            callback.on_trial_complete(0, trials, trial)
        else:
            live.append((trial, rows))
        callback.on_step_end(0, trials)   # as Tune's loop does after each step (the progress line, the budget)
    return time.perf_counter() - t0


def measure(storage: Path, n: int, epochs: int, new: int, concurrency: int) -> dict:
    """Fill a study of ``n`` trials, then time ``new`` more through the driver's parts."""
    root = storage / f"growth-{n}x{epochs}-{time.strftime('%Y%m%d-%H%M%S')}"
    root.mkdir(parents=True)
    (root / "space.yaml").write_text(space_text(n + new, epochs, concurrency, 0.0))
    url = f"sqlite:///{root / 'optuna.db'}"
    t0 = time.perf_counter()
    fill(root, url, n, epochs, space=load_space(str(root / "space.yaml")))
    filled = time.perf_counter() - t0
    with contextlib.redirect_stdout(io.StringIO()):   # the progress lines: the JSON is the output
        timings, wall = drive(root, url, new, concurrency, n + new)
    ms = np.asarray(timings.driver_ms)
    cb = np.asarray(timings.callback_ms)
    return {"trials_before": n, "new_trials": new, "epochs": epochs, "concurrency": concurrency,
            "results": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3), "max_ms": round(float(ms.max()), 3),
            "callback_p50_ms": round(float(np.percentile(cb, 50)), 3),
            "callback_p99_ms": round(float(np.percentile(cb, 99)), 3),
            "wall_s": round(wall, 2), "fill_s": round(filled, 2), "study": str(root)}


def growth(storage: Path, sizes: list[int], epochs: int, new: int, concurrency: int) -> list[dict]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return [measure(storage, n, epochs, new, concurrency) for n in sizes]


def main(argv=None) -> int:
    args = prepared(argv)
    return emit({"growth": growth(args.storage, args.growth, args.epochs, args.new, args.concurrency)}, args)
