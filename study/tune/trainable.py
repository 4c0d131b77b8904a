"""The Tune trainable: one Tune trial = ``study.engine.trial.run_trial`` on the resolved config, or
``study.engine.trial.run_pack`` on K member configs; a reused actor (reuse_actors) keeps its last splits.

torch and the trial engine are imported when a trial trains: a synthetic trial (generated curves, a study
of the driver itself) starts in a worker that never imports them."""
from __future__ import annotations

import gc
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import ray
from ray import tune
from ray.tune import Checkpoint
from ray.tune.trainable import wrap_function

import study.tune.ray_internals as ray_internals
import study.tune.synthetic as synthetic
from study.config import ConfigError
from study.results import OBJECTIVES
from study.space import Space
from study.tune.keys import ERROR_KEY, MEMBERS_KEY, METRIC, PARKED_KEY
from study.tune.timings import REPORTED_AT

if TYPE_CHECKING:
    from study.engine import Splits

# How long a trial stopped by the time budget waits, its checkpoint saved, for the driver to end the study.
PARKED_WAIT_S = 900.0


def _budget(deadline: float | None):
    """(checkpoint_now, park) for a trial under a time budget ending at ``deadline`` (wall clock).

    checkpoint_now(): whether the epoch that just ended writes a checkpoint whatever else is due (the
    budget is spent); park(): wait for the driver, which ends the study once no running trial would lose
    an epoch (a trial that would go on training would only be cut off mid-epoch). A trial that has trained
    no epoch since it started is not waited for (study.tune.callback: its checkpoint is saved, or it has
    none to lose)."""
    if deadline is None:
        return None, lambda: None

    def checkpoint_now() -> bool:
        return time.time() >= deadline

    def park() -> None:
        time.sleep(PARKED_WAIT_S)   # the driver ends the study (and this actor) long before

    return checkpoint_now, park


def trainable(config: dict, space: Space, data_root: str | None, cache_dir: str | None,
              decisions: str | None = None, grayscale: str = "left out", deadline: float | None = None):
    extra = {"node_id": ray.get_runtime_context().get_node_id(), "device": "cpu",
             "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()), "started_at": time.time()}
    checkpoint = tune.get_checkpoint()
    resume = checkpoint.to_directory() if checkpoint is not None else None
    # Ray runs a trial in its own trial folder: temporary checkpoints go there, not to /tmp.
    checkpoint_now, park = _budget(deadline)
    common = dict(data_root=data_root, cache_dir=cache_dir, resume_from=resume,
                  log=lambda s: print(s, flush=True), work_dir=Path.cwd(), checkpoint_now=checkpoint_now)
    try:
        if space.synthetic:   # generated curves, no training: a study of the driver itself
            if "pack" in config:
                raise ConfigError("a synthetic space runs single trials: leave --pack out (or give --pack 1)")
            cfg = space.resolve(config)
            extra["train_images"] = 0
            synthetic.run_trial(cfg, report=_single_report(cfg, extra, checkpoint_now, park),
                                epoch_seconds=space.synthetic["epoch_seconds"], resume_from=resume,
                                work_dir=Path.cwd(), checkpoint_now=checkpoint_now, log=common["log"])
            return
        common["device"] = _placed(grayscale, extra)
        if "pack" in config:
            _train_pack(config, space, common, extra, decisions, park)
        else:
            from study.engine import run_trial
            cfg = space.resolve(config)
            splits = _splits_for(cfg, data_root, cache_dir)
            extra["train_images"] = len(splits.train) if splits is not None else 0
            run_trial(cfg, report=_single_report(cfg, extra, checkpoint_now, park), splits=splits, **common)
    except Exception as e:
        if not _retry_cannot_fix(e):
            raise
        # End the trial with its reason (the study goes on).
        tune.report({ERROR_KEY: f"{type(e).__name__}: {e}", METRIC: float("nan"), "epoch": -1,
                     **{o: float("nan") for o in OBJECTIVES}, **extra})
    finally:
        if resume:  # Ray's local copy of the checkpoint we resumed from
            shutil.rmtree(resume, ignore_errors=True)


def _placed(grayscale: str, extra: dict) -> str:
    """Set up this process for training (threads, device, the study's grayscale rule); the device's name
    goes into ``extra``, and its string is returned."""
    import torch

    from study.engine import ALLOW_GRAYSCALE_ENV, device_name, pick_device

    # The study's rule for grayscale photos (study.json), whatever this node's environment says: a worker
    # that decided otherwise would score its trials on other images than the study's other trials.
    if grayscale == "kept":
        os.environ[ALLOW_GRAYSCALE_ENV] = "1"
    else:
        os.environ.pop(ALLOW_GRAYSCALE_ENV, None)
    cpus = max(int(tune.get_context().get_trial_resources().required_resources.get("CPU", 1)), 1)
    torch.set_num_threads(cpus)
    dev = pick_device("cuda" if extra["gpu_ids"] and torch.cuda.is_available() else "cpu")
    extra["device"] = device_name(dev)
    return str(dev)


def _single_report(cfg, extra: dict, checkpoint_now, park):
    """The report of a single trial's epoch: its row, objectives and facts, and its checkpoint."""
    def report(row: dict, folder: Path | None) -> None:
        ckpt = Checkpoint.from_directory(str(folder)) if folder is not None else None
        parked = (ckpt is not None and checkpoint_now is not None and checkpoint_now()
                  and row["epoch"] < cfg.epochs)
        # REPORTED_AT: when the epoch left the trial (the driver measures its report-to-row latency).
        tune.report({**row, **_objectives(row), **extra, **({PARKED_KEY: True} if parked else {}),
                     REPORTED_AT: time.time()}, checkpoint=ckpt)
        if parked:
            park()
    return report


def _retry_cannot_fix(e: Exception) -> bool:
    """A bad configuration, and once training ran a non-finite loss or a GPU out of memory."""
    if isinstance(e, ConfigError):
        return True
    if "study.engine" not in sys.modules:
        return False   # nothing trained here: no training error
    import torch

    from study.engine import NonFiniteLossError
    return isinstance(e, (NonFiniteLossError, torch.OutOfMemoryError))


# This process's last decoded splits and what they were loaded for. A reused actor (reuse_actors)
# runs trial after trial in one process: the next trial on the same data skips load_splits (CIFAR-10
# from the warm disk cache: ~1.3 s of memory-mapping and grayscale filtering per trial). One entry,
# and only up to KEEP_SPLITS_MAX_BYTES of arrays held in memory (memory-mapped ones cost nothing):
# between trials an actor holds at most that beside what a fresh one would.
_last_splits: tuple[tuple, Splits] | None = None
KEEP_SPLITS_MAX_BYTES = 1 << 30


def _splits_for(cfg, data_root: str | None, cache_dir: str | None) -> Splits | None:
    """``cfg``'s splits as ``study.engine.trial.prepare_trial`` would load them, from this process's last ones
    when they match. None when loading fails: prepare_trial then loads them and raises in its own order."""
    import numpy as np

    from study.engine import ALLOW_GRAYSCALE_ENV, default_cache_dir, default_data_root, trial_splits

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


def _train_pack(config: dict, space: Space, common: dict, extra: dict, decisions: str | None, park) -> None:
    from study.engine import run_pack
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
        checkpoint_now = common.get("checkpoint_now")
        parked = (folder is not None and checkpoint_now is not None and checkpoint_now()
                  and any(epoch < cfgs[k].epochs and not r.get("error") for k, r in rows.items()))
        if parked:
            result[PARKED_KEY] = True
        tune.report(result, checkpoint=Checkpoint.from_directory(str(folder)) if folder is not None else None)
        if parked:
            park()
        if actor is None:
            return set()
        # The driver reports every member to Optuna and publishes whom it pruned (see module docstring).
        stop = ray.get(actor.wait.remote(trial_id, epoch, 600.0))
        return set(stop or ())

    splits = _splits_for(cfgs[0], data_root=common["data_root"], cache_dir=common["cache_dir"])
    extra["train_images"] = len(splits.train) if splits is not None else 0
    run_pack(cfgs, report=report, splits=splits, **common)


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
                   grayscale: str = "left out", deadline: float | None = None):
    """The Tune trainable: a named class, so the Ray dashboard and ``ps`` show ``ColorizeTrial``
    actors whose name (repr) is the trial's id, dataset and variant, not anonymous ImplicitFunc."""
    fn = tune.with_resources(tune.with_parameters(trainable, space=space, data_root=data_root,
                                                  cache_dir=cache_dir, decisions=decisions, grayscale=grayscale,
                                                  deadline=deadline),
                             {"cpu": resources.get("cpu", 1), "gpu": resources.get("gpu", 0)})

    class ColorizeTrial(wrap_function(fn)):
        _name = "ColorizeTrial"

        def __repr__(self):
            # Ray shows an actor's repr in the dashboard's actor list and as its log prefix.
            return f"ColorizeTrial({self.trial_name})"

        def restore(self, checkpoint_path):
            # The checkpoint Tune saved for this trial may be gone (see ray_internals.checkpoint_left): go on
            # from the newest one left, or from the first epoch, rather than fail the trial.
            left = ray_internals.checkpoint_left(checkpoint_path)
            if left is not None:
                super().restore(left)

        def reset_config(self, new_config):
            # Tune reuses this actor for another trial (reuse_actors): Trainable.reset has already
            # taken the new trial's info, so repr(self) names the new trial.
            if not super().reset_config(new_config):
                return False
            ray_internals.announce_actor_name(repr(self))
            # A fresh actor would start with an empty CUDA cache: give back what the last trial's
            # model and optimizer left cached, for the trials sharing this GPU (fractional GPUs).
            gc.collect()
            torch = sys.modules.get("torch")   # imported only by a trial that trained
            if torch is not None and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
            return True

    return ColorizeTrial
