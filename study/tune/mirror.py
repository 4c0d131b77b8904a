"""The driver's Optuna bookkeeping off the per-result path: prune from memory, write behind.

The driver is the Optuna study's only writer (study.tune.pruning says why), so it may keep what the
pruner reads in memory and decide there: ``StudyMirror`` is an in-memory Optuna study with the same
name, trial numbers, states, values, intermediate values and system attributes as the stored one, and
the space's pruner is asked with it. A decision then costs no database round trip and does not grow
with the stored study's size (the database is the slow part: every SQLite commit is an fsync).

The stored study is written in the same order by ``WriteBehind``, one thread of its own. Asking for new
trials (the sampler) still reads the stored study, through Optuna's cached storage. The window: a
SIGKILL of the driver loses the writes still queued (normally under a second's). The results tables
are written first and are the truth; on ``--resume`` the searcher brings the stored study level with
them (``OptunaSearcher.level_with_tables``), and the trials Ray restores re-report the epochs after
their checkpoints.
"""
from __future__ import annotations

import bisect
import heapq
import logging
from collections.abc import Callable, Container
from concurrent.futures import ThreadPoolExecutor

import optuna

from study.urls import masked_url, scrub

log = logging.getLogger("study")
TrialState = optuna.trial.TrialState


class FinishedIndex(optuna.storages.InMemoryStorage):
    """Optuna's in-memory storage that keeps its finished trials by state, for the pruners' questions.

    A pruner asks for a study's COMPLETE trials (the median and percentile pruners) on every result; the
    plain storage answers by scanning every trial, which grows with the study (about 1 ms at 10,000
    trials). A finished trial never changes again, so each state's list is kept as trials finish, in trial
    number order as Optuna returns them, and such a question costs what the answer holds. One study only.
    """

    def __init__(self):
        super().__init__()
        self._finished: dict[TrialState, list[optuna.trial.FrozenTrial]] = {}

    def _index(self, trial_id: int) -> None:
        trial = self.get_trial(trial_id)
        if trial.state.is_finished():
            bisect.insort(self._finished.setdefault(trial.state, []), trial, key=lambda t: t.number)

    def create_new_trial(self, study_id: int, template_trial: optuna.trial.FrozenTrial | None = None) -> int:
        trial_id = super().create_new_trial(study_id, template_trial)
        self._index(trial_id)
        return trial_id

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        changed = super().set_trial_state_values(trial_id, state, values)
        if changed:
            self._index(trial_id)
        return changed

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[optuna.trial.FrozenTrial]:
        if deepcopy or states is None or not all(s.is_finished() for s in states):
            return super().get_all_trials(study_id, deepcopy, states)
        lists = [self._finished.get(s, []) for s in states]
        return list(heapq.merge(*lists, key=lambda t: t.number)) if len(lists) > 1 else list(lists[0])


class StudyMirror:
    """An in-memory copy of a stored Optuna study, made for asking its pruner: each trial's number, state,
    values, intermediate values and system attributes (not its parameters).

    Invariant: trial ``n`` here is trial ``n`` there (pruners such as Hyperband place a trial by its
    number), so every trial the stored study gets is tracked here in order (``track``)."""

    def __init__(self, source: optuna.Study, pruner: optuna.pruners.BasePruner):
        self._storage = FinishedIndex()
        self.study = optuna.create_study(storage=self._storage, study_name=source.study_name,
                                         directions=source.directions, pruner=pruner)
        self._study_id = self._storage.get_study_id_from_name(source.study_name)
        self._source = source
        for trial in source.get_trials(deepcopy=False):
            self._copy(trial)

    def __len__(self) -> int:
        return len(self._storage.get_all_trials(self._study_id, deepcopy=False))

    def _copy(self, trial: optuna.trial.FrozenTrial) -> None:
        # What pruners read, not the parameters and their distributions: copying those took most of the
        # time a study of 10,000 trials takes to copy.
        slim = optuna.trial.FrozenTrial(
            number=trial.number, state=trial.state, value=None, values=trial.values,
            datetime_start=trial.datetime_start, datetime_complete=trial.datetime_complete, params={},
            distributions={}, user_attrs={}, system_attrs=trial.system_attrs,
            intermediate_values=trial.intermediate_values, trial_id=trial._trial_id)
        self._storage.create_new_trial(self._study_id, template_trial=slim)

    def _id(self, number: int) -> int:
        return self._storage.get_trial_id_from_study_id_trial_number(self._study_id, number)

    def trial(self, number: int) -> optuna.trial.FrozenTrial:
        return self._storage.get_trial(self._id(number))

    def track(self, number: int) -> None:
        """Trial ``number`` was just asked for in the stored study: have it here, running."""
        have = len(self)
        if number < have:
            if self.trial(number).state == TrialState.WAITING:   # enqueued before this copy was made
                self._storage.set_trial_state_values(self._id(number), TrialState.RUNNING)
            return
        if number > have:   # trials made meanwhile (enqueued ones): copied, so that numbers stay in step
            stored = {t.number: t for t in self._source.get_trials(deepcopy=False) if have <= t.number < number}
            for n in range(have, number):
                self._copy(stored[n])
        self._storage.create_new_trial(self._study_id)   # trial ``number``: running, as it was just asked for

    def report(self, number: int, step: int, value: float) -> bool:
        """Record ``value`` at ``step`` unless it is there already (a restored trial re-runs epochs);
        returns whether it was new."""
        if step in self.trial(number).intermediate_values:
            return False
        self._storage.set_trial_intermediate_value(self._id(number), step, value)
        return True

    def should_prune(self, number: int) -> tuple[bool, dict]:
        """The pruner's answer for trial ``number``, and the system attributes it set meanwhile (successive
        halving records its rungs there) for the stored study."""
        before = self.trial(number)
        prune = self.study.pruner.prune(self.study, before)
        after = self.trial(number).system_attrs
        return prune, {k: v for k, v in after.items() if before.system_attrs.get(k, object()) != v}

    def tell(self, number: int, values, state: optuna.trial.TrialState) -> None:
        self.study.tell(number, values, state=state, skip_if_finished=True)


class WriteBehind:
    """Writes to the stored study, in the order given, on one thread: queuing one costs microseconds.

    ``hold`` keeps the writes queued after it until ``release``: a result's writes (its intermediate value,
    a prune, an end) wait until the results tables' journal has the result's rows, so that a driver killed
    in between leaves the stored study behind the tables (which a resume levels), never ahead of them."""

    def __init__(self, storage_url: str):
        self._url = storage_url
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="optuna-writes")
        self._held: list[tuple[Callable, tuple]] | None = None

    def hold(self) -> None:
        if self._held is None:
            self._held = []

    def release(self) -> None:
        held, self._held = self._held, None
        for write, args in held or ():
            self._pool.submit(self._run, write, args)

    def submit(self, write: Callable, *args) -> None:
        if self._held is not None:
            self._held.append((write, args))
        else:
            self._pool.submit(self._run, write, args)

    def _run(self, write: Callable, args: tuple) -> None:
        try:
            write(*args)
        except Exception as e:  # noqa: BLE001 - a failed write must not stop the driver: say it and go on
            log.warning("optuna storage %s: %s failed: %s", masked_url(self._url),
                        getattr(write, "__name__", "a write"), scrub(str(e), self._url))

    def flush(self) -> None:
        """Wait until every write queued so far, held ones included, is done."""
        self.release()
        self._pool.submit(lambda: None).result()

    def close(self) -> None:
        self.release()
        self._pool.shutdown(wait=True)
