"""The study's Ray Tune searcher: Optuna driven through its public API only.

``OptunaSearcher`` is a plain ``ray.tune.search.Searcher`` (Ray's documented extension
point). It asks Optuna for configurations (``Study.ask`` with the space's define-by-run
function), tells it each trial's end (``Study.tell``, by trial number), reports
intermediate values and asks the pruner through the storage it opened itself (the public
``BaseStorage`` and ``BasePruner.prune`` API). With packs, one Tune trial is K Optuna
trials ("members") that share a structure.

What Ray pickles (``tuner.pkl``, ``searcher-state-*.pkl``, world-readable files) holds no
sampler, no storage and no secret: only the study's name, its objectives, the pack size,
the seed, and which Optuna trial numbers belong to which Tune trial. Everything that
connects (the storage URL, which may hold a password) or that the user may have edited
(the space file) comes from the driver state it is given (``study.tune.state``): a resumed
study uses the space file as it is now, and the sampler is rebuilt from it, seeded from
the study's seed and its number of trials so far (a resumed study goes on
deterministically).
"""
from __future__ import annotations

import hashlib
import logging
import math
import pickle
import warnings
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import optuna
from ray.tune.search import Searcher

from study.config import ConfigError
from study.results import OBJECTIVES, read_table
from study.tune.keys import ERROR_KEY, MEMBERS_KEY, METRIC, STEP_METRIC
from study.tune.mirror import StudyMirror, WriteBehind
from study.tune.state import DriverState, UsesDriver

log = logging.getLogger("study")

STOPPED_ATTR = "stopped"   # Optuna user attribute of a trial the time budget stopped (until it finishes)
STOPPED_WHY = "by the study's time budget; python -m study.run ... --resume continues it"
STATE_OF = {"COMPLETE": "DONE", "PRUNED": "PRUNED", "FAIL": "ERROR"}   # Optuna state -> results status
COMPLETE, PRUNED, FAIL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                          optuna.trial.TrialState.FAIL)


def members_of(result: dict) -> dict[str, dict]:
    """A pack's per-member rows from a result, nested (callbacks) or flattened by Tune (scheduler, searcher)."""
    if MEMBERS_KEY in result:
        return result[MEMBERS_KEY]
    out: dict[str, dict] = {}
    prefix = MEMBERS_KEY + "/"
    for key, value in result.items():
        if key.startswith(prefix):
            k, name = key[len(prefix):].split("/", 1)
            out.setdefault(k, {})[name] = value
    return out


def member_id(trial_id: str, k: int, pack: int) -> str:
    """The results' trial_id of member ``k`` of a Tune trial (the Tune trial's own id without packs)."""
    return trial_id if pack == 1 else f"{trial_id}_m{k}"


def tune_trial_id(result_id: str, pack: int) -> str:
    """The Tune trial of the results' trial_id ``result_id`` (``member_id``'s inverse)."""
    return result_id if pack == 1 else result_id.rsplit("_m", 1)[0]


def open_study(storage: optuna.storages.BaseStorage, name: str, space, seed: int, objectives: tuple[str, ...],
               ) -> optuna.Study:
    """The Optuna study ``name`` (made if new) with the space's sampler and pruner.

    The sampler is seeded from ``seed`` and the number of trials the study already has: a new study
    starts from ``seed`` as before, a resumed one goes on deterministically without repeating the
    draws it started with.
    """
    multi = len(objectives) > 1
    directions = ["maximize"] * (len(objectives) if multi else 1)
    pruner = optuna.pruners.NopPruner() if multi else space.make_pruner()
    study = optuna.create_study(storage=storage, study_name=name, sampler=space.make_sampler(seed), pruner=pruner,
                                directions=directions, load_if_exists=True)
    # Read once here, into the study's cache, which the sampler and the pruner's copy read from next: reading
    # every trial of a large study takes seconds.
    done = len(study.get_trials(deepcopy=False))
    if done:
        study.sampler = space.make_sampler((seed * 1_000_003 + done) % (2 ** 31))
    if study.metric_names is None:
        with warnings.catch_warnings():  # experimental in Optuna 5, and what optuna-dashboard reads
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(objectives) if multi else [METRIC])
    return study


def describe_study(study: optuna.Study, space, pack: int) -> str | None:
    """Record the space's name and its file's sha256 in the study (read by optuna-dashboard); returns the
    sha256 the study was started with when the file changed since (None when it did not)."""
    digest = hashlib.sha256(Path(space.path).read_bytes()).hexdigest()
    attrs = study.user_attrs
    started = attrs.get("space_sha256")
    if started not in (None, digest):
        # The file as it is now is what new trials use (see the module docstring): say so in the study.
        study.set_user_attr("space_sha256_resumed", digest)
        return started
    study.set_user_attr("space", space.name)
    study.set_user_attr("space_file", Path(space.path).name)
    study.set_user_attr("space_sha256", digest)
    study.set_user_attr("pack", pack)
    return None


def load_state(blob: bytes) -> dict:
    """The searcher's saved state (``OptunaSearcher.save``); ValueError saying why this version cannot use it."""
    try:
        state = pickle.loads(blob)
    except Exception as e:  # noqa: BLE001 - unpickling fails in many ways (a class since removed, a cut file)
        raise ValueError(f"it cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "numbers" not in state:
        raise ValueError("it was written by another version's searcher")
    return state


class OptunaSearcher(UsesDriver, Searcher):
    """Ray Tune's searcher for the study: asks and tells the Optuna study ``study_name``."""

    _restored = False   # also what one unpickled from an earlier version starts with

    def __init__(self, study_name: str, driver: DriverState | None, *, seed: int = 0, pack: int = 1,
                 objectives: tuple[str, ...] = ()):
        self.objectives = tuple(objectives)   # () or one: METRIC, single-objective; two or more: a front
        if self.multi:
            unknown = [o for o in self.objectives if o not in OBJECTIVES]
            if unknown:
                raise ConfigError(f"objectives {unknown} are not known; choose from {sorted(OBJECTIVES)}")
            super().__init__(metric=list(self.objectives), mode=["max"] * len(self.objectives))
        else:
            super().__init__(metric=METRIC, mode="max")
        self.study_name, self.seed, self.pack = study_name, seed, pack
        self.numbers: dict[str, int] = {}               # member id -> Optuna trial number
        self.completed: set[str] = set()                # Tune trial ids told as complete
        self.pruned: set[str] = set()
        self.finished: dict[str, tuple[str, int]] = {}  # member id -> (results status, last epoch) once told
        self.best_values: dict[str, list[float]] = {}   # member id -> objectives at its best epoch (multi only)
        self._driver = driver
        self._connect_later()

    def _connect_later(self) -> None:
        """Forget connections (made again on first use, in the driver that runs now)."""
        self._study: optuna.Study | None = None
        self._storage: optuna.storages.BaseStorage | None = None
        self._trial_ids: dict[int, int] = {}
        self._mirror: StudyMirror | None = None     # what the pruner is asked with (study.tune.mirror)
        self._writes: WriteBehind | None = None     # the stored study's writes, behind the per-result path
        self._restored = False   # restored from Tune's saved state, not yet levelled with the tables
        self._resumed_epochs: dict[str, int] = {}   # member id -> epochs the tables held at levelling (running)
        self._readded: set[str] = set()   # member ids of the trials Tune's restore added again (note_readded)

    # ---- what Ray pickles: the state above, never a connection, sampler or space
    _STATE = ("objectives", "study_name", "seed", "pack", "numbers", "completed", "pruned", "finished",
              "best_values")

    _CONNECTIONS = ("_study", "_storage", "_trial_ids", "_mirror", "_writes", "_restored", "_resumed_epochs",
                    "_readded")

    def __getstate__(self):
        state = {k: v for k, v in self._pickled(self.__dict__).items() if k not in self._CONNECTIONS}
        return {**state, "_study": None, "_storage": None, "_trial_ids": {}, "_mirror": None, "_writes": None,
                "_restored": False, "_resumed_epochs": {}, "_readded": set()}

    def get_state(self) -> dict:
        return {k: getattr(self, k) for k in self._STATE}

    def set_state(self, state: dict) -> None:
        for k in self._STATE:
            if k in state:
                setattr(self, k, state[k])
        self._connect_later()

    def save(self, checkpoint_path: str):
        # Tune saves the searcher with its experiment state: what that state says was told is stored.
        self.flush()
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as f:
            try:
                state = load_state(f.read())
            except ValueError as e:
                raise RuntimeError(f"{checkpoint_path}: {e}; the study cannot be resumed by this version") from e
        self.set_state(state)
        # Levelled with the tables (fail_orphans, level_with_tables) when the study is first needed: a large
        # study's trials are still being read then, while Tune restores its trials and starts their workers.
        self._restored = True

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True   # the space comes from the driver state, not from Tune's param_space

    # ---- the study, connected lazily in the driver that runs now
    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            d = self.driver
            opened = d.optuna.result() if isinstance(d.optuna, Future) else d.optuna
            if opened is not None and opened[1].study_name == self.study_name:
                self._storage, self._study = opened
            else:
                self._storage = optuna.storages.RDBStorage(d.storage_url)
                self._study = open_study(self._storage, self.study_name, d.space, self.seed, self.objectives)
            if self._restored:   # level the stored study before anything else reads or writes it
                self._restored = False
                trials = read_table(d.study_root, "trials")   # read once, for both
                self.fail_orphans(trials)
                self.level_with_tables(trials)
        return self._study

    @property
    def mirror(self) -> StudyMirror:
        if self._mirror is None:
            self._mirror = StudyMirror(self.study, self.study.pruner)
        return self._mirror

    @property
    def writes(self) -> WriteBehind:
        if self._writes is None:
            self._writes = WriteBehind(self.driver.storage_url)
        return self._writes

    def flush(self) -> None:
        """Wait until the stored study has every write queued so far. (Not yet levelled after a restore, what
        Tune saves says less than the tables do: the next restore levels it from them.)"""
        if self._writes is not None:
            self._writes.flush()

    def ready(self) -> None:
        """Connected, and after a restore levelled with the tables: what it says was told (``finished``) holds
        the ends the stored study has. Before the first result of a run is decided on."""
        self.study   # noqa: B018 - connecting levels it

    def hold_writes(self) -> None:
        """A result is on its way: the stored study's writes for it wait until ``release_writes``, which the
        results callback calls once the result's rows are in the tables' journal (``WriteBehind``)."""
        self.writes.hold()

    def release_writes(self) -> None:
        if self._writes is not None:
            self._writes.release()

    def close(self) -> None:
        """The study's run ends: level it with the tables if nothing has yet, store what is queued, stop the
        writer."""
        if self._restored:
            self.study   # noqa: B018 - connecting levels it
        if self._writes is not None:
            self._writes.close()
            self._writes = None

    def _trial_id(self, number: int) -> int:
        """Optuna's storage id of trial ``number`` (the storage's public API; cached)."""
        if number not in self._trial_ids:
            study = self.study
            self._trial_ids[number] = self._storage.get_trial_id_from_study_id_trial_number(
                self._storage.get_study_id_from_name(study.study_name), number)
        return self._trial_ids[number]

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    def optuna_number(self, mid: str) -> int:
        return self.numbers.get(mid, -1)

    # ---- asking
    def _ask(self, trial_id: str, fixed: dict | None = None) -> tuple[optuna.trial.Trial, dict]:
        if fixed is not None:
            self.study.enqueue_trial(fixed, skip_if_exists=False)
        ot = self.study.ask()
        constants = self.driver.space.define(ot)
        # Recorded in the study itself, so a resumed driver can tell its trials from orphans.
        ot.set_user_attr("ray_trial_id", trial_id)
        self.mirror.track(ot.number)
        return ot, {**ot.params, **constants}

    def suggest(self, trial_id: str):
        clock = self.driver.clock
        if clock is not None and clock.expired():
            return None   # the time budget is spent: no new trial (the driver stops the study)
        first, config = self._ask(trial_id)
        if self.pack == 1:
            self.numbers[trial_id] = first.number
            return config
        # The other members share the first one's structure; the sampler picks the rest
        # (TPE with constant_liar keeps these back-to-back asks apart).
        structure = self.driver.structure
        if not structure:
            raise RuntimeError("a pack's searcher was not told which parameters its members share (structure)")
        fixed = {n: v for n, v in first.params.items() if n.split("__")[0] in structure}
        members, trials = [config], [first]
        for _ in range(1, self.pack):
            ot, cfg = self._ask(trial_id, fixed)
            members.append(cfg)
            trials.append(ot)
        for k, ot in enumerate(trials):
            ot.set_user_attr("pack_member", k)
            self.numbers[member_id(trial_id, k, self.pack)] = ot.number
        return {"pack": members}

    # ---- telling
    def note_epoch(self, mid: str, row: dict) -> None:
        """Keep the objectives of a member's best epoch (what it is told as at its end)."""
        if self.multi and row.get("best_epoch") == row.get("epoch") and mid not in self.finished:
            self.best_values[mid] = [OBJECTIVES[o](row) for o in self.objectives]

    def value_of(self, mid: str, row: dict):
        return self.best_values.get(mid) if self.multi else row.get(METRIC)

    def report_and_should_prune(self, mid: str, value: float, step: int) -> bool:
        """Report ``value`` at ``step`` (once) and ask the study's pruner (single objective only: Optuna
        takes no intermediate values, and no pruner works, with several)."""
        number = self.numbers.get(mid)
        if self.multi or number is None or mid in self.finished or not math.isfinite(value):
            return False
        if self.mirror.report(number, step, value):   # a restored trial re-runs epochs: reported once
            self.writes.submit(self._store_value, number, step, value)
        prune, attrs = self.mirror.should_prune(number)
        if attrs:
            self.writes.submit(self._store_system_attrs, number, attrs)
        return prune

    def _store_value(self, number: int, step: int, value: float) -> None:
        self._storage.set_trial_intermediate_value(self._trial_id(number), step, value)

    def _store_system_attrs(self, number: int, attrs: dict) -> None:
        for key, value in attrs.items():
            self._storage.set_trial_system_attr(self._trial_id(number), key, value)

    def finish(self, mid: str, state: optuna.trial.TrialState, value, epoch: int) -> None:
        """Tell Optuna a member's (or single trial's) end, once."""
        if mid in self.finished or mid not in self.numbers:
            return
        values = value if isinstance(value, list) else [value]
        if state == COMPLETE and any(v is None or not math.isfinite(v) for v in values):
            state = FAIL
        number, told = self.numbers[mid], value if state == COMPLETE else None
        try:
            self.mirror.tell(number, told, state)
        except (ValueError, RuntimeError) as e:  # e.g. its values do not fit the study's directions
            log.warning("optuna tell for %s: %s", mid, e)
        self.writes.submit(self._store_end, number, told, state)
        if state == PRUNED:
            self.pruned.add(mid)
        self.finished[mid] = (STATE_OF[state.name], int(epoch))

    def _store_end(self, number: int, values, state: optuna.trial.TrialState) -> None:
        tid = self._trial_id(number)
        if self._storage.get_trial(tid).user_attrs.get(STOPPED_ATTR):   # it went on after a budget stop
            self._storage.set_trial_user_attr(tid, STOPPED_ATTR, None)   # before tell: a finished trial is final
        try:
            self.study.tell(number, values, state=state, skip_if_finished=True)
        except (ValueError, RuntimeError):
            pass   # the mirror's tell said why (the same rule refused it there)

    def mark_stopped(self, trial_id: str) -> None:
        """Tell Optuna the time budget stopped this trial's members: they stay RUNNING (--resume continues
        them), and a user attribute says why, so a dashboard with no driver alive is not read as trials
        still training. ``finish`` clears it."""
        for k in range(self.pack):
            mid = member_id(trial_id, k, self.pack)
            if mid in self.numbers and mid not in self.finished:
                self.writes.submit(self._store_stopped, self.numbers[mid])

    def _store_stopped(self, number: int) -> None:
        self._storage.set_trial_user_attr(self._trial_id(number), STOPPED_ATTR, STOPPED_WHY)

    def on_trial_result(self, trial_id: str, result: dict):
        pass  # OptunaPruningScheduler reports each epoch (it runs before this hook)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id in self.completed:
            return
        self.ready()   # a restored study's tables are read (``_resumed_epochs``) before its first end
        result = result or {}
        failed = error or bool(result.get(ERROR_KEY))
        epoch = int(result.get("epoch", 0) or 0)
        for k in range(self.pack):
            mid = member_id(trial_id, k, self.pack)
            if self.pack == 1 and mid in self.pruned:
                continue
            if failed:
                self.finish(mid, FAIL, None, epoch)
            elif epoch < self._resumed_epochs.get(mid, 0) and mid not in self.finished:
                # Restored, it ran no epoch in this run (its checkpoint was its last epoch's), and Tune's
                # last result is what its saved state held, older than the tables: they say how it ended.
                self._end_from_tables(mid)
            else:
                row = members_of(result).get(str(k), {}) if self.pack > 1 else result
                self.finish(mid, COMPLETE, self.value_of(mid, row), epoch)
        self.completed.add(trial_id)

    def note_readded(self, trial_id: str) -> None:
        """Tune added trial ``trial_id`` (its restore adds each trial of its saved state before any is run)."""
        if self._restored:
            self._readded.update(member_id(trial_id, k, self.pack) for k in range(self.pack))

    def fail_orphans(self, trials) -> int:
        """Optuna trials asked for that will never run as Tune trials: FAIL them. Those asked after the
        driver's last saved state, and those the searcher's state knows but Tune's does not (a kill between
        Tune's save of the one and of the other): neither re-added by Tune's restore nor in the tables."""
        known = set(self.numbers.values())
        if self._readded:
            recorded = set(trials.trial_id) if trials is not None else set()
            known = {n for mid, n in self.numbers.items() if mid in self._readded or mid in recorded}
        n = 0
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.number not in known:
                self._storage.set_trial_user_attr(self._trial_id(t.number), "orphaned",
                                                  "asked before a driver crash; never ran")
                self.study.tell(t.number, state=FAIL, skip_if_finished=True)
                n += 1
        self._mirror = None   # made again from the stored study, as it is now
        return n

    def level_with_tables(self, trials) -> None:
        """Bring the stored study level with the results tables, after a driver that was killed lost the
        writes it still had queued (study.tune.mirror): the tables are written first. Each recorded epoch
        with a finite loss and val PSNR is its trial's intermediate value, and a trial the tables say ended
        is told so. Column-wise, and per trial only where something is missing: a study of 10,000 trials
        resumes with this in its first seconds. ``trials``: the trials table (None while it has none)."""
        stored = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        if trials is not None:
            epochs = read_table(self.driver.study_root, "epochs")
            if epochs is not None and not self.multi:
                self._level_values(stored, epochs)
            ended = trials[trials.status.isin(list(STATE_OF.values()))]
            going = trials[~trials.status.isin(list(STATE_OF.values()))]
            self._resumed_epochs = {mid: int(n) for mid, n in zip(going.trial_id, going.epochs_run.fillna(0))
                                    if mid in self.numbers}
            for index, mid in zip(ended.index, ended.trial_id):
                number = self.numbers.get(mid)
                if number in stored and stored[number].state == optuna.trial.TrialState.RUNNING:
                    own = epochs[epochs.trial_id == mid] if epochs is not None else None
                    self._level_end(trials.loc[index].to_dict(), own)
        self._adopt_ends(stored)
        self._mirror = None   # made again from the stored study, as it is now

    def _adopt_ends(self, stored: dict[int, optuna.trial.FrozenTrial]) -> None:
        """Trials the stored study holds as ended at an epoch the tables have not recorded (a killed driver's
        queued writes got there first: on an object store the tables' journal is put on a cadence). The
        trial, restored, runs again up to that epoch and stops there, so that the tables end where Optuna
        does. A trial with no intermediate values (several objectives) cannot say where: it runs on."""
        for mid, number in self.numbers.items():
            trial = stored.get(number)
            if (mid in self.finished or trial is None or not trial.state.is_finished()
                    or not trial.intermediate_values):
                continue
            if trial.state == PRUNED:
                self.pruned.add(mid)
            self.finished[mid] = (STATE_OF[trial.state.name], max(trial.intermediate_values))

    def _level_values(self, stored: dict[int, optuna.trial.FrozenTrial], epochs) -> None:
        for mid, epoch, loss, value in zip(epochs.trial_id, epochs.epoch, epochs.train_loss, epochs[STEP_METRIC]):
            trial = stored.get(self.numbers.get(mid, -1))
            if (trial is not None and int(epoch) not in trial.intermediate_values and math.isfinite(loss)
                    and math.isfinite(value)):
                self._storage.set_trial_intermediate_value(self._trial_id(trial.number), int(epoch), float(value))

    def _end_from_tables(self, mid: str) -> None:
        """Tell member ``mid``'s end as DONE with the values of its best epoch in the tables."""
        trials, epochs = (read_table(self.driver.study_root, name) for name in ("trials", "epochs"))
        row = trials[trials.trial_id == mid].to_dict("records")
        own = epochs[epochs.trial_id == mid] if epochs is not None else None
        if row:
            self._level_end({**row[0], "status": "DONE"}, own)

    def _level_end(self, row: dict, own) -> None:
        mid, state = row["trial_id"], {v: k for k, v in STATE_OF.items()}[row["status"]]
        value = row.get(METRIC)
        if self.multi and own is not None:
            best = own[own["epoch"] == row["best_epoch"]].to_dict("records")
            value = [OBJECTIVES[o](best[0]) for o in self.objectives] if best else None
        state = getattr(optuna.trial.TrialState, state)
        if state == COMPLETE and (value is None or any(not math.isfinite(v) for v in np.atleast_1d(value))):
            state = FAIL
        self._store_end(self.numbers[mid], value if state == COMPLETE else None, state)
        if state == PRUNED:
            self.pruned.add(mid)
        try:
            epochs_run = int(row["epochs_run"])
        except (TypeError, ValueError):   # missing (NA) before its first epoch
            epochs_run = 0
        self.finished[mid] = (row["status"], epochs_run)
