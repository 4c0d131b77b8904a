"""Each of Ray's private internals the study relies on (study.tune.ray_internals), named, so that a Ray upgrade
that moves one fails here, not in a user's study."""
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray
from ray.tune.execution.tune_controller import TuneController

from study.tune import ray_internals


def test_log_prefix_marker_exists_and_renames(capfd):
    from ray._private import ray_constants  # the internal module
    assert ray_constants.LOG_PREFIX_ACTOR_NAME == ray_internals.actor_name_marker() == ":actor_name:"
    ray_internals.announce_actor_name("ColorizeTrial(abc-samples)")
    out, err = capfd.readouterr()
    # Ray's log monitor reads each of the worker's .out and .err files for this marker line.
    assert out == err == ":actor_name:ColorizeTrial(abc-samples)\n"


def test_experiment_state_manager_takes_a_force_flag():
    # Ray 2.60: TuneController._checkpoint_manager (an _ExperimentCheckpointManager) with _should_force_sync_up.
    import inspect

    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
    assert "_should_force_sync_up" in inspect.getsource(_ExperimentCheckpointManager)
    assert "_checkpoint_manager" in inspect.getsource(TuneController)

    class Manager:
        _should_force_sync_up = False

    class Controller:
        _checkpoint_manager = Manager()

    class Wrapper:   # what Tune hands a scheduler: a wrapper of the controller
        _tune_controller = Controller()

    w = Wrapper()
    assert ray_internals.save_state_after_this_step(w) is True
    assert w._tune_controller._checkpoint_manager._should_force_sync_up is True
    assert ray_internals.save_state_after_this_step(object()) is False   # gone: Ray's period decides


def test_experiment_state_manager_saves_every_n_trial_checkpoints_unless_told_not_to():
    # Ray 2.60: _ExperimentCheckpointManager(sync_every_n_trial_checkpoints=num_to_keep) forces a save from
    # on_trial_checkpoint; with the attribute None it never does.
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
    assert "sync_every_n_trial_checkpoints=self._trial_checkpoint_config.num_to_keep" in inspect_source(TuneController)

    class Storage:
        experiment_driver_staging_path = "/nowhere"

    manager = _ExperimentCheckpointManager(storage=Storage(), checkpoint_period="auto",
                                           sync_every_n_trial_checkpoints=1)
    manager.on_trial_checkpoint("trial")
    assert manager._should_force_sync_up is True   # Ray's own: a save after every checkpoint

    class Wrapper:   # what Tune hands a scheduler: a wrapper of the controller
        class _tune_controller:
            _checkpoint_manager = _ExperimentCheckpointManager(storage=Storage(), checkpoint_period="auto",
                                                               sync_every_n_trial_checkpoints=1)

    assert ray_internals.save_state_on_period(Wrapper()) is True
    told = Wrapper._tune_controller._checkpoint_manager
    told.on_trial_checkpoint("trial")
    assert told._should_force_sync_up is False and told._sync_every_n_trial_checkpoints is None
    assert ray_internals.save_state_on_period(Wrapper()) is False   # already on the period
    assert ray_internals.save_state_on_period(object()) is False    # gone: Ray's behaviour


def inspect_source(obj) -> str:
    import inspect
    return inspect.getsource(obj)


def test_rebase_search_state_moves_a_copied_studys_new_trials(tmp_path):
    import ray.cloudpickle as cloudpickle
    from ray.train._internal.storage import StorageContext

    old, new = tmp_path / "old" / "exp", tmp_path / "new" / "exp"
    new.mkdir(parents=True)
    storage = StorageContext(storage_path=str(old.parent), experiment_dir_name="exp")

    class Experiment:
        pass

    exp = Experiment()
    exp.storage = storage
    (new / "search_gen_state-2026.json").write_bytes(cloudpickle.dumps({"experiment": exp, "counter": 3}))
    fs = pafs.LocalFileSystem()
    assert ray_internals.rebase_search_state(str(new), fs) == 1
    state = cloudpickle.loads((new / "search_gen_state-2026.json").read_bytes())
    assert state["experiment"].storage.storage_fs_path == str(new.parent) and state["counter"] == 3
    assert ray_internals.rebase_search_state(str(new), fs) == 0   # already there
    assert ray.__version__ == "2.60.0"   # the version these internals were checked against


def test_saved_files_are_the_files_tunes_restore_takes(tmp_path):
    # Ray 2.60: each restore loads max(glob(CKPT_FILE_TMPL.format("*"))) of TuneController (its own
    # _find_newest_experiment_checkpoint), SearchGenerator and Searcher.
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
    from ray.tune.search import SearchGenerator, Searcher
    assert (TuneController.CKPT_FILE_TMPL, SearchGenerator.CKPT_FILE_TMPL, Searcher.CKPT_FILE_TMPL) == (
        "experiment_state-{}.json", "search_gen_state-{}.json", "searcher-state-{}.pkl")
    patterns = ray_internals.saved_state_patterns()
    assert sorted(patterns.values()) == ["experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl"]
    fs = pafs.LocalFileSystem()
    assert ray_internals.saved_files(str(tmp_path), fs, "searcher-state-*.pkl") == []
    assert ray_internals.saved_files(str(tmp_path / "gone"), fs, "searcher-state-*.pkl") == []
    for stamp in ("2026-12-03_11-00-00", "2026-12-03_10-00-00"):
        for pattern in patterns.values():
            (tmp_path / pattern.replace("*", stamp)).write_bytes(b"x")
    for pattern in patterns.values():
        found = ray_internals.saved_files(str(tmp_path), fs, pattern)
        assert [name for name, _ in found] == [pattern.replace("*", s) for s in ("2026-12-03_10-00-00",
                                                                                 "2026-12-03_11-00-00")]
        assert found[-1][1] == str(tmp_path / found[-1][0])
    newest = _find_newest_experiment_checkpoint(str(tmp_path), fs)
    assert newest == ray_internals.saved_files(str(tmp_path), fs, patterns["experiment"])[-1][1]


def test_a_restored_tuner_keeps_its_unpickled_parts_where_restored_parts_looks():
    # Ray 2.60: Tuner._local_tuner (a TunerInternal) with _tune_config.search_alg/.scheduler and get_run_config().
    import inspect

    from ray.tune import Tuner
    from ray.tune.impl.tuner_internal import TunerInternal
    assert "self._local_tuner" in inspect.getsource(Tuner)
    assert "self._tune_config" in inspect.getsource(TunerInternal) and hasattr(TunerInternal, "get_run_config")

    class Limiter:   # a ConcurrencyLimiter: the searcher is its public attribute
        searcher = "searcher"

    class Config:
        search_alg, scheduler = Limiter(), "scheduler"

    class RunConfig:
        callbacks = ["callback"]

    class Internal:
        _tune_config = Config()

        def get_run_config(self):
            return RunConfig()

    class Restored:
        _local_tuner = Internal()

    assert ray_internals.restored_parts(Restored()) == ["searcher", "scheduler", "callback"]
    with pytest.raises(RuntimeError, match="restored_parts needs updating"):
        ray_internals.restored_parts(object())


def test_a_restored_trial_goes_on_from_the_newest_checkpoint_left(tmp_path):
    """Tune hands Trainable.restore a _TrainingResult; when its checkpoint was deleted (a driver killed after
    Tune dropped a checkpoint it no longer keeps, before saving its state), the trial's newest checkpoint on
    storage stands in, and with none left the trial starts again (None)."""
    from ray.train._internal.checkpoint_manager import _TrainingResult
    from ray.tune import Checkpoint

    from study.tune.ray_internals import checkpoint_left

    fs = pafs.LocalFileSystem()
    trial = tmp_path / "trial"

    def result(name):
        return _TrainingResult(checkpoint=Checkpoint(str(trial / name), fs), metrics={"training_iteration": 3})

    for name in ("checkpoint_000001", "checkpoint_000010", "checkpoint_000002", "checkpoint_x", "other_000099"):
        (trial / name).mkdir(parents=True)
    (trial / "checkpoint_000011").write_text("a file, not a checkpoint")
    there = result("checkpoint_000002")
    assert checkpoint_left(there) is there   # on storage: as Tune gave it
    gone = checkpoint_left(result("checkpoint_000003"))
    assert gone.checkpoint.path == str(trial / "checkpoint_000010") and gone.metrics == {}
    assert checkpoint_left("a/path") == "a/path"   # not Tune's restore: left to Tune
    empty = tmp_path / "empty"
    empty.mkdir()
    assert checkpoint_left(_TrainingResult(checkpoint=Checkpoint(str(empty / "checkpoint_000004"), fs),
                                           metrics={})) is None


def test_a_restored_trial_forgets_the_checkpoints_no_longer_on_storage(tmp_path):
    """Ray 2.60 deletes a checkpoint its manager no longer keeps and raises when it is already gone (the saved
    state of a killed driver can name one it deleted since); the restored trial's manager forgets those."""
    from types import SimpleNamespace

    from ray.train import CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager, _TrainingResult
    from ray.tune import Checkpoint

    from study.tune.ray_internals import forget_missing_checkpoints

    fs = pafs.LocalFileSystem()

    def saved(i):
        (tmp_path / f"checkpoint_{i:06d}").mkdir()
        return _TrainingResult(checkpoint=Checkpoint(str(tmp_path / f"checkpoint_{i:06d}"), fs),
                               metrics={"val_psnr": float(i)})

    def manager_naming_a_deleted_checkpoint():
        manager = _CheckpointManager(CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_psnr",
                                                      checkpoint_score_order="max"))
        manager.register_checkpoint(saved(1))
        (tmp_path / "checkpoint_000001").rmdir()   # deleted after the state that names it was saved
        return manager

    with pytest.raises(FileNotFoundError):   # Ray's own behaviour, which the function works around
        manager_naming_a_deleted_checkpoint().register_checkpoint(saved(2))
    manager = manager_naming_a_deleted_checkpoint()
    trial = SimpleNamespace(run_metadata=SimpleNamespace(checkpoint_manager=manager))
    assert forget_missing_checkpoints(trial) == 1
    assert forget_missing_checkpoints(trial) == 0
    manager.register_checkpoint(saved(3))
    assert [r.checkpoint.path for r in manager.best_checkpoint_results] == [str(tmp_path / "checkpoint_000003")]
    assert forget_missing_checkpoints(trial) == 0   # one on storage stays
    assert len(manager.best_checkpoint_results) == 1
    assert forget_missing_checkpoints(SimpleNamespace()) == 0   # not Ray's trial: left as it is


def test_ended_trials_are_left_out_of_the_experiment_state_tunes_restore_reads(tmp_path):
    # Ray 2.60: the restore reads the newest experiment_state-*.json (by name) and its "trial_data" pairs.
    import json

    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
    assert TuneController.CKPT_FILE_TMPL == "experiment_state-{}.json"

    def pair(tid, status):
        return [json.dumps({"trial_id": tid, "status": status}), json.dumps({"last_result": {"epoch": 3}})]

    statuses = {"a": "TERMINATED", "b": "ERROR", "c": "RUNNING", "d": "TERMINATED", "e": "PENDING", "f": "PAUSED",
                "g": "TERMINATED"}
    state = {"trial_data": [pair(t, s) for t, s in statuses.items()], "runner_data": {"x": 1}, "stats": {"s": 2}}
    older = {"trial_data": [pair("a", "TERMINATED")], "runner_data": {}, "stats": {}}
    (tmp_path / "experiment_state-2026-12-07_10-00-00.json").write_text(json.dumps(older))
    newest = tmp_path / "experiment_state-2026-12-07_11-00-00.json"
    newest.write_text(json.dumps(state))
    fs = pafs.LocalFileSystem()
    assert _find_newest_experiment_checkpoint(str(tmp_path), fs) == str(newest)
    seen = set()
    assert ray_internals.forget_ended_trials(str(tmp_path), fs, seen) == 2
    assert seen == set(statuses)   # every trial's id, the ended ones too
    after = json.loads(newest.read_text())
    # The first stays, ended or not: Ray 2.60's restore takes the experiment's timestamp from it.
    assert [json.loads(p[0])["trial_id"] for p in after["trial_data"]] == ["a", "b", "c", "e", "f"]
    assert after["trial_data"][:2] == state["trial_data"][:2]   # the kept pairs unchanged
    assert (after["runner_data"], after["stats"]) == (state["runner_data"], state["stats"])
    assert json.loads((tmp_path / "experiment_state-2026-12-07_10-00-00.json").read_text()) == older
    assert ray_internals.forget_ended_trials(str(tmp_path), fs) == 0   # nothing left to forget
    assert ray_internals.forget_ended_trials(str(tmp_path / "none"), fs) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiment_state-2026-12-07_10-00-00.json",
                                                          newest.name]   # no temporary left


def test_a_ray_the_study_starts_has_no_idle_workers_waiting_for_tasks():
    """STARTUP_ENV reaches Ray: the Ray init_ray starts runs no prestarted idle worker (a study runs actors)."""
    import subprocess
    import sys

    code = ("import time, psutil\nfrom study.tune.raystart import init_ray, shutdown\ninit_ray(None, 2)\n"
            "time.sleep(3)\nmine = psutil.Process().children(recursive=True)\n"
            "print(sum('ray::IDLE' in ' '.join(p.cmdline()) for p in mine), len(mine))\nshutdown()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    idle, processes = map(int, out.stdout.split())
    assert processes >= 3 and idle == 0, out


def test_tunes_state_reaches_the_study_folder_through_the_studys_upload(tmp_path):
    # Ray 2.60: _ExperimentCheckpointManager._storage.syncer (a _FilesystemSyncer) and its _sync_up_command.
    import pickle

    from ray.train._internal.storage import StorageContext, _FilesystemSyncer
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    from study.tune.upload import ChangedFiles
    assert "_sync_up_command" in inspect_source(_FilesystemSyncer)
    class Staged(StorageContext):   # Ray's own staging folder is under its session's, with Ray started
        experiment_driver_staging_path = str(tmp_path / "staging")

    storage = Staged(storage_path=str(tmp_path / "studies"), experiment_dir_name="exp")
    manager = _ExperimentCheckpointManager(storage=storage, checkpoint_period="auto",
                                           sync_every_n_trial_checkpoints=None)

    class Wrapper:   # what Tune hands a scheduler: a wrapper of the controller
        class _tune_controller:
            _checkpoint_manager = manager

    uploads = [ChangedFiles(), ChangedFiles()]
    assert ray_internals.upload_state_with(Wrapper(), uploads[0]) is True
    assert ray_internals.upload_state_with(Wrapper(), uploads[1]) is True   # the first stays
    staged = Path(storage.experiment_driver_staging_path)

    def save():
        staged.mkdir(parents=True, exist_ok=True)
        (staged / "experiment_state-2026.json").write_text('{"n": 1}')
        (staged / "trial_1").mkdir(exist_ok=True)
        (staged / "trial_1" / "result.json").write_text("{}\n")

    manager.sync_up_experiment_state(save, force=True, wait=True)
    study = tmp_path / "studies" / "exp"
    assert (study / "experiment_state-2026.json").read_text() == '{"n": 1}'
    assert (study / "trial_1" / "result.json").read_text() == "{}\n"
    assert sorted(uploads[0]._sent) == ["experiment_state-2026.json", "trial_1/result.json"]   # what it sent
    # The trials' storage (the study's, copied into each trial and pickled to its worker) keeps Ray's syncer.
    assert storage.syncer._sync_up_command.__func__ is _FilesystemSyncer._sync_up_command
    assert b"ChangedFiles" not in pickle.dumps(storage.syncer)
    assert not uploads[1]._sent
    assert ray_internals.upload_state_with(object(), uploads[1]) is False   # gone: Ray's own copy


def test_a_restored_search_makes_only_the_trials_the_study_still_needs(tmp_path):
    # Ray 2.60: SearchGenerator restores "counter" (trials made), "total_samples" and "finished" from
    # search_gen_state-*.json, and makes total_samples - counter more trials.
    import ray.cloudpickle as cloudpickle
    import inspect

    from ray.tune.search import SearchGenerator
    source = inspect.getsource(SearchGenerator)
    assert all(f'"{key}": self._' in source for key in ("counter", "total_samples", "finished"))
    fs = pafs.LocalFileSystem()
    state = tmp_path / "search_gen_state-2026.json"
    state.write_bytes(cloudpickle.dumps({"counter": 3, "total_samples": 5, "finished": False, "experiment": None}))

    def saved():
        return {k: v for k, v in cloudpickle.loads(state.read_bytes()).items() if k != "experiment"}

    # Saved before the fourth trial was made, which the tables hold: Tune makes one more, not two.
    assert ray_internals.set_total_trials(str(tmp_path), fs, 5, created=4) == 1
    assert saved() == {"counter": 4, "total_samples": 5, "finished": False}
    assert ray_internals.set_total_trials(str(tmp_path), fs, 5, created=2) == 0   # never lowered
    assert ray_internals.set_total_trials(str(tmp_path), fs, 4) == 1
    assert saved() == {"counter": 4, "total_samples": 4, "finished": True}
    assert ray_internals.saved_total_trials(str(tmp_path), fs) == (4, 4)
