"""Every Ray call of the project lives here (Ray's API moves between releases; pinned 2.60).

- ``PruningOptunaSearch``: Ray Tune's OptunaSearch on an RDB-stored Optuna study,
  telling Optuna PRUNED for trials the pruner stopped (stock OptunaSearch runs a
  NopPruner and reports scheduler-stopped trials as COMPLETE).
- ``OptunaPruningScheduler``: a Tune scheduler that reports each epoch to the same
  Optuna trial and stops the Tune trial when the study's pruner says so.
- ``ResultsCallback``: the driver-side, single writer of the Parquet results.
- ``trainable``: one trial = ``study.train.run_trial`` on the resolved config.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

import optuna
import pyarrow.fs as pafs
import ray
import torch
from ray import tune
from ray.tune import Callback, Checkpoint
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from study.results import (ResultsWriter, epoch_row, preview_rows, resolve, trial_row)
from study.space import Space
from study.train import NonFiniteLossError, device_name, pick_device, run_trial

log = logging.getLogger("study")
# A checkpoint per epoch is the point (resume, pruning); Ray's warning about it is noise here.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
METRIC = "best_val_psnr"    # running best val PSNR (RGB, dB): what Optuna maximises and prunes on
ERROR_KEY = "trial_error"   # set in a trial's last report when it failed for a reason a retry cannot fix


# ------------------------------------------------------------------ Optuna side


class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch whose study has a real pruner, and which tells Optuna the truth about each trial."""

    def __init__(self, *args, pruner: optuna.pruners.BasePruner, **kwargs):
        self._pruner = pruner
        self.pruned: set[str] = set()
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode):
        super()._setup_study(mode)
        self._ot_study.pruner = self._pruner

    def optuna_number(self, trial_id: str) -> int:
        t = self._ot_trials.get(trial_id)
        return -1 if t is None else t.number

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        # Recorded in the study itself, so a resumed driver can tell its trials from orphans.
        self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return config

    def report_and_should_prune(self, trial_id: str, value: float, step: int) -> bool:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials or not math.isfinite(value):
            return False
        if step not in self._ot_study._storage.get_trial(ot_trial._trial_id).intermediate_values:
            ot_trial.report(value, step)
        if ot_trial.should_prune():
            self.pruned.add(trial_id)
            return True
        return False

    def on_trial_result(self, trial_id: str, result: dict):
        pass  # OptunaPruningScheduler reports each epoch (it runs before this hook)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        result = result or {}
        value = result.get(self.metric)
        if trial_id in self.pruned:
            state, value = optuna.trial.TrialState.PRUNED, None
        elif error or result.get(ERROR_KEY) or value is None or not math.isfinite(value):
            state, value = optuna.trial.TrialState.FAIL, None
        else:
            state = optuna.trial.TrialState.COMPLETE
        try:
            self._ot_study.tell(self._ot_trials[trial_id], value, state=state)
        except (ValueError, RuntimeError) as e:  # e.g. finished before a driver crash
            log.warning("optuna tell for %s: %s", trial_id, e)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        self._ot_study.pruner = self._pruner
        self.fail_orphans()

    def fail_orphans(self) -> int:
        """Optuna trials asked for after the driver's last saved state never ran as Tune trials: FAIL them."""
        known = {t.number for t in self._ot_trials.values()}
        n = 0
        for t in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.number not in known:
                self._ot_study._storage.set_trial_user_attr(t._trial_id, "orphaned",
                                                            "asked before a driver crash; never ran")
                self._ot_study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
                n += 1
        return n


class OptunaPruningScheduler(FIFOScheduler):
    """Asks the Optuna study's pruner, once per reported epoch, whether to stop a trial."""

    def __init__(self, searcher: PruningOptunaSearch):
        super().__init__()
        self.searcher = searcher

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if ERROR_KEY in result or METRIC not in result:
            return TrialScheduler.CONTINUE
        if self.searcher.report_and_should_prune(trial.trial_id, float(result[METRIC]), int(result["epoch"])):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


# ------------------------------------------------------------------ results


def _relative(path: str, root: str) -> str:
    return path[len(root):].lstrip("/") if path.startswith(root.rstrip("/") + "/") else path


# What the driver learns about a trial besides its config and epochs (trials-table columns), with defaults.
TRIAL_META = {"wall_time_s": float("nan"), "device": "", "node_id": "", "checkpoint_path": "", "gpu_ids": "",
              "started_at": float("nan"), "finished_at": float("nan"), "restarts": 0, "resumed_at_epoch": 0}


class ResultsCallback(Callback):
    """Writes trials/epochs/previews while the study runs (the driver is the only writer)."""

    def __init__(self, study: str, searcher: PruningOptunaSearch, space: Space, progress_every_s: float = 10.0):
        self.study, self.searcher, self.space = study, searcher, space
        self.progress_every_s = progress_every_s
        self._writer = None
        self._last_progress = 0.0
        self._meta: dict[str, dict] = {}

    def __getstate__(self):  # Tune pickles callbacks with its state; tables are re-read on setup
        d = self.__dict__.copy()
        d["_writer"] = None
        return d

    @property
    def writer(self) -> ResultsWriter:
        if self._writer is None:
            self._writer = ResultsWriter(self.study)
        return self._writer

    def setup(self, **info):
        self._writer = ResultsWriter(self.study)

    def _history(self, trial_id: str) -> list[dict]:
        df = self.writer.tables["epochs"]
        if df is None or df.empty:
            return []
        return df[df.trial_id == trial_id].sort_values("epoch").to_dict("records")

    def _config(self, trial) -> dict:
        cfg = self.space.resolve(trial.config)
        return {**cfg.to_dict(), "resolution": cfg.image_size}

    def _write_trial(self, trial, status: str, error: str | None = None):
        meta = {**TRIAL_META, **self._meta.setdefault(trial.trial_id, {})}
        common = {k: meta[k] for k in ("wall_time_s", "device", "node_id", "checkpoint_path")}
        self.writer.upsert("trials", [trial_row(
            trial.trial_id, self._config(trial), status, self._history(trial.trial_id), error=error,
            optuna_number=self.searcher.optuna_number(trial.trial_id), **common)
            | {k: meta[k] for k in TRIAL_META if k not in common}])

    def on_trial_start(self, iteration, trials, trial, **info):
        existing = self.writer.tables["trials"]
        if existing is not None and (existing.trial_id == trial.trial_id).any():
            # A restored driver, or a restarted trial: keep what is known, fill in the rest from the table.
            prev = existing[existing.trial_id == trial.trial_id].iloc[0]
            meta = self._meta.setdefault(trial.trial_id, {})
            for k in TRIAL_META:
                if k in prev and k not in meta:
                    meta[k] = prev[k]
        self._write_trial(trial, "RUNNING")

    def on_trial_recover(self, iteration, trials, trial, **info):
        # Its worker died; Ray restarts it from its last checkpoint (FailureConfig.max_failures).
        meta = self._meta.setdefault(trial.trial_id, {})
        meta["restarts"] = int(meta.get("restarts", 0)) + 1
        meta["awaiting_first_result"] = True

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if ERROR_KEY in result:
            return
        epoch = int(result["epoch"])
        meta = self._meta.setdefault(trial.trial_id, {})
        if meta.pop("awaiting_first_result", False):
            meta["resumed_at_epoch"] = epoch
        # A trial restored from an older checkpoint re-runs later epochs: forget them first.
        self.writer.drop_epochs_after(trial.trial_id, epoch - 1)
        self.writer.upsert("epochs", [epoch_row(trial.trial_id, result)])
        meta.update(
            device=result.get("device", ""), node_id=result.get("node_id", ""),
            gpu_ids=result.get("gpu_ids", ""), wall_time_s=float(result.get("time_total_s", float("nan"))),
            started_at=float(result.get("started_at", float("nan"))), finished_at=time.time())
        self._write_trial(trial, "RUNNING")
        self._progress(trials)

    def on_checkpoint(self, iteration, trials, trial, checkpoint: Checkpoint, **info):
        result = trial.last_result or {}
        if "epoch" not in result:
            return
        fs, path = checkpoint.filesystem, checkpoint.path
        files = {}
        for info_ in fs.get_file_info(pafs.FileSelector(path)):
            if info_.base_name.endswith(".png"):
                with fs.open_input_stream(info_.path) as f:
                    files[info_.base_name] = f.read()
        self.writer.add_previews(preview_rows(trial.trial_id, self._config(trial), result["epoch"], files))
        if result.get("best_epoch") == result["epoch"]:
            # Kept by Ray (scored by val PSNR); stored relative to the study folder so a copied study still works.
            self._meta.setdefault(trial.trial_id, {})["checkpoint_path"] = _relative(path, resolve(self.study)[1])
            self._write_trial(trial, "RUNNING")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if result.get(ERROR_KEY):
            self._write_trial(trial, "ERROR", result[ERROR_KEY])
        else:
            self._write_trial(trial, "PRUNED" if trial.trial_id in self.searcher.pruned else "DONE")
        self._progress(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write_trial(trial, "ERROR", _error_text(trial))
        self._progress(trials, force=True)

    def _progress(self, trials, force: bool = False):
        now = time.time()
        if not force and now - self._last_progress < self.progress_every_s:
            return
        self._last_progress = now
        df = self.writer.tables["trials"]
        counts = df.status.value_counts().to_dict() if df is not None else {}
        line = (f"[{time.strftime('%H:%M:%S')}] trials: {len(trials)} started, {counts.get('RUNNING', 0)} running, "
                f"{counts.get('DONE', 0)} done, {counts.get('PRUNED', 0)} pruned, {counts.get('ERROR', 0)} error")
        if df is not None and "best_val_psnr" in df and df.best_val_psnr.notna().any():
            b = df.loc[df.best_val_psnr.idxmax()]
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


def trainable(config: dict, space: Space, data_root: str | None, cache_dir: str | None):
    cfg = space.resolve(config)
    cpus = max(int(tune.get_context().get_trial_resources().required_resources.get("CPU", 1)), 1)
    torch.set_num_threads(cpus)
    gpu_ids = ray.get_gpu_ids()
    dev = pick_device("cuda" if gpu_ids and torch.cuda.is_available() else "cpu")
    extra = {"node_id": ray.get_runtime_context().get_node_id(), "device": device_name(dev),
             "gpu_ids": ",".join(str(g) for g in gpu_ids), "started_at": time.time()}
    checkpoint = tune.get_checkpoint()
    resume = None
    if checkpoint is not None:
        resume = checkpoint.to_directory()

    def report(row: dict, folder: Path) -> None:
        tune.report({**row, **extra}, checkpoint=Checkpoint.from_directory(str(folder)))

    try:
        run_trial(cfg, data_root=data_root, cache_dir=cache_dir, device=str(dev), report=report,
                  resume_from=resume, log=lambda s: print(s, flush=True))
    except (NonFiniteLossError, torch.OutOfMemoryError) as e:
        # Retrying cannot fix these: end the trial with its reason (the study goes on).
        tune.report({ERROR_KEY: f"{type(e).__name__}: {e}", METRIC: float("nan"), "epoch": -1, **extra})
    finally:
        if resume:  # Ray's local copy of the checkpoint we resumed from
            shutil.rmtree(resume, ignore_errors=True)


# ------------------------------------------------------------------ running a study


def init_ray(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
    return ray.cluster_resources()


def storage_args(study_root: str) -> tuple[str, pafs.FileSystem, str]:
    """(storage_path, filesystem, name) for Ray from the study location (local folder or URI)."""
    fs, path = resolve(study_root)
    parent, name = path.rstrip("/").rsplit("/", 1)
    return parent, fs, name


def build_tuner(*, study_root: str, space: Space, sampler, storage_url: str, optuna_study_name: str,
                num_samples: int, max_concurrent: int, resources: dict, data_root, cache_dir,
                resume: bool):
    parent, fs, name = storage_args(study_root)
    fn = tune.with_resources(tune.with_parameters(trainable, space=space, data_root=data_root,
                                                  cache_dir=cache_dir),
                             {"cpu": resources.get("cpu", 1), "gpu": resources.get("gpu", 0)})
    searcher = PruningOptunaSearch(space=space.define, metric=METRIC, mode="max", sampler=sampler,
                                   study_name=optuna_study_name,
                                   storage=optuna.storages.RDBStorage(storage_url),
                                   pruner=space.make_pruner())
    if resume:
        tuner = tune.Tuner.restore(f"{parent}/{name}" if not isinstance(fs, pafs.LocalFileSystem) else
                                   str(Path(parent) / name), trainable=fn, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=fs)
        return tuner
    callback = ResultsCallback(study_root, searcher, space)
    scheduler = OptunaPruningScheduler(searcher)
    return tune.Tuner(
        fn,
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=max_concurrent),
                                    scheduler=scheduler, num_samples=num_samples, reuse_actors=False),
        run_config=tune.RunConfig(
            name=name, storage_path=parent, storage_filesystem=fs, verbose=0, callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=space.max_failures),
            # Keep the best epoch (by val PSNR; colorize uses it) besides the latest (resume uses it).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_psnr",
                                                    checkpoint_score_order="max")),
    )


def can_resume(study_root: str) -> bool:
    parent, fs, name = storage_args(study_root)
    path = str(Path(parent) / name) if isinstance(fs, pafs.LocalFileSystem) else f"{parent}/{name}"
    return tune.Tuner.can_restore(path, storage_filesystem=fs)


def shutdown():
    if ray.is_initialized():
        ray.shutdown()
