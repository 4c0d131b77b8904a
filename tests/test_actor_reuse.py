"""What a reused Ray actor carries from one trial to the next (study.tune.trainable, reuse_actors=True):
its decoded data when the next trial wants the same, and a log name that follows the trial it runs;
and a trial it starts at once survives a driver crash. The log names in a whole study are checked by
tests/test_study.py::test_smoke_study_end_to_end."""
import numpy as np
import pytest

from study.config.trial import TrialConfig
from study.engine.data import load_splits
from study.tune import trainable as tune_trainable


@pytest.fixture()
def no_last_splits():
    tune_trainable._last_splits = None
    yield
    tune_trainable._last_splits = None


def test_same_data_is_loaded_once_per_process(tmp_path, cache_dir, no_last_splits, monkeypatch):
    cfg = TrialConfig(dataset="samples", resolution=32, train_limit=64, eval_limit=16)
    first = tune_trainable._splits_for(cfg, None, str(cache_dir))
    # What prepare_trial would have loaded itself.
    plain = load_splits("samples", 32, None, str(cache_dir), 64, 16)
    for split in ("train", "val", "test"):
        assert np.array_equal(first[split], plain[split])
    # A reused actor's next trial runs in another trial folder: same data, same arrays.
    monkeypatch.chdir(tmp_path)
    assert tune_trainable._splits_for(cfg.replace(lr=1e-2, depth=3), None, str(cache_dir)) is first
    # Other limits are other data; only the last is kept.
    other = tune_trainable._splits_for(cfg.replace(train_limit=32), None, str(cache_dir))
    assert other is not first and len(other.train) == 32
    assert tune_trainable._last_splits[1] is other
    assert tune_trainable._splits_for(cfg, None, str(cache_dir)) is not first


@pytest.mark.filterwarnings("ignore::study.engine.data.DataWarning")   # CIFAR-10's few grayscale photos
def test_large_data_in_memory_is_not_kept(shared_data, cache_dir, no_last_splits, monkeypatch):
    # CIFAR-10 without its grayscale photos is an in-memory copy, not the memory-mapped cache.
    cfg = TrialConfig(dataset="cifar10", train_limit=256, eval_limit=64)
    monkeypatch.setattr(tune_trainable, "KEEP_SPLITS_MAX_BYTES", 256 * 32 * 32 * 3)
    splits = tune_trainable._splits_for(cfg, str(shared_data), str(cache_dir))
    assert len(splits.train) <= 256 and tune_trainable._last_splits is None
    monkeypatch.setattr(tune_trainable, "KEEP_SPLITS_MAX_BYTES", 1 << 30)
    assert tune_trainable._splits_for(cfg, str(shared_data), str(cache_dir)) is tune_trainable._last_splits[1]


def test_data_that_cannot_load_is_left_to_the_trial(cache_dir, no_last_splits):
    # None: prepare_trial loads it again and raises its DataError as a trial always did.
    cfg = TrialConfig(dataset="no-such-dataset", resolution=32)
    assert tune_trainable._splits_for(cfg, None, str(cache_dir)) is None
    assert tune_trainable._last_splits is None


@pytest.mark.slow
def test_a_trial_started_on_a_reused_actor_survives_a_driver_crash(tmp_path, cache_dir):
    # A reused actor starts the next trial at once, long before Ray's periodic save (8 s here); the
    # driver saves each new trial as it comes, so a crash just after its start resumes it (not orphaned).
    # Packs: their checkpoints do not force a save as single trials' do (CheckpointConfig(num_to_keep=1)).
    from test_study import check_consistent, kill_driver_when, run_study, space_file

    env = {"TUNE_GLOBAL_CHECKPOINT_S": "8"}
    space = space_file(tmp_path, "reuse", num_samples=4, max_concurrent=1, pruner={"name": "none"},
                       params={"epochs": 6})
    study = tmp_path / "studies" / "reuse"

    def ready(trials) -> bool:   # one pack (two members) done, the next (on a reused actor) past epoch 1
        second = trials[(trials.status == "RUNNING") & (trials.epochs_run.fillna(0) >= 1)]
        return (trials.status == "DONE").sum() >= 2 and len(second) > 0

    before = kill_driver_when(tmp_path, cache_dir, space, study, ready, "--pack", "2", env=env, poll_s=0.2)
    running = before[before.status == "RUNNING"]
    assert len(running) == 2 and (before.status == "DONE").sum() == 2, before[["trial_id", "status"]]
    run_study(tmp_path, cache_dir, "--space", space, "--resume", env=env)
    after = check_consistent(study, 4)["trials"].set_index("trial_id")
    assert (after.status == "DONE").all(), after[["status", "error"]]
    assert (after.loc[running.trial_id, "restarts"] >= 1).all()
