"""Pruning in a Ray Tune study: the driver asks Optuna's pruner each epoch, for trials and pack members.

Where pack pruning is decided: in the driver, which asks Optuna exactly as it does for single
trials, and hands the answer to the pack's worker through ``PackDecisions``. The alternative
(workers talking to Optuna through its gRPC storage proxy) would need a server and an open port
on the driver that every node can reach, and a second writer of the study; here Optuna is only
ever touched by the driver (an SQLite file next to the driver keeps working on a cluster) and the
answer travels on Ray's own authenticated channels.
"""
from __future__ import annotations

import asyncio
import posixpath

import ray
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

import study.tune.ray_internals as ray_internals
from study.tune.keys import ERROR_KEY, STEP_METRIC
from study.tune.searcher import COMPLETE, FAIL, PRUNED, OptunaSearcher, member_id, members_of
from study.tune.state import DriverState, UsesDriver
from study.tune.timings import DriverTimings
from study.tune.upload import ChangedFiles


@ray.remote(num_cpus=0)
class PackDecisions:
    """Which members of a pack the driver stopped after an epoch; the pack's worker waits for the answer."""

    def __init__(self):
        self._stops: dict[tuple[str, int], list[int]] = {}
        self._events: dict[tuple[str, int], asyncio.Event] = {}

    def _event(self, key) -> asyncio.Event:
        return self._events.setdefault(key, asyncio.Event())

    async def decide(self, trial_id: str, epoch: int, stop: list[int]) -> None:
        self._stops[(trial_id, epoch)] = stop
        self._event((trial_id, epoch)).set()
        for old in [k for k in self._stops if k[0] == trial_id and k[1] < epoch - 2]:
            self._stops.pop(old, None)
            self._events.pop(old, None)

    async def wait(self, trial_id: str, epoch: int, timeout_s: float) -> list[int] | None:
        try:
            await asyncio.wait_for(self._event((trial_id, epoch)).wait(), timeout_s)
        except asyncio.TimeoutError:
            return None
        return self._stops.get((trial_id, epoch), [])


class OptunaPruningScheduler(UsesDriver, FIFOScheduler):
    """Asks the Optuna study's pruner, once per reported epoch, whether to stop a trial (or pack member)."""

    def __init__(self, searcher: OptunaSearcher, driver: DriverState | None):
        super().__init__()
        self.searcher = searcher
        self._driver = driver

    def __getstate__(self):   # Ray pickles the scheduler (tuner.pkl): never the driver state, nor its uploader
        return {k: v for k, v in self._pickled(self.__dict__).items() if k != "_upload"}

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        self.searcher.note_readded(trial.trial_id)
        ray_internals.forget_missing_checkpoints(trial)   # a restored trial's saved state may name deleted ones
        ray_internals.save_state_on_period(tune_controller)
        ray_internals.save_state_after_this_step(tune_controller)
        ray_internals.upload_state_with(tune_controller, self._uploader)

    @property
    def _uploader(self) -> ChangedFiles:
        """How Tune's state reaches the study folder in this run (made here: Ray pickles the scheduler without it)."""
        if self.__dict__.get("_upload") is None:
            self._upload = ChangedFiles(last=ray_internals.saved_state_patterns()["experiment"])
        return self._upload

    def on_trial_complete(self, tune_controller, trial, result):
        super().on_trial_complete(tune_controller, trial, result)
        self._trial_ended(trial)

    def on_trial_remove(self, tune_controller, trial):
        super().on_trial_remove(tune_controller, trial)
        self._trial_ended(trial)

    def _trial_ended(self, trial) -> None:
        # Not on_trial_error: Tune calls it also for a trial it retries, whose folder gets more logs.
        if trial.path:
            self._uploader.ended(posixpath.basename(trial.path.rstrip("/")))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        # "done": Tune repeats a trial's last result when its function returns (for a restored trial that
        # ran nothing in this run, the one its saved state holds): every epoch was decided as it came.
        if ERROR_KEY in result or "epoch" not in result or result.get("done"):
            return TrialScheduler.CONTINUE
        epoch = int(result["epoch"])
        members = members_of(result)
        s = self.searcher
        s.ready()   # a restored study's ends are known before any is read below
        s.hold_writes()   # until the results callback has this result's rows (it runs after this hook)
        if not members:
            ended = s.finished.get(trial.trial_id)
            if ended is not None:   # told before (restored, it runs again): it stops where it ended
                return TrialScheduler.STOP if epoch >= ended[1] else TrialScheduler.CONTINUE
            s.note_epoch(trial.trial_id, result)
            if s.report_and_should_prune(trial.trial_id, float(result[STEP_METRIC]), epoch):
                s.finish(trial.trial_id, PRUNED, None, epoch)
                return TrialScheduler.STOP
            return TrialScheduler.CONTINUE
        stop = []
        for key, row in members.items():
            k = int(key)
            mid = member_id(trial.trial_id, k, s.pack)
            ended = s.finished.get(mid)
            if ended is not None:   # told before (a restored pack re-runs epochs): it leaves where it ended
                if epoch >= ended[1]:
                    stop.append(k)
                continue
            s.note_epoch(mid, row)
            if row.get("error"):
                s.finish(mid, FAIL, None, epoch)
                stop.append(k)
            elif s.report_and_should_prune(mid, float(row[STEP_METRIC]), epoch):
                s.finish(mid, PRUNED, None, epoch)
                stop.append(k)
            elif epoch >= int(row.get("epochs", 0) or 0) > 0:
                s.finish(mid, COMPLETE, s.value_of(mid, row), epoch)
        decisions = self.driver.decisions
        if decisions is not None:
            decisions.decide.remote(trial.trial_id, epoch, sorted(stop))
        return TrialScheduler.CONTINUE


class TimedPruningScheduler(OptunaPruningScheduler):
    """The study's pruning scheduler, noting when each result reaches it (``DriverTimings``). Ray pickles
    it without the timings: a resumed synthetic study runs untimed."""

    def __init__(self, searcher, driver, timings: DriverTimings | None):
        super().__init__(searcher, driver)
        self.timings = timings

    def __getstate__(self):
        return {**super().__getstate__(), "timings": None}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self.timings is not None:
            self.timings.scheduler_got(trial.trial_id)
        return super().on_trial_result(tune_controller, trial, result)
