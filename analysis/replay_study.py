"""``python -m analysis --study S --replay``: the strategies of ``analysis.replay`` replayed over a finished
study's own trials (their configurations and recorded epochs are the curves), and how much compute each
would have needed to find the study's best trial.

The searched axes are the hyperparameters that vary among the study's trials: a numeric one with more than
``CONTINUOUS_FROM`` values is continuous (log-uniform when all its values are > 0) over the values' range,
any other a choice among the values seen. The replay can only ever propose configurations the study
sampled: it compares how soon each strategy would have reached the study's best trial among those, not
what it would have found elsewhere. A trial the study pruned or lost replays only the epochs it ran.
"""
from __future__ import annotations

from dataclasses import dataclass

# numpy, pandas and the replay's modules load when a replay runs: ``python -m analysis`` reads MIN_TRIALS
# and ReplaySettings before it has a study.

MIN_TRIALS = 4          # fewer trials than this: nothing to choose between, and the replay is refused
CONTINUOUS_FROM = 5     # a numeric hyperparameter with at least this many values is searched as a range
DEFAULT_CONCURRENCY = 4   # when study.json does not say (a study run by study.local)


@dataclass(frozen=True)
class ReplaySettings:
    seeds: int = 20
    trials_per_curve: int = 3    # trials per replay: this many times the study's trials
    processes: int = 1


class ReplayRefused(Exception):
    """The study cannot be replayed; the message says why and what to do."""


def _replayable_epochs(study):
    """Epoch rows with a val PSNR of the study's trials (rows of a trial missing from the trials table
    have no configuration to replay)."""
    import numpy as np
    import pandas as pd

    epochs = study.epochs[study.epochs["trial_id"].isin(study.trials["trial_id"])]
    return epochs[np.isfinite(pd.to_numeric(epochs["val_psnr"], errors="coerce").astype(float))]


def study_curves(study):
    """The study's trials with at least one recorded epoch, as curves on the axes that vary among them."""
    import pandas as pd

    from analysis.replay import curves_from_frame

    epochs = _replayable_epochs(study)
    trials = study.trials.drop_duplicates("trial_id").set_index("trial_id", drop=False)
    replayed = trials[trials.index.isin(epochs["trial_id"])]
    names = [n for n in study.hyperparameters() if n in trials and replayed[n].notna().all()]
    axes = tuple(_axis(n, replayed[n]) for n in names)
    rows = epochs.drop(columns=[n for n in names if n in epochs]).merge(trials[names], left_on="trial_id",
                                                                        right_index=True)
    planned = trials["epochs"] if "epochs" in trials else pd.Series(dtype=float)
    return curves_from_frame(rows, "trial_id", axes, planned.dropna().astype(int))


def _axis(name: str, values):
    from analysis.replay import Axis

    distinct = sorted({v.item() if hasattr(v, "item") else v for v in values}, key=repr)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct)
    if numeric and len(distinct) >= CONTINUOUS_FROM:
        lo, hi = float(min(distinct)), float(max(distinct))
        return Axis(name, "loguniform" if lo > 0 else "uniform", (lo, hi))
    return Axis(name, "choice", tuple(distinct))


def check_replayable(study):
    """The study's curves, or ReplayRefused when they are too few to compare strategies on."""
    count = _replayable_epochs(study)["trial_id"].nunique()
    if count < MIN_TRIALS:
        raise ReplayRefused(f"--replay: the study {study.name} has {count} trial(s) with recorded epochs; a "
                            f"replay needs at least {MIN_TRIALS} to choose between. Run more trials (python -m "
                            f"study.run --resume --num-samples N), or leave --replay out")
    return study_curves(study)


def concurrency(study) -> int:
    value = study.meta.get("max_concurrent")
    return int(value) if isinstance(value, int) and value >= 1 else DEFAULT_CONCURRENCY


def section(study, curves, settings: ReplaySettings, output) -> None:
    """The report's "Replayed search strategies" section."""
    import numpy as np

    from analysis.replay import STRATEGIES, Job, run_jobs
    from analysis.replay_figures import progress_figure, summary

    output.heading("Replayed search strategies")
    best, workers = curves.best(), concurrency(study)
    trials = settings.trials_per_curve * len(curves)
    jobs = [Job(s, seed, trials, workers) for s in STRATEGIES for seed in range(settings.seeds)]
    runs = run_jobs(curves, jobs, processes=settings.processes)
    spent = float(np.nansum(curves.seconds))
    output.text(
        f"This rests on the study's {len(curves)} trials with recorded epochs: each strategy ({', '.join(s.name for s in STRATEGIES)}) "
        f"ran {trials} trials on {workers} simulated workers, {settings.seeds} seeds each; a proposal replays the "
        f"study's nearest trial (analysis/replay.py). Caveat: a replay can only propose configurations this "
        f"study sampled, so it says how soon each strategy would have reached the study's best trial "
        f"(`{curves.ids[best]}`, test gain {curves.found(best):+.2f} dB) among them, not what it would have found "
        f"elsewhere; a trial the study pruned replays only its recorded epochs. The study itself spent "
        f"{spent:,.0f} s of recorded epoch time.")
    table = summary(runs, curves, best)
    output.table(table, "Per strategy, median [p25, p75] over seeds, compute in recorded seconds summed over "
                        "trials", csv="replay.csv")
    output.figure("replay.png", lambda: progress_figure(runs, curves, best),
                  "Test gain of the best trial found (by val PSNR) against compute, median and interquartile "
                  "range over seeds; dashed: the study's best trial, dotted: 0.1 dB below it.")
