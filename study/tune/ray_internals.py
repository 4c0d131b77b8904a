"""Every use of Ray's private internals, here and nowhere else (Ray is pinned; these names move).

Each function falls back to Ray's own behaviour when an internal is gone, and
``tests/test_ray_internals.py`` names each internal it relies on, so a Ray upgrade fails
loudly there and not in a user's study.

- ``save_state_after_this_step``: Tune has no public call to save the experiment state now.
- ``save_state_on_period``: nor to stop saving it after every trial checkpoint.
- ``upload_state_with``: nor to choose how the saved state is copied into the study folder.
- ``announce_actor_name``: Ray's log prefix marker for an actor's lines.
- ``rebase_search_state``: the storage pickled in Tune's ``search_gen_state-*.json``.
- ``saved_total_trials`` / ``set_total_trials``: the search's total, count and "finished" flag in that file.
- ``forget_ended_trials``: the trials in Tune's newest ``experiment_state-*.json``.
- ``saved_state_patterns`` / ``saved_files``: which of its saved files Tune's restore reads.
- ``restored_parts``: the searcher, scheduler and callbacks ``Tuner.restore`` unpickled.
- ``checkpoint_left``: the checkpoint Tune hands a restored trial (its ``_TrainingResult``), or the newest
  one of that trial still on storage.
- ``forget_missing_checkpoints``: the checkpoints a restored trial's checkpoint manager keeps.
- ``STARTUP_ENV``: Ray's system config for the Ray a study starts (no idle workers started for tasks).
"""
from __future__ import annotations

import json
import logging
import os
import sys

import pyarrow.fs as pafs

# Ray's own settings for the Ray a study starts, read from RAY_<name> variables (Ray 2.60's system config;
# no public option). A driver's first tasks would find idle Python workers Ray starts with it
# (prestart_worker_first_driver); a study runs actors only, which get processes of their own, so on a small
# machine those idle workers only take CPU from the driver while it starts (about 0.5 s of ray.init on 2
# cores, two processes fewer).
STARTUP_ENV = {"RAY_prestart_worker_first_driver": "0"}

log = logging.getLogger("study")

# A reused actor (reuse_actors) starts its next trial within a second of the last: each new trial is
# saved at once unless saves were asked to be rarer than this (then a trial started since the last save
# is orphaned by a crash, and the searcher fails it on resume).
SAVE_EACH_NEW_TRIAL_MAX_PERIOD_S = 10.0


def save_state_after_this_step(tune_controller) -> bool:
    """Have Tune save its experiment state at the end of this step of its loop, new trials included.

    So a driver crash right after a trial starts resumes that trial instead of orphaning it. The
    scheduler is handed a wrapper of the controller whose experiment-state manager takes a "force"
    flag at its next save (Ray 2.60's ``_tune_controller._checkpoint_manager._should_force_sync_up``).
    Returns whether the flag was set; without it Ray's save period alone decides.
    """
    period = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", "auto")
    try:
        if period != "auto" and float(period) > SAVE_EACH_NEW_TRIAL_MAX_PERIOD_S:
            return False
        manager = tune_controller._tune_controller._checkpoint_manager
        if hasattr(manager, "_should_force_sync_up"):
            manager._should_force_sync_up = True
            return True
    except (AttributeError, ValueError) as e:
        log.debug("cannot ask Tune to save the new trial at once: %s", e)
    return False


def save_state_on_period(tune_controller) -> bool:
    """Stop Tune from saving its experiment state after every trial checkpoint; returns whether it was on.

    Ray 2.60 saves the state (and, on an object store, uploads its whole driver-side folder, every trial's
    log files included) every ``CheckpointConfig.num_to_keep`` checkpoints of a trial, so that the state
    never names a checkpoint it has deleted. A single trial keeps one checkpoint and checkpoints every
    epoch: that was a save per result, about a fifth of the driver's time, and on an object store hundreds
    of requests per result, more as the study grows. A saved state that names a deleted checkpoint resumes
    that trial from its newest checkpoint left (``checkpoint_left``), so the study saves on Ray's period and
    at each new trial (``save_state_after_this_step``) instead. Ray 2.60's
    ``_tune_controller._checkpoint_manager._sync_every_n_trial_checkpoints``; without it, Ray's behaviour.
    """
    try:
        manager = tune_controller._tune_controller._checkpoint_manager
        if getattr(manager, "_sync_every_n_trial_checkpoints", None):
            manager._sync_every_n_trial_checkpoints = None
            return True
    except AttributeError as e:
        log.debug("cannot ask Tune to save on its period only: %s", e)
    return False


def upload_state_with(tune_controller, uploader) -> bool:
    """Have Tune copy its saved experiment state from its driver staging folder into the study folder with
    ``uploader`` (``study.tune.upload.ChangedFiles``; the first one given to a controller stays): at
    each copy Tune asks for, its ``prepare(local_path)`` runs in the driver's thread, right after Tune's save,
    and the ``send(fs, fs_path)`` it returns in Tune's background thread. Returns whether it does.

    Ray 2.60's ``_ExperimentCheckpointManager`` syncs through ``_storage.syncer`` (a ``_FilesystemSyncer``),
    whose ``_sync_up_command``, called just after the save, returns the function its background thread runs.
    The manager is given a copy of the storage and of the syncer, so that the trials' storage (a copy of the
    same storage, sharing its syncer, pickled to every trial's worker) keeps Ray's own. Without them, Ray's
    copy.
    """
    import copy
    try:
        manager = tune_controller._tune_controller._checkpoint_manager
        syncer = manager._storage.syncer
        original = syncer._sync_up_command
        fs = manager._storage.storage_filesystem
    except AttributeError as e:
        log.debug("cannot choose how Tune copies its state: %s", e)
        return False
    if getattr(original, "study_upload", False):
        return True

    def command(local_path: str, uri: str, exclude=None):
        if exclude or not os.path.isdir(local_path):
            return original(local_path=local_path, uri=uri, exclude=exclude)
        return uploader.prepare(local_path), {"fs": fs, "fs_path": uri}

    command.study_upload = True
    ours = copy.copy(syncer)
    ours._sync_up_command = command
    manager._storage = copy.copy(manager._storage)
    manager._storage.syncer = ours
    return True


def actor_name_marker() -> str | None:
    """Ray's marker that names an actor's log lines (``ray._private.ray_constants.LOG_PREFIX_ACTOR_NAME``)."""
    try:
        from ray._private import ray_constants
        return ray_constants.LOG_PREFIX_ACTOR_NAME
    except (ImportError, AttributeError):
        return None


def announce_actor_name(name: str) -> None:
    """Name this worker's log lines (Ray's log prefix, the dashboard's log viewer) after ``name`` from now on.

    Ray 2.60 prints the marker once, when the actor is created, and its log monitor takes that line as
    the prefix of every later line of the worker's stdout/stderr; printing it again renames them.
    Without the marker the log lines keep the first trial's name, and the trial runs on. The
    dashboard's actor list keeps the repr it got at creation (Ray 2.60 has no call that changes it).
    """
    marker = actor_name_marker()
    if marker is None:
        return
    try:
        for stream in (sys.stdout, sys.stderr):   # both, as Ray does: .out and .err files are read apart
            stream.write(f"{marker}{name}\n")
            stream.flush()
    except Exception as e:  # noqa: BLE001 - a name is cosmetic; never fail a trial for it
        log.debug("could not rename the actor's log prefix: %s", e)


def rebase_search_state(path: str, fs: pafs.FileSystem) -> int:
    """Point the trials Ray creates after a restore at the study's present location; returns files changed.

    Ray 2.60 moves restored trials to the folder given to ``Tuner.restore``, but new trials take
    their storage from the Experiment pickled in ``search_gen_state-*.json`` (its ``experiment.storage``
    with ``storage_filesystem``, ``storage_fs_path`` and ``experiment_dir_name``): the folder the study
    was started in. A copied study would then write its new trials into the original.
    """
    parent, name = path.rstrip("/").rsplit("/", 1)
    changed = 0
    for info, state in list(_search_gen_states(path, fs)):
        storage = getattr(state.get("experiment"), "storage", None)
        if storage is None or (storage.storage_fs_path == parent and storage.experiment_dir_name == name):
            continue
        storage.storage_filesystem, storage.storage_fs_path, storage.experiment_dir_name = fs, parent, name
        _write_state(fs, info, state)
        changed += 1
    return changed


def _search_gen_states(path: str, fs: pafs.FileSystem):
    """(file info, state) of Tune's ``search_gen_state-*.json`` files: cloudpickled dicts whose
    ``counter`` (trials created), ``total_samples`` and ``finished`` are the search's progress."""
    import ray.cloudpickle as cloudpickle
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if info.base_name.startswith("search_gen_state-") and info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                blob = f.read()
            try:
                yield info, cloudpickle.loads(blob)
            except Exception as e:  # noqa: BLE001 - an earlier run's file cut short (the newest is checked first)
                log.warning("%s cannot be read (%s: %s); Tune's restore reads only the newest", info.path,
                            type(e).__name__, e)


def _write_state(fs: pafs.FileSystem, info, state: dict) -> None:
    """Replace one ``search_gen_state-*.json`` atomically (a temporary beside it, then a move)."""
    import ray.cloudpickle as cloudpickle
    tmp = f"{info.path.rsplit('/', 1)[0]}/.{info.base_name}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(cloudpickle.dumps(state))
    fs.move(tmp, info.path)


def saved_total_trials(path: str, fs: pafs.FileSystem) -> tuple[int, int] | None:
    """(Tune trials created, Tune trials in all) as Tune saved them; None without a saved search."""
    newest = max(_search_gen_states(path, fs), key=lambda x: x[0].base_name, default=None)
    if newest is None:
        return None
    state = newest[1]
    return int(state.get("counter", 0)), int(state.get("total_samples", 0))


def set_total_trials(path: str, fs: pafs.FileSystem, total: int, created: int = 0) -> int:
    """Give a restored study ``total`` Tune trials in all, ``created`` or more of them made already: Tune
    restores its search's total, its count of trials made and its "finished" flag from
    ``search_gen_state-*.json`` and has no public call to change them. A finished study could never run
    more trials; and a count saved before the last trials it made (a kill before Tune's state reached
    the study folder, those trials already in the tables) would make Tune run that many more than the
    total. Returns the files changed."""
    changed = 0
    for info, state in list(_search_gen_states(path, fs)):
        counter = max(int(state.get("counter", 0)), created)
        if state.get("total_samples") == total and state.get("counter") == counter:
            continue
        state["total_samples"], state["counter"] = total, counter
        state["finished"] = counter >= total
        _write_state(fs, info, state)
        changed += 1
    return changed


def forget_ended_trials(path: str, fs: pafs.FileSystem, seen: set[str] | None = None) -> int:
    """Leave the trials that ended (TERMINATED) out of the experiment state Tune's restore reads; returns
    how many were left out.

    Tune's restore rebuilds every trial it ever ran from ``experiment_state-*.json`` (about 30 KB each: its
    last result and a running analysis of every metric in it), reads each one's result file twice, and
    writes them all again at every save: at 10,000 trials, a minute before the first new trial. An ended
    trial is never run again (the study resumes unfinished and errored trials only) and the study's
    results tables and Optuna study keep all of it, so the resumed Tune need not know it. Errored,
    running, pending and paused trials stay, and so does the first trial. ``seen`` is given every trial's id.
    Ray 2.60: the newest file by name (``TuneController.
    CKPT_FILE_TMPL``), a JSON object whose ``trial_data`` holds a [JSON state, JSON run metadata] pair
    per trial."""
    try:
        from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
    except ImportError:   # moved: Tune restores every trial, as it would anyway
        return 0
    newest = _find_newest_experiment_checkpoint(path, fs)
    if newest is None:
        return 0
    with fs.open_input_stream(newest) as f:
        state = json.loads(f.read())
    pairs = state.get("trial_data", [])
    if seen is not None:   # every trial's id, the ended ones too
        seen.update(json.loads(pair[0]).get("trial_id") for pair in pairs)
    # The first stays whatever its status: the restore takes the experiment's timestamp from it (and fails
    # on an empty list, then starting the study afresh).
    kept = pairs[:1] + [pair for pair in pairs[1:] if json.loads(pair[0]).get("status") != "TERMINATED"]
    if len(kept) == len(pairs):
        return 0
    state["trial_data"] = kept
    parent, name = newest.rsplit("/", 1)
    tmp = f"{parent}/.{name}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(state).encode())
    fs.move(tmp, newest)
    return len(pairs) - len(kept)


def saved_state_patterns() -> dict[str, str]:
    """{kind: file name pattern} of the three files Tune's restore reads from the study folder, the newest by
    name of each: Ray 2.60's ``TuneController``, ``SearchGenerator`` and ``Searcher`` ``CKPT_FILE_TMPL``.
    When the searcher's restore fails, Tune logs the error and starts the whole experiment afresh; when
    another's does, the restore stops with a traceback: so the driver reads them first."""
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.search import SearchGenerator, Searcher
    return {"experiment": TuneController.CKPT_FILE_TMPL.format("*"),
            "search": SearchGenerator.CKPT_FILE_TMPL.format("*"),
            "searcher": Searcher.CKPT_FILE_TMPL.format("*")}


def saved_files(path: str, fs: pafs.FileSystem, pattern: str) -> list[tuple[str, str]]:
    """(name, path) of the files matching ``pattern``, by name: Tune's restore reads the last."""
    import fnmatch
    return sorted((info.base_name, info.path) for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                  if info.type == pafs.FileType.File and fnmatch.fnmatch(info.base_name, pattern))


def restored_parts(tuner) -> list:
    """The searcher (unwrapped from its ConcurrencyLimiter), the scheduler and the callbacks that
    ``Tuner.restore`` unpickled from ``tuner.pkl``: the objects the resumed study runs with.

    Ray 2.60 takes no new ones on restore and keeps these in the Tuner's ``_local_tuner`` (a TunerInternal):
    ``_tune_config.search_alg``, ``_tune_config.scheduler`` and ``get_run_config().callbacks``. There is no
    fallback: without them a resumed study cannot be given its driver's state, so a Ray that moved them
    fails here, at once, with their names."""
    try:
        internal = tuner._local_tuner
        config = internal._tune_config
        search = config.search_alg
        callbacks = internal.get_run_config().callbacks or []
    except AttributeError as e:
        raise RuntimeError(f"this Ray ({_ray_version()}) keeps a restored Tuner's searcher, scheduler or "
                           f"callbacks elsewhere than Ray 2.60 ({e}): study.tune.ray_internals.restored_parts "
                           f"needs updating") from e
    return [getattr(search, "searcher", search), config.scheduler, *callbacks]


def _ray_version() -> str:
    import ray
    return ray.__version__


def checkpoint_left(checkpoint_result):
    """What a trial restored from ``checkpoint_result`` (what Tune hands ``Trainable.restore``) can go on from:
    it when its checkpoint is on storage; else the trial's newest checkpoint that is (a driver killed after
    Tune deleted a checkpoint it no longer keeps, before it saved its state again, leaves that state naming
    the deleted one); None when none is left (the trial starts again from its first epoch)."""
    try:
        from ray.train._internal.checkpoint_manager import _TrainingResult
        from ray.tune import Checkpoint
    except ImportError:   # moved: Tune's own behaviour (the restore fails, the trial errors)
        return checkpoint_result
    checkpoint = getattr(checkpoint_result, "checkpoint", None)
    if not isinstance(checkpoint_result, _TrainingResult) or checkpoint is None:
        return checkpoint_result
    fs, path = checkpoint.filesystem, checkpoint.path
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return checkpoint_result
    parent, name = path.rstrip("/").rsplit("/", 1)
    prefix = name.rstrip("0123456789")
    found = [f for f in fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
             if f.type == pafs.FileType.Directory and f.base_name.startswith(prefix)
             and f.base_name[len(prefix):].isdigit()]
    if not found:
        log.warning("%s is gone and the trial has no other checkpoint: it starts again", path)
        return None
    newest = max(found, key=lambda f: int(f.base_name[len(prefix):]))
    log.warning("%s is gone: the trial goes on from %s", path, newest.base_name)
    return _TrainingResult(checkpoint=Checkpoint(newest.path, fs), metrics={})


def forget_missing_checkpoints(trial) -> int:
    """Drop from a restored trial's checkpoint bookkeeping the checkpoints no longer on storage; how many.

    A saved state can name a checkpoint Tune deleted after that save (see ``checkpoint_left``). When the
    trial's next checkpoint pushes it out, Ray 2.60 deletes it again, which raises (``_delete_fs_path`` looks
    it up before its ``try``): Tune logs "Error handling checkpoint" with a traceback and skips marking the
    trial for its next save. Ray 2.60's ``trial.run_metadata.checkpoint_manager._checkpoint_results``;
    without it, Ray's behaviour. A new trial has none, so this costs a lookup per kept checkpoint of a
    restored trial only.
    """
    try:
        manager = trial.run_metadata.checkpoint_manager
        results = manager._checkpoint_results
    except AttributeError as e:
        log.debug("cannot look at a restored trial's checkpoints: %s", e)
        return 0
    kept = [r for r in results if r.checkpoint is None
            or r.checkpoint.filesystem.get_file_info(r.checkpoint.path).type != pafs.FileType.NotFound]
    if len(kept) < len(results):
        manager._checkpoint_results = kept
    return len(results) - len(kept)
