"""Every Ray call of the project lives here (Ray's API moves between releases; pinned 2.60).

- ``PruningOptunaSearch``: Ray Tune's OptunaSearch on an RDB-stored Optuna study,
  telling Optuna PRUNED for trials the pruner stopped (stock OptunaSearch runs a
  NopPruner and reports scheduler-stopped trials as COMPLETE). With packs, one
  Tune trial is K Optuna trials ("members").
- ``OptunaPruningScheduler``: reports each epoch's own val PSNR to the member's
  Optuna trial and stops it when the study's pruner says so.
- ``PackDecisions``: the Ray actor through which a pack's worker learns, each
  epoch, which of its members the driver pruned.
- ``ResultsCallback``: the driver-side, single writer of the Parquet results.
- ``ColorizeTrial``: one Tune trial = ``study.train.run_trial`` on the resolved
  config, or ``study.pack.run_pack`` on K member configs.

Where pack pruning is decided: in the driver, which asks Optuna exactly as it does
for single trials, and hands the answer to the worker through ``PackDecisions``.
The alternative (workers talking to Optuna through its gRPC storage proxy) would
need a server and an open port on the driver that every node can reach, and a
second writer of the study; here Optuna is only ever touched by the driver (an
SQLite file next to the driver keeps working on a cluster) and the answer travels
on Ray's own authenticated channels.
"""
from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import math
import os
import pickle
import re
import shutil
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pyarrow.fs as pafs
import ray
import torch
from ray import tune
from ray.tune import Callback, Checkpoint
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch
from ray.tune.trainable import wrap_function

from study.contract import OBJECTIVES, best_trials
from study.data import ALLOW_GRAYSCALE_ENV, DataError, Splits, default_cache_dir, default_data_root, load_splits
from study.models import ConfigError
from study.results import ResultsWriter, epoch_row, preview_rows, resolve, trial_row
from study.space import Space
from study.train import NonFiniteLossError, device_name, original_previews, pick_device, run_trial, trial_splits

log = logging.getLogger("study")
# A checkpoint per epoch is the point (resume, pruning); Ray's warning about it is noise here.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# Ray saves the experiment state at most every 10 s by default ("auto"): a trial created after the
# last save and cut off by a driver crash is never resumed, and a new one replaces it (seen with
# packs in tests/test_packs_study.py). Saving every 2 s keeps that window small; the state is a
# few small files.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
# A reused actor (reuse_actors) starts its next trial within a second of the last, inside that period:
# each new trial is saved at once (OptunaPruningScheduler.on_trial_add) unless saves were asked to be
# rarer than this (then a trial started since the last save is orphaned by a crash, see fail_orphans).
SAVE_EACH_NEW_TRIAL_MAX_PERIOD_S = 10.0
# Tune gives a finished trial's thread 2 s to end before reusing its actor, and fails the next trial
# if it has not; a trial's cleanup (checkpoint folders, CUDA memory) on a busy machine may take longer.
os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "30")
METRIC = "best_val_psnr"    # a trial's value in Optuna: its best epoch's val PSNR (RGB, dB)
STEP_METRIC = "val_psnr"    # each epoch's intermediate value in Optuna: that epoch's own val PSNR
ERROR_KEY = "trial_error"   # set in a trial's last report when it failed for a reason a retry cannot fix
MEMBERS_KEY = "members"     # a pack's report: {str(member index): epoch row} of the members still in it
STATE_OF = {"COMPLETE": "DONE", "PRUNED": "PRUNED", "FAIL": "ERROR"}   # Optuna state -> results status


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


# ------------------------------------------------------------------ Optuna side


class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch whose study has a real pruner, and which tells Optuna the truth about each trial.

    Nothing that reaches a database is pickled (Ray writes the searcher to world-readable
    files, ``tuner.pkl`` and ``searcher-state-*.pkl``), so neither is its URL, which may hold a
    password: the storage and study are dropped and rebuilt by ``bind_storage`` from the URL
    the driver holds in memory.
    """

    def __init__(self, *args, pruner: optuna.pruners.BasePruner, storage_url: str, pack: int = 1,
                 objectives: tuple[str, ...] = (), **kwargs):
        self._pruner = pruner
        self.pack = pack
        self.objectives = tuple(objectives)   # () or one: METRIC, single-objective; two or more: a front
        # member id -> the objectives at its best epoch so far (multi-objective only)
        self.best_values: dict[str, list[float]] = {}
        if len(self.objectives) > 1:
            unknown = [o for o in self.objectives if o not in OBJECTIVES]
            if unknown:
                raise ConfigError(f"objectives {unknown} are not known; choose from {sorted(OBJECTIVES)}")
            kwargs.update(metric=list(self.objectives), mode=["max"] * len(self.objectives))
        self.pruned: set[str] = set()
        # member id -> (results status, last epoch) once Optuna was told its end
        self.finished: dict[str, tuple[str, int]] = {}
        self._pending_ids: dict[str, int] = {}
        super().__init__(*args, storage=optuna.storages.RDBStorage(storage_url), **kwargs)

    # ---- pickling without the database
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_storage"] = state["_ot_study"] = None
        state["_ot_trials"] = {}
        state["_pending_ids"] = {tid: t._trial_id for tid, t in self._ot_trials.items()}
        return state

    def bind_storage(self, storage_url: str) -> None:
        """(Re)connect to the Optuna study after unpickling, from the driver's in-memory URL."""
        self._storage = optuna.storages.RDBStorage(storage_url)
        self._setup_study(self._mode)
        self._ot_trials = {tid: optuna.trial.Trial(self._ot_study, i) for tid, i in self._pending_ids.items()}

    def save(self, checkpoint_path: str):
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        trials = state.pop("_ot_trials", {}) or {}
        pending = state.pop("_pending_ids", {}) or {}
        # An older study's state held the storage itself: never take it over from a file.
        for k in ("_storage", "_ot_study"):
            state.pop(k, None)
        pending.update({tid: t._trial_id for tid, t in trials.items()})
        self.__dict__.update(state)
        if self._sampler is not None:  # the sampler as saved (its random state goes on)
            self._ot_study.sampler = self._sampler
        self._ot_study.pruner = self._pruner
        self._pending_ids = pending
        self._ot_trials = {tid: optuna.trial.Trial(self._ot_study, i) for tid, i in pending.items()}
        self.fail_orphans()

    def _setup_study(self, mode):
        super()._setup_study(mode)
        self._ot_study.pruner = self._pruner
        if self._ot_study.metric_names is None:
            with warnings.catch_warnings():  # experimental in Optuna 5, and what optuna-dashboard reads
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._ot_study.set_metric_names(list(self.objectives) if self.multi else [METRIC])

    def describe(self, space: Space) -> None:
        """Record the space's name and its file's sha256 in the study (read by optuna-dashboard)."""
        digest = hashlib.sha256(Path(space.path).read_bytes()).hexdigest()
        attrs = self._ot_study.user_attrs
        if attrs.get("space_sha256") not in (None, digest):
            log.warning("space file %s changed since the study started", space.path)
            self._ot_study.set_user_attr("space_sha256_resumed", digest)
        else:
            self._ot_study.set_user_attr("space", space.name)
            self._ot_study.set_user_attr("space_file", Path(space.path).name)
            self._ot_study.set_user_attr("space_sha256", digest)
        self._ot_study.set_user_attr("pack", self.pack)

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    def note_epoch(self, mid: str, row: dict) -> None:
        """Keep the objectives of a member's best epoch (what it is told as at its end)."""
        if self.multi and row.get("best_epoch") == row.get("epoch") and mid not in self.finished:
            self.best_values[mid] = [OBJECTIVES[o](row) for o in self.objectives]

    def value_of(self, mid: str, row: dict):
        return self.best_values.get(mid) if self.multi else row.get(METRIC)

    # ---- asking
    def optuna_number(self, mid: str) -> int:
        t = self._ot_trials.get(mid)
        return -1 if t is None else t.number

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if config is None:
            return None
        first = self._ot_trials[trial_id]
        # Recorded in the study itself, so a resumed driver can tell its trials from orphans.
        first.set_user_attr("ray_trial_id", trial_id)
        if self.pack == 1:
            return config
        # The other members share the first one's structure; the sampler picks the rest
        # (TPE with constant_liar keeps these back-to-back asks apart).
        from study.pack import STRUCTURE
        fixed = {n: v for n, v in first.params.items() if n.split("__")[0] in STRUCTURE}
        members = [config]
        self._ot_trials[member_id(trial_id, 0, self.pack)] = self._ot_trials.pop(trial_id)
        for k in range(1, self.pack):
            self._ot_study.enqueue_trial(fixed, skip_if_exists=False)
            ot = self._ot_study.ask()
            ot.set_user_attr("ray_trial_id", trial_id)
            self._ot_trials[member_id(trial_id, k, self.pack)] = ot
            members.append(self._suggest_from_define_by_run_func(self._space, ot))
        for k in range(self.pack):
            self._ot_trials[member_id(trial_id, k, self.pack)].set_user_attr("pack_member", k)
        return {"pack": members}

    # ---- telling
    def report_and_should_prune(self, mid: str, value: float, step: int) -> bool:
        ot_trial = self._ot_trials.get(mid)
        if self.multi:
            return False  # Optuna takes no intermediate values, and no pruner works, with several objectives
        if ot_trial is None or mid in self.finished or not math.isfinite(value):
            return False
        if step not in self._ot_study._storage.get_trial(ot_trial._trial_id).intermediate_values:
            ot_trial.report(value, step)
        return ot_trial.should_prune()

    def finish(self, mid: str, state: optuna.trial.TrialState, value: float | None, epoch: int) -> None:
        """Tell Optuna a member's (or single trial's) end, once."""
        if mid in self.finished or mid not in self._ot_trials:
            return
        values = value if isinstance(value, list) else [value]
        if state == optuna.trial.TrialState.COMPLETE and \
                any(v is None or not math.isfinite(v) for v in values):
            state, value = optuna.trial.TrialState.FAIL, None
        if state != optuna.trial.TrialState.COMPLETE:
            value = None
        try:
            self._ot_study.tell(self._ot_trials[mid], value, state=state)
        except (ValueError, RuntimeError) as e:  # e.g. finished before a driver crash
            log.warning("optuna tell for %s: %s", mid, e)
        if state == optuna.trial.TrialState.PRUNED:
            self.pruned.add(mid)
        self.finished[mid] = (STATE_OF[state.name], int(epoch))

    def on_trial_result(self, trial_id: str, result: dict):
        pass  # OptunaPruningScheduler reports each epoch (it runs before this hook)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id in self._completed_trials:
            return
        result = result or {}
        failed = error or bool(result.get(ERROR_KEY))
        epoch = int(result.get("epoch", 0) or 0)
        for k in range(self.pack):
            mid = member_id(trial_id, k, self.pack)
            if self.pack == 1 and mid in self.pruned:
                continue
            if failed:
                self.finish(mid, optuna.trial.TrialState.FAIL, None, epoch)
            else:
                row = members_of(result).get(str(k), {}) if self.pack > 1 else result
                self.finish(mid, optuna.trial.TrialState.COMPLETE, self.value_of(mid, row), epoch)
        self._completed_trials.add(trial_id)

    def fail_orphans(self) -> int:
        """Optuna trials asked for after the driver's last saved state never ran as Tune trials: FAIL them."""
        known = {t.number for t in self._ot_trials.values()}
        n = 0
        for t in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,
                                                                   optuna.trial.TrialState.WAITING)):
            if t.number not in known:
                self._ot_study._storage.set_trial_user_attr(t._trial_id, "orphaned",
                                                            "asked before a driver crash; never ran")
                self._ot_study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
                n += 1
        return n


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


class OptunaPruningScheduler(FIFOScheduler):
    """Asks the Optuna study's pruner, once per reported epoch, whether to stop a trial (or pack member)."""

    def __init__(self, searcher: PruningOptunaSearch):
        super().__init__()
        self.searcher = searcher
        self.decisions = None   # PackDecisions handle (packs only), set by build_tuner: never pickled

    def __getstate__(self):
        return {**self.__dict__, "decisions": None}

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        _save_state_after_this_step(tune_controller)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if ERROR_KEY in result or "epoch" not in result:
            return TrialScheduler.CONTINUE
        epoch = int(result["epoch"])
        members = members_of(result)
        if not members:
            self.searcher.note_epoch(trial.trial_id, result)
            if self.searcher.report_and_should_prune(trial.trial_id, float(result[STEP_METRIC]), epoch):
                self.searcher.finish(trial.trial_id, optuna.trial.TrialState.PRUNED, None, epoch)
                return TrialScheduler.STOP
            return TrialScheduler.CONTINUE
        stop = []
        for key, row in members.items():
            k = int(key)
            mid = member_id(trial.trial_id, k, self.searcher.pack)
            ended = self.searcher.finished.get(mid)
            if ended is not None:   # told before (a restored pack re-runs epochs): it leaves where it ended
                if epoch >= ended[1]:
                    stop.append(k)
                continue
            self.searcher.note_epoch(mid, row)
            if row.get("error"):
                self.searcher.finish(mid, optuna.trial.TrialState.FAIL, None, epoch)
                stop.append(k)
            elif self.searcher.report_and_should_prune(mid, float(row[STEP_METRIC]), epoch):
                self.searcher.finish(mid, optuna.trial.TrialState.PRUNED, None, epoch)
                stop.append(k)
            elif epoch >= int(row.get("epochs", 0) or 0) > 0:
                self.searcher.finish(mid, optuna.trial.TrialState.COMPLETE, self.searcher.value_of(mid, row), epoch)
        if self.decisions is not None:
            self.decisions.decide.remote(trial.trial_id, epoch, sorted(stop))
        return TrialScheduler.CONTINUE


def _save_state_after_this_step(tune_controller) -> None:
    """Have Tune save its experiment state at the end of this step of its loop, new trials included.

    So a driver crash right after a trial starts (a reused actor starts one at once) resumes that
    trial instead of orphaning it. Tune has no public call for this: the scheduler is handed a
    wrapper of the controller, whose experiment-state manager takes a "force" flag at its next
    save (Ray 2.60's private names). Without them, Ray's save period alone decides, as before.
    """
    period = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", "auto")
    try:
        if period != "auto" and float(period) > SAVE_EACH_NEW_TRIAL_MAX_PERIOD_S:
            return
        manager = tune_controller._tune_controller._checkpoint_manager
        if hasattr(manager, "_should_force_sync_up"):
            manager._should_force_sync_up = True
    except (AttributeError, ValueError) as e:
        log.debug("cannot ask Tune to save the new trial at once: %s", e)


# ------------------------------------------------------------------ results


def _relative(path: str, root: str) -> str:
    return path[len(root):].lstrip("/") if path.startswith(root.rstrip("/") + "/") else path


# What the driver learns about a trial besides its config and epochs (trials-table columns), with defaults.
TRIAL_META = {"wall_time_s": float("nan"), "device": "", "node_id": "", "checkpoint_path": "", "gpu_ids": "",
              "started_at": float("nan"), "finished_at": float("nan"), "restarts": 0, "resumed_at_epoch": 0}


class ResultsCallback(Callback):
    """Writes trials/epochs/previews while the study runs (the driver is the only writer).

    Where the study lives, and where its data is, are bound by the driver at run time
    (``bind``), never taken from Ray's pickles: a copied or moved study resumes in its
    new place. Epoch rows are written as they come; the trials table is staged and
    written once per controller step (``on_step_end``), at once when a trial ends.
    """

    def __init__(self, searcher: PruningOptunaSearch, space: Space, progress_every_s: float = 10.0):
        self.searcher, self.space = searcher, space
        self.progress_every_s = progress_every_s
        self.study: str | None = None
        self.data_root = self.cache_dir = None
        self.cluster = False
        self._writer = None
        self._last_progress = 0.0
        self._meta: dict[str, dict] = {}
        self._noted: set = set()

    def __getstate__(self):  # Tune pickles callbacks; location and tables are bound again on resume
        d = self.__dict__.copy()
        d.update(_writer=None, study=None, data_root=None, cache_dir=None, _meta={}, _noted=set())
        return d

    def bind(self, study: str, data_root: str | None, cache_dir: str | None, cluster: bool) -> None:
        self.study, self.data_root, self.cache_dir, self.cluster = study, data_root, cache_dir, cluster
        self._writer = None

    @property
    def writer(self) -> ResultsWriter:
        if self._writer is None:
            if self.study is None:
                raise RuntimeError("ResultsCallback used before bind(): build_tuner binds it")
            self._writer = ResultsWriter(self.study)
        return self._writer

    def setup(self, **info):
        self._writer = ResultsWriter(self.study)
        self._orphans_checked = False

    def on_step_begin(self, iteration, trials, **info):
        if getattr(self, "_orphans_checked", True):
            return
        self._orphans_checked = True
        # After a restore: a trial that started after Ray's last saved state is not among the restored
        # trials and will never run again; its rows must not stay RUNNING (Optuna FAILs it as orphaned).
        known = {member_id(t.trial_id, k, self._pack(t)) for t in trials for k in range(self._pack(t))}
        df = self.writer.tables["trials"]
        if df is None:
            return
        orphans = df[(df.status == "RUNNING") & ~df.trial_id.isin(known)].to_dict("records")
        for row in orphans:
            row.update(status="ERROR", error="orphaned: started after the driver's last saved state, "
                                             "so the resumed study could not continue it")
        self.writer.stage("trials", orphans)

    # ---- what a trial is
    def _pack(self, trial) -> int:
        return len(trial.config["pack"]) if "pack" in trial.config else 1

    def _configs(self, trial) -> list[tuple[dict, str | None]]:
        """(config, error) per member: a config a trial rejects is that trial's ERROR, not the driver's."""
        raw = trial.config["pack"] if "pack" in trial.config else [trial.config]
        out = []
        for c in raw:
            try:
                cfg = self.space.resolve(c)
                out.append(({**cfg.to_dict(), "resolution": cfg.image_size}, None))
            except (ConfigError, ValueError, TypeError) as e:
                plain = {k: v for k, v in c.items() if "__" not in k}
                out.append((plain, f"ConfigError: {e}"))
        return out

    def _stage_trial(self, trial, status: str | None = None, error: str | None = None):
        """Stage one trials row per member; ``status`` None: RUNNING unless the member already ended."""
        meta = {**TRIAL_META, **self._meta.setdefault(trial.trial_id, {})}
        k_total = self._pack(trial)
        rows = []
        numbers = [self.searcher.optuna_number(member_id(trial.trial_id, k, k_total)) for k in range(k_total)]
        for k, (config, config_error) in enumerate(self._configs(trial)):
            mid = member_id(trial.trial_id, k, k_total)
            ended = self.searcher.finished.get(mid)
            # A member that left the pack (or a pruned trial) keeps its own end.
            st, err = (ended[0] if ended else status or "RUNNING"), error
            if st == "ERROR" and err is None:
                err = config_error or meta.get("member_errors", {}).get(k) or "failed"
            mm = {**meta, **meta.get("members", {}).get(k, {})}
            common = {key: mm[key] for key in ("wall_time_s", "device", "node_id", "checkpoint_path")}
            rows.append(trial_row(
                mid, config, st, self.writer.history(mid), error=err, optuna_number=numbers[k], **common)
                | {key: mm[key] for key in TRIAL_META if key not in common}
                | {"pack_id": numbers[0], "pack_size": k_total})
        self.writer.stage("trials", rows)

    def _originals(self, trial) -> None:
        """The test images and their grayscale inputs, once per (dataset, resolution), from the driver's data."""
        config, error = self._configs(trial)[0]
        if error:
            return
        key = (config["dataset"], int(config["resolution"]))
        if self.writer.has_originals(*key) or key in self._noted:
            return
        self._noted.add(key)
        if self.cluster and config["dataset"] != "samples" and not (self.data_root and Path(self.data_root).is_dir()):
            print(f"note: no {key[0]} data on the driver: the study's original/grayscale previews are left out")
            return
        try:
            splits = load_splits(config["dataset"], key[1], self.data_root, self.cache_dir,
                                 config.get("train_limit", 0), config.get("eval_limit", 0))
        except (DataError, OSError) as e:
            print(f"note: original/grayscale previews of {key[0]} left out ({e})")
            return
        files = original_previews(splits.test, int(config.get("preview_count", 8)))
        self.writer.add_previews(preview_rows("", config, 0, files))

    # ---- Tune's events
    def on_trial_start(self, iteration, trials, trial, **info):
        existing = self.writer.tables["trials"]
        meta = self._meta.get(trial.trial_id)
        first = member_id(trial.trial_id, 0, self._pack(trial))
        if meta is None and existing is not None and (existing.trial_id == first).any():
            # Known to the study but not to this driver: the driver was restored, and the trial
            # restarts (from its checkpoint, if it has one). Keep what is known and count it.
            prev = existing[existing.trial_id == first].iloc[0]
            meta = self._meta.setdefault(trial.trial_id, {})
            for k in TRIAL_META:
                if k in prev and pd.notna(prev[k]):
                    meta[k] = prev[k]
            for k in range(self._pack(trial)):
                row = existing[existing.trial_id == member_id(trial.trial_id, k, self._pack(trial))]
                if len(row) and pd.notna(row.iloc[0].get("checkpoint_path")):
                    meta.setdefault("members", {}).setdefault(k, {})["checkpoint_path"] = \
                        row.iloc[0]["checkpoint_path"]
            meta["restarts"] = int(meta.get("restarts", 0) or 0) + 1
            meta["awaiting_first_result"] = True
        self._meta.setdefault(trial.trial_id, {})
        self._originals(trial)
        self._stage_trial(trial)
        self.writer.flush()

    def on_trial_recover(self, iteration, trials, trial, **info):
        # Its worker died; Ray restarts it from its last checkpoint (FailureConfig.max_failures).
        meta = self._meta.setdefault(trial.trial_id, {})
        meta["restarts"] = int(meta.get("restarts", 0) or 0) + 1
        meta["awaiting_first_result"] = True

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if ERROR_KEY in result or "epoch" not in result:
            return
        epoch = int(result["epoch"])
        meta = self._meta.setdefault(trial.trial_id, {})
        if meta.pop("awaiting_first_result", False):
            meta["resumed_at_epoch"] = epoch
        k_total = self._pack(trial)
        members = result.get(MEMBERS_KEY, {"0": result})
        for key, row in members.items():
            mid = member_id(trial.trial_id, int(key), k_total)
            ended = self.searcher.finished.get(mid)
            if ended is not None and epoch > ended[1]:
                continue   # a restored pack re-running a member that already left
            # A trial restored from an older checkpoint re-runs later epochs: forget them first.
            self.writer.drop_epochs_after(mid, epoch - 1)
            self.writer.add_epochs(mid, [epoch_row(mid, row)])
            if row.get("error"):
                meta.setdefault("member_errors", {})[int(key)] = row["error"]
        meta.update(
            device=result.get("device", ""), node_id=result.get("node_id", ""),
            gpu_ids=result.get("gpu_ids", ""), wall_time_s=float(result.get("time_total_s", float("nan"))),
            started_at=float(result.get("started_at", float("nan"))), finished_at=time.time())
        self._stage_trial(trial)
        self._progress(trials)

    def on_checkpoint(self, iteration, trials, trial, checkpoint: Checkpoint, **info):
        result = trial.last_result or {}
        if "epoch" not in result or ERROR_KEY in result:
            return
        fs, path = checkpoint.filesystem, checkpoint.path
        k_total = self._pack(trial)
        members = result.get(MEMBERS_KEY, {"0": result})
        configs = self._configs(trial)
        meta = self._meta.setdefault(trial.trial_id, {})
        for key, row in members.items():
            k = int(key)
            sub = path if k_total == 1 else f"{path}/member-{k}"
            mid = member_id(trial.trial_id, k, k_total)
            files = {}
            for info_ in fs.get_file_info(pafs.FileSelector(sub, allow_not_found=True)):
                if info_.base_name.startswith("prediction_") and info_.base_name.endswith(".png"):
                    with fs.open_input_stream(info_.path) as f:
                        files[info_.base_name] = f.read()
            self.writer.add_previews(preview_rows(mid, configs[k][0], result["epoch"], files))
            if row.get("best_epoch") == result["epoch"]:
                # Kept by Ray; stored relative to the study folder so a copied study still works.
                meta.setdefault("members", {}).setdefault(k, {})["checkpoint_path"] = \
                    _relative(sub, resolve(self.study)[1])
        self._stage_trial(trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if result.get(ERROR_KEY):
            self._stage_trial(trial, "ERROR", result[ERROR_KEY])
        elif self._pack(trial) == 1:
            self._stage_trial(trial, "PRUNED" if trial.trial_id in self.searcher.pruned else "DONE")
        else:
            self._stage_trial(trial)   # each member's own end (told to Optuna as it left the pack)
        self.writer.flush()
        self._progress(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._stage_trial(trial, "ERROR", _error_text(trial))
        self.writer.flush()
        self._progress(trials, force=True)

    def on_step_end(self, iteration, trials, **info):
        if self._writer is not None:
            self._writer.flush()   # the trials table at most once per step of Tune's loop

    def on_experiment_end(self, trials, **info):
        self.writer.flush()

    def _progress(self, trials, force: bool = False):
        now = time.time()
        if not force and now - self._last_progress < self.progress_every_s:
            return
        self._last_progress = now
        df = self.writer.tables["trials"]
        counts = df.status.value_counts().to_dict() if df is not None else {}
        line = (f"[{time.strftime('%H:%M:%S')}] trials: {len(trials)} started, {counts.get('RUNNING', 0)} running, "
                f"{counts.get('DONE', 0)} done, {counts.get('PRUNED', 0)} pruned, {counts.get('ERROR', 0)} error")
        best = best_trials(df)   # the contract's best rule (empty while no trial has a score)
        if not best.empty:
            b = best.iloc[0]
            line += (f" | best val PSNR {b.best_val_psnr:.2f} dB (gray {b.val_gray_psnr:.2f}): {b.trial_id} "
                     f"{b.dataset} {b.sampling} {b.output} depth {b.depth}")
        print(line, flush=True)


def _error_text(trial) -> str:
    """The end of the trial's traceback (Ray writes it to the trial folder)."""
    try:
        if trial.error_file and Path(trial.error_file).exists():
            return Path(trial.error_file).read_text()[-2000:]
        return str(trial.get_error())[-2000:]
    except Exception as e:  # noqa: BLE001 - the ERROR status is what matters; the text is best effort
        return f"trial failed (its error text could not be read: {e})"


# ------------------------------------------------------------------ the trainable


def trainable(config: dict, space: Space, data_root: str | None, cache_dir: str | None,
              decisions: str | None = None, grayscale: str = "left out"):
    # The study's rule for grayscale photos (study.json), whatever this node's environment says: a worker
    # that decided otherwise would score its trials on other images than the study's other trials.
    if grayscale == "kept":
        os.environ[ALLOW_GRAYSCALE_ENV] = "1"
    else:
        os.environ.pop(ALLOW_GRAYSCALE_ENV, None)
    cpus = max(int(tune.get_context().get_trial_resources().required_resources.get("CPU", 1)), 1)
    torch.set_num_threads(cpus)
    gpu_ids = ray.get_gpu_ids()
    dev = pick_device("cuda" if gpu_ids and torch.cuda.is_available() else "cpu")
    extra = {"node_id": ray.get_runtime_context().get_node_id(), "device": device_name(dev),
             "gpu_ids": ",".join(str(g) for g in gpu_ids), "started_at": time.time()}
    checkpoint = tune.get_checkpoint()
    resume = checkpoint.to_directory() if checkpoint is not None else None
    # Ray runs a trial in its own trial folder: temporary checkpoints go there, not to /tmp.
    common = dict(data_root=data_root, cache_dir=cache_dir, device=str(dev), resume_from=resume,
                  log=lambda s: print(s, flush=True), work_dir=Path.cwd())
    try:
        if "pack" in config:
            _train_pack(config, space, common, extra, decisions)
        else:
            cfg = space.resolve(config)

            def report(row: dict, folder: Path | None) -> None:
                ckpt = Checkpoint.from_directory(str(folder)) if folder is not None else None
                tune.report({**row, **_objectives(row), **extra}, checkpoint=ckpt)

            run_trial(cfg, report=report, splits=_splits_for(cfg, data_root, cache_dir), **common)
    except (ConfigError, NonFiniteLossError, torch.OutOfMemoryError) as e:
        # Retrying cannot fix these: end the trial with its reason (the study goes on).
        tune.report({ERROR_KEY: f"{type(e).__name__}: {e}", METRIC: float("nan"), "epoch": -1,
                     **{o: float("nan") for o in OBJECTIVES}, **extra})
    finally:
        if resume:  # Ray's local copy of the checkpoint we resumed from
            shutil.rmtree(resume, ignore_errors=True)


# This process's last decoded splits and what they were loaded for. A reused actor (reuse_actors)
# runs trial after trial in one process: the next trial on the same data skips load_splits (CIFAR-10
# from the warm disk cache: ~1.3 s of memory-mapping and grayscale filtering per trial). One entry,
# and only up to KEEP_SPLITS_MAX_BYTES of arrays held in memory (memory-mapped ones cost nothing):
# between trials an actor holds at most that beside what a fresh one would.
_last_splits: tuple[tuple, Splits] | None = None
KEEP_SPLITS_MAX_BYTES = 1 << 30


def _splits_for(cfg, data_root: str | None, cache_dir: str | None) -> Splits | None:
    """``cfg``'s splits as ``study.train.prepare_trial`` would load them, from this process's last ones
    when they match. None when loading fails: prepare_trial then loads them and raises in its own order."""
    global _last_splits
    dataset = cfg.dataset
    if os.sep in dataset or Path(dataset).is_dir():   # a folder: relative to the trial's working directory
        dataset = os.path.abspath(dataset)
    # Everything load_splits reads besides its arguments: the default roots and the grayscale switch.
    key = (dataset, cfg.image_size, str(Path(cache_dir).resolve()) if cache_dir else str(default_cache_dir()),
           data_root or default_data_root(), cfg.train_limit, cfg.eval_limit,
           os.environ.get(ALLOW_GRAYSCALE_ENV, ""))
    if _last_splits is not None and _last_splits[0] == key:
        return _last_splits[1]
    _last_splits = None   # the old arrays go before the new ones come
    try:
        splits = trial_splits(cfg, data_root, cache_dir)   # what prepare_trial would load
    except Exception:  # noqa: BLE001 - prepare_trial repeats the load and reports the error as it always did
        return None
    held = sum(0 if isinstance(splits[s], np.memmap) else splits[s].nbytes for s in ("train", "val", "test"))
    if held <= KEEP_SPLITS_MAX_BYTES:
        _last_splits = (key, splits)
    return splits


def _objectives(row: dict) -> dict:
    """This epoch's values of every objective a space may choose (the driver keeps the best epoch's)."""
    return {name: f(row) for name, f in OBJECTIVES.items()}


def _train_pack(config: dict, space: Space, common: dict, extra: dict, decisions: str | None) -> None:
    from study.pack import run_pack
    cfgs = [space.resolve(c) for c in config["pack"]]
    trial_id = tune.get_context().get_trial_id()
    actor = ray.get_actor(decisions) if decisions else None

    def report(rows: dict[int, dict], folder: Path | None) -> set[int]:
        epoch = next(iter(rows.values()))["epoch"]
        members = {str(k): {**r, "epochs": cfgs[k].epochs} for k, r in rows.items()}
        # Top-level values are for Tune's bookkeeping only; Optuna gets each member's own.
        result = {"epoch": epoch, METRIC: max(r["best_val_psnr"] for r in rows.values()),
                  **{o: max(_objectives(r)[o] for r in rows.values()) for o in OBJECTIVES},
                  MEMBERS_KEY: members, **extra}
        tune.report(result, checkpoint=Checkpoint.from_directory(str(folder)) if folder is not None else None)
        if actor is None:
            return set()
        # The driver reports every member to Optuna and publishes whom it pruned (see module docstring).
        stop = ray.get(actor.wait.remote(trial_id, epoch, 600.0))
        return set(stop or ())

    run_pack(cfgs, report=report, splits=_splits_for(cfgs[0], data_root=common["data_root"],
                                                     cache_dir=common["cache_dir"]), **common)


def _trial_label(config: dict) -> str:
    c = config["pack"][0] if "pack" in config else config
    parts = [str(c.get(k, "")) for k in ("dataset", "sampling", "output")]
    if "depth" in c:
        parts.append(f"d{c['depth']}")
    if "pack" in config:
        parts.append(f"pack{len(config['pack'])}")
    return "-".join(p for p in parts if p)


def trial_name(trial) -> str:
    """Tune's name (and folder name) for a trial: its id, dataset and variant, found at a glance."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{trial.trial_id}-{_trial_label(trial.config)}")


def make_trainable(space: Space, data_root, cache_dir, resources: dict, decisions: str | None,
                   grayscale: str = "left out"):
    """The Tune trainable: a named class, so the Ray dashboard and ``ps`` show ``ColorizeTrial``
    actors whose name (repr) is the trial's id, dataset and variant, not anonymous ImplicitFunc."""
    fn = tune.with_resources(tune.with_parameters(trainable, space=space, data_root=data_root,
                                                  cache_dir=cache_dir, decisions=decisions, grayscale=grayscale),
                             {"cpu": resources.get("cpu", 1), "gpu": resources.get("gpu", 0)})

    class ColorizeTrial(wrap_function(fn)):
        _name = "ColorizeTrial"

        def __repr__(self):
            # Ray shows an actor's repr in the dashboard's actor list and as its log prefix.
            return f"ColorizeTrial({self.trial_name})"

        def reset_config(self, new_config):
            # Tune reuses this actor for another trial (reuse_actors): Trainable.reset has already
            # taken the new trial's info, so repr(self) names the new trial.
            if not super().reset_config(new_config):
                return False
            _announce_actor_name(repr(self))
            # A fresh actor would start with an empty CUDA cache: give back what the last trial's
            # model and optimizer left cached, for the trials sharing this GPU (fractional GPUs).
            gc.collect()
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
            return True

    return ColorizeTrial


def _announce_actor_name(name: str) -> None:
    """Name this worker's log lines (Ray's log prefix, the dashboard's log viewer) after ``name`` from now on.

    Ray 2.60 prints ``:actor_name:<repr>`` once, when the actor is created, and its log monitor takes
    that line as the prefix of every later line of the worker's stdout/stderr; printing it again
    renames them. The marker is private to Ray (ray._private.ray_constants): without it the log lines
    keep the first trial's name, and the trial runs on. The dashboard's actor list keeps the repr
    it got at creation (the GCS stores it once; Ray 2.60 has no call that changes it).
    """
    try:
        from ray._private import ray_constants
        token = f"{ray_constants.LOG_PREFIX_ACTOR_NAME}{name}\n"
        for stream in (sys.stdout, sys.stderr):   # both, as Ray does: .out and .err files are read apart
            stream.write(token)
            stream.flush()
    except Exception as e:  # noqa: BLE001 - a name is cosmetic; never fail a trial for it
        log.debug("could not rename the actor's log prefix: %s", e)


# ------------------------------------------------------------------ running a study


def init_ray(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # "local": a Ray of our own, even when RAY_ADDRESS or a `ray start` cluster is around.
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                     log_to_driver=False)
    return ray.cluster_resources()


def storage_args(study_root: str) -> tuple[str, pafs.FileSystem, str]:
    """(storage_path, filesystem, name) for Ray from the study location (local folder or URI)."""
    fs, path = resolve(study_root)
    parent, name = path.rstrip("/").rsplit("/", 1)
    return parent, fs, name


def _experiment_path(study_root: str) -> tuple[str, pafs.FileSystem]:
    parent, fs, name = storage_args(study_root)
    return (str(Path(parent) / name) if isinstance(fs, pafs.LocalFileSystem) else f"{parent}/{name}"), fs


def build_tuner(*, study_root: str, space: Space, sampler, storage_url: str, optuna_study_name: str,
                num_samples: int, max_concurrent: int, resources: dict, data_root, cache_dir,
                resume: bool, pack: int = 1, cluster: bool = False, objectives: tuple[str, ...] = (),
                grayscale: str = "left out"):
    """A Tuner for the study at ``study_root`` (``num_samples`` counts models: packs of ``pack`` each).

    ``grayscale``: the study's rule for grayscale photos ("left out" or "kept", study.data.grayscale_rule),
    applied in every trial's worker.

    ``storage_url`` may hold a password: it is used in memory only; what Ray pickles
    holds none of it. On ``resume`` the study's location, the Optuna storage and the data
    are those given here, never the ones Ray pickled (a copied study resumes in its new place).
    ``objectives``: two or more names of ``OBJECTIVES`` make a multi-objective study (Optuna's
    multi-objective samplers, e.g. TPE or NSGA-II; no pruning: Optuna's pruners take one objective);
    empty: maximise METRIC with the space's pruner.
    """
    if pack < 1:
        raise ConfigError(f"pack={pack}: a pack holds at least one trial")
    parent, fs, name = storage_args(study_root)
    decisions = None
    if pack > 1:
        decisions = f"colorize-pack-decisions-{uuid.uuid4().hex[:12]}"
        actor = PackDecisions.options(name=decisions).remote()
    fn = make_trainable(space, data_root, cache_dir, resources, decisions, grayscale)
    if resume:
        path, fs = _experiment_path(study_root)
        _rebase_search_state(path, fs)
        tuner = tune.Tuner.restore(path, trainable=fn, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
        callbacks = [c for c in tuner._local_tuner.get_run_config().callbacks or []
                     if isinstance(c, ResultsCallback)]
        if not callbacks:
            raise RuntimeError(f"{path}: Ray's saved state has no results writer; it was not started by study.run")
        callback = callbacks[0]
        searcher = callback.searcher
        scheduler = tuner._local_tuner._tune_config.scheduler
    else:
        multi = len(objectives) > 1
        pruner = optuna.pruners.NopPruner() if multi else space.make_pruner()
        if multi and space.pruner.get("name", "none") != "none":
            print(f"note: pruning is off: the space has {len(objectives)} objectives ({', '.join(objectives)}) "
                  f"and Optuna's pruners take one")
        searcher = PruningOptunaSearch(space=space.define, metric=METRIC, mode="max", sampler=sampler,
                                       study_name=optuna_study_name, storage_url=storage_url,
                                       pruner=pruner, pack=pack, objectives=objectives)
        for params in space.enqueued():   # the space's configurations to try first (not again on resume)
            searcher._ot_study.enqueue_trial(params, skip_if_exists=True)
        callback = ResultsCallback(searcher, space)
        scheduler = OptunaPruningScheduler(searcher)
    if resume:
        searcher.bind_storage(storage_url)
    searcher.describe(space)
    callback.bind(study_root, data_root, cache_dir, cluster)
    if isinstance(scheduler, OptunaPruningScheduler) and decisions:
        scheduler.decisions = actor
    if resume:
        return tuner
    tune_trials = math.ceil(num_samples / pack)
    return tune.Tuner(
        fn,
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=max_concurrent),
                                    scheduler=scheduler, num_samples=tune_trials,
                                    # A reused actor saves a process, torch import and CUDA context per
                                    # trial, and its last decoded data (_splits_for); ColorizeTrial
                                    # renames its log prefix per trial.
                                    reuse_actors=True,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(
            name=name, storage_path=parent, storage_filesystem=fs, verbose=0, callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=space.max_failures),
            # Keep the best epoch (by val PSNR; colorize uses it) besides the latest (resume uses it).
            # A pack's members have their best epochs at different times: keep every checkpoint
            # (the pack writes one only when a member's best, its last epoch, or a resume point).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_psnr",
                                                    checkpoint_score_order="max") if pack == 1
            else tune.CheckpointConfig()),
    )


def _rebase_search_state(path: str, fs: pafs.FileSystem) -> None:
    """Point the trials Ray creates after a restore at the study's present location.

    Ray 2.60 moves restored trials to the folder given to ``Tuner.restore``, but new trials take
    their storage from the Experiment pickled in ``search_gen_state-*.json``: the folder the
    study was started in. A copied study would then write its new trials into the original.
    """
    import ray.cloudpickle as cloudpickle
    parent, name = path.rstrip("/").rsplit("/", 1)
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if not (info.base_name.startswith("search_gen_state-") and info.type == pafs.FileType.File):
            continue
        with fs.open_input_stream(info.path) as f:
            state = cloudpickle.loads(f.read())
        storage = getattr(state.get("experiment"), "storage", None)
        if storage is None or (storage.storage_fs_path == parent and storage.experiment_dir_name == name):
            continue
        storage.storage_filesystem, storage.storage_fs_path, storage.experiment_dir_name = fs, parent, name
        tmp = f"{parent}/{name}/.{info.base_name}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(cloudpickle.dumps(state))
        fs.move(tmp, info.path)


def can_resume(study_root: str) -> bool:
    path, fs = _experiment_path(study_root)
    return tune.Tuner.can_restore(path, storage_filesystem=fs)


def shutdown():
    if ray.is_initialized():
        ray.shutdown()
