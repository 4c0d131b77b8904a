"""The study's Ray layer: build the Tuner of a study, resume it (Ray itself starts in ``raystart``).

Ray's calls live in ``study.tune`` (this module, ``searcher``, ``pruning``, ``callback``,
``trainable``), ``study.submit`` (Ray's job client) and, for what Ray offers no public call for,
``study.tune.ray_internals``. Ray is pinned (its API moves between releases).
"""
from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.search import ConcurrencyLimiter

import study.tune.ray_internals as ray_internals
import study.tune.raystart  # noqa: F401 - Tune's settings in the environment, wherever a Tuner is built
from study.cli import UsageError
from study.config import ConfigError
from study.engine import STRUCTURE
from study.results import read_table
from study.space import Space
from study.tune.callback import ResultsCallback
from study.tune.moved import alias_moved_modules
from study.tune.preread import OptunaRead
from study.tune.pruning import OptunaPruningScheduler, PackDecisions, TimedPruningScheduler
from study.tune.saved import experiment_path, storage_args
from study.tune.searcher import OptunaSearcher, describe_study, open_study, tune_trial_id
from study.tune.state import DriverState, UsesDriver
from study.tune.timings import DriverTimings
from study.tune.trainable import make_trainable, trial_name


@dataclass(frozen=True)
class StudySettings:
    """What the Tuner of a study is built from (``num_samples`` counts models: packs of ``pack`` each).

    ``storage_url`` may hold a password: it is used in memory only; what Ray pickles holds none of
    it. On ``resume`` the study's location, the Optuna storage, the data and the space file are those
    given here, never the ones Ray pickled (a copied study resumes in its new place; an edited space
    file is what its new trials are drawn from); with a larger ``num_samples`` than Ray's saved state
    holds, the study gets more trials.
    ``objectives``: two or more names of ``study.results.contract.OBJECTIVES`` make a multi-objective study
    (Optuna's multi-objective samplers, e.g. TPE or NSGA-II; no pruning: Optuna's pruners take one
    objective); empty: maximise METRIC with the space's pruner.
    ``grayscale``: the study's rule for grayscale photos ("left out" or "kept", study.engine.grayscale.grayscale_rule),
    applied in every trial's worker.
    ``clock``: the study's running time and time budget (study.driver.StudyClock); its deadline reaches
    every trial, which stops at the first epoch's end past it with a checkpoint (one that has trained no
    epoch since it started is stopped at once: study.tune.callback).
    """
    study_root: str
    space: Space
    seed: int
    storage_url: str
    optuna_study_name: str
    num_samples: int
    max_concurrent: int
    resources: dict
    data_root: str | None
    cache_dir: str | None
    resume: bool
    pack: int = 1
    cluster: bool = False
    objectives: tuple[str, ...] = ()
    grayscale: str = "left out"
    clock: Any = None
    verbose: bool = False
    driver_pid: int | None = None   # the process that stands for the driver (status.json); None: this one
    optuna_opening: Any = None      # a Future of resumed_optuna(...) begun earlier (while Ray started); None: open here


@dataclass
class StudyTuner:
    """A study's Tuner with the driver state and the results callback it runs with."""
    tuner: tune.Tuner
    driver: DriverState
    results: ResultsCallback

    def fit(self) -> None:
        try:
            self.tuner.fit()
        finally:   # however the run ends, the Optuna writes queued behind it are stored
            self.results.searcher.close()

    @property
    def budget_stopped(self) -> bool:
        """Whether the study's time budget ended this run (the results callback stopped it)."""
        return self.driver.budget_stopped

    def final_status(self, state: str) -> dict | None:
        """The study's last progress line and status.json ("finished", "stopped" or "budget")."""
        return self.results.final_status(state)


def build_tuner(settings: StudySettings) -> StudyTuner:
    """The Tuner of the study ``settings`` describe: a new one, or on ``resume`` the one Ray saved."""
    s = settings
    if s.pack < 1:
        raise ConfigError(f"pack={s.pack}: a pack holds at least one trial")
    if not s.verbose:
        # Tune's banner ("View detailed results here", a TensorBoard hint at a temporary folder) and
        # tables: the study's own progress lines (study.driver.progress) say what matters, in plain text.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    decisions = actor = None
    if s.pack > 1:
        decisions = f"colorize-pack-decisions-{uuid.uuid4().hex[:12]}"
        actor = PackDecisions.options(name=decisions).remote()
    driver = DriverState(storage_url=s.storage_url, space=s.space, study_root=s.study_root, data_root=s.data_root,
                         cache_dir=s.cache_dir, cluster=s.cluster, decisions=actor, total=s.num_samples,
                         clock=s.clock, structure=STRUCTURE, pid=s.driver_pid)
    fn = make_trainable(s.space, s.data_root, s.cache_dir, s.resources, decisions, s.grayscale,
                        deadline=s.clock.deadline if s.clock is not None else None)
    driver.optuna = _open_optuna_study(s)
    if s.resume:
        return _restore(s, fn, driver)
    if len(s.objectives) > 1 and s.space.pruner.get("name", "none") != "none":
        print(f"note: pruning is off: the space has {len(s.objectives)} objectives ({', '.join(s.objectives)}) "
              f"and Optuna's pruners take one")
    searcher = OptunaSearcher(s.optuna_study_name, driver, seed=s.seed, pack=s.pack, objectives=s.objectives)
    # A synthetic study (a benchmark of the driver) times each result's way through the driver.
    timings = DriverTimings() if s.space.synthetic else None
    results = ResultsCallback(searcher, driver, timings=timings)
    tuner = tune.Tuner(
        fn,
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent),
                                    scheduler=(TimedPruningScheduler(searcher, driver, timings) if timings
                                               else OptunaPruningScheduler(searcher, driver)),
                                    num_samples=math.ceil(s.num_samples / s.pack),
                                    # A reused actor saves a process, torch import and CUDA context per
                                    # trial, and its last decoded data (study.tune.trainable); ColorizeTrial
                                    # renames its log prefix per trial.
                                    reuse_actors=True,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=_run_config(s, results))
    return StudyTuner(tuner, driver, results)


def open_optuna(storage_url: str, name: str, space: Space, seed: int, objectives: tuple[str, ...],
                read: OptunaRead | None = None) -> tuple:
    """(its storage, the study): the Optuna study ``name``, made if new, with every trial read into its cache;
    by ``read`` (begun earlier in a process of its own) when it has read them."""
    import optuna
    cached = read.storage() if read is not None else None
    if cached is None:
        storage = optuna.storages.RDBStorage(storage_url)
        return storage, open_study(storage, name, space, seed, objectives)
    # The searcher's own writes go straight to the database, as they would through the study's backend.
    # The read checked its schema, and the tables are there.
    storage = optuna.storages.RDBStorage(storage_url, skip_compatibility_check=True, skip_table_creation=True)
    return storage, open_study(cached, name, space, seed, objectives)


def _open_optuna_study(s: StudySettings):
    """Make (or open) the Optuna study, with the space's first configurations on a new one, and describe it;
    (its storage, the study) for the searcher. A resumed study's, begun earlier on a thread
    (``resumed_optuna``), stays a Future: the searcher waits for it when it first needs the study, so Tune
    restores its trials and starts their workers meanwhile."""
    if s.optuna_opening is not None:
        return s.optuna_opening
    storage, study = open_optuna(s.storage_url, s.optuna_study_name, s.space, s.seed, s.objectives)
    if not s.resume:
        for params in s.space.enqueued():   # the space's configurations to try first (not again on resume)
            study.enqueue_trial(params, skip_if_exists=True)
    describe_study(study, s.space, s.pack)
    return storage, study


def resumed_optuna(storage_url: str, name: str, space: Space, seed: int, objectives: tuple[str, ...],
                   pack: int, read: OptunaRead | None = None) -> tuple:
    """(its storage, the study): a resumed study's Optuna study, every trial read (by ``read`` when it has),
    described."""
    storage, study = open_optuna(storage_url, name, space, seed, objectives, read)
    describe_study(study, space, pack)
    return storage, study


def _run_config(s: StudySettings, results: ResultsCallback) -> tune.RunConfig:
    parent, fs, name = storage_args(s.study_root)
    return tune.RunConfig(
        name=name, storage_path=parent, storage_filesystem=fs, verbose=1 if s.verbose else 0,
        callbacks=[results],
        failure_config=tune.FailureConfig(max_failures=s.space.max_failures),
        # Keep the best epoch (by val PSNR; colorize uses it) besides the latest (resume uses it).
        # A pack's members have their best epochs at different times: keep every checkpoint
        # (the pack writes one only when a member's best, its last epoch, or a resume point).
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_psnr",
                                                checkpoint_score_order="max") if s.pack == 1
        else tune.CheckpointConfig())


def _restore(s: StudySettings, fn, driver: DriverState) -> StudyTuner:
    """The Tuner Ray saved for the study, at the study's present location, with ``s.num_samples`` trials."""
    alias_moved_modules()   # a study an earlier version started names its classes by their old modules
    path, fs = experiment_path(s.study_root)
    ray_internals.rebase_search_state(path, fs)
    saved: set[str] = set()
    ray_internals.forget_ended_trials(path, fs, saved)   # the tables and Optuna keep them; Tune's restore is slow
    # Tune's count of trials made may predate the last ones, which the tables hold (a kill before its state
    # reached the study folder): counted from both, Tune makes only the trials the study still needs.
    created = len(saved | tune_trials_in_tables(s.study_root, s.pack))
    ray_internals.set_total_trials(path, fs, math.ceil(s.num_samples / s.pack), created)
    tuner = tune.Tuner.restore(path, trainable=fn, resume_unfinished=True, resume_errored=True,
                               storage_filesystem=fs)
    return StudyTuner(tuner, driver, bind_restored(ray_internals.restored_parts(tuner), driver))


def tune_trials_in_tables(study_root: str, pack: int) -> set[str]:
    """The Tune trials the results tables hold as having run (a pack's members count once): not those still
    RUNNING there, which a restore either goes on with (Tune's state has them) or fails as orphans that
    new trials replace, nor those failed as orphans before."""
    trials = read_table(study_root, "trials")
    if trials is None:
        return set()
    ran = (trials.status != "RUNNING") & ~trials.error.fillna("").str.startswith("orphaned")
    return {tune_trial_id(t, pack) for t in trials.trial_id[ran]}


def bind_restored(parts: list, driver: DriverState) -> ResultsCallback:
    """Give the searcher, scheduler and callbacks Ray unpickled for a resumed study the driver state of this run
    (what Ray pickled holds none); returns the study's results callback.

    The one place a restored study's objects get it: Ray's ``Tuner.restore`` takes no new searcher,
    scheduler or callbacks, and hands back the ones it unpickled only through its internals."""
    bound = [part for part in parts if isinstance(part, UsesDriver)]
    for part in bound:
        part.bind(driver)
    results = [part for part in bound if isinstance(part, ResultsCallback)]
    if len(results) != 1 or not any(isinstance(part, OptunaSearcher) for part in bound):
        raise UsageError(f"--resume: the study at {driver.study_root} cannot be resumed by this version of the "
                         f"project: its saved Tuner holds {', '.join(type(p).__name__ for p in parts)}, not this "
                         f"version's searcher and results callback. Resume it with the version that started it, "
                         f"or start a new study with --name (nothing was changed)")
    return results[0]
