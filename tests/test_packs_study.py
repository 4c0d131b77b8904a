"""Packs in a study (real Ray, Optuna SQLite, Parquet): Optuna sees one trial per member, each member
is reported every epoch and pruned on its own, results hold one row per member, and a dead worker or a
dead driver loses or duplicates no member's (trial, epoch) row."""
import pandas as pd
import pytest
import torch
from test_study import (
    check_consistent,
    kill_a_worker_mid_run,
    kill_driver_when,
    optuna_study,
    run_study,
    space_file,
    tables,
)

pytestmark = pytest.mark.slow


def check_packs(study, n_members: int, pack: int) -> pd.DataFrame:
    trials = check_consistent(study, n_members)["trials"]
    assert (trials.pack_size == pack).all()
    assert trials.groupby("pack_id").size().eq(pack).all()
    # Members of a pack share its structure and were sampled apart otherwise.
    for _, members in trials.groupby("pack_id"):
        for col in ("dataset", "depth", "sampling", "output", "base_filters", "batch_size"):
            assert members[col].nunique() == 1, (col, members[col].tolist())
        assert members.lr.nunique() == pack
        assert set(members.trial_id.str.rsplit("_m", n=1).str[1].astype(int)) == set(range(pack))
    return trials


def test_packed_study_survives_a_dead_worker(tmp_path, cache_dir):
    space = space_file(tmp_path, "packs", num_samples=6, max_concurrent=2,
                       params={"epochs": 5, "train_limit": 512})
    study = tmp_path / "studies" / "packs"
    killed, rc, out = kill_a_worker_mid_run(tmp_path, cache_dir, space, study, "--pack", "3")
    assert killed is not None, "no pack worker was found to kill"
    assert rc == 0, out[-3000:]
    trials = check_packs(study, 6, 3)
    restarted = trials[trials.restarts >= 1]
    assert set(restarted.pack_id) == {killed.pack_id} and len(restarted) == 3  # the pack restarted as one
    assert (restarted.resumed_at_epoch > 1).all()  # from its checkpoint, not from scratch
    # Each member was pruned (or not) on its own: Optuna holds one trial per member, in its own state.
    ot = {t.number: t for t in optuna_study(study).get_trials()}
    assert {ot[n].user_attrs["pack_member"] for n in trials.optuna_number} == {0, 1, 2}
    # A member's best checkpoint is a plain UNet, as colorize loads any trial's.
    from study.colorize_model import load_model
    best = trials.loc[trials.best_val_psnr.idxmax()]
    loaded = load_model(str(study), None, best.trial_id, torch.device("cpu"))
    assert loaded.epoch == best.best_epoch and loaded.cfg.lr == pytest.approx(best.lr)


# "1000": Ray saves its state only at the start, so the pack running at the kill is unknown to the
# restored driver and can never continue: its rows must end as ERROR (orphaned), not stay RUNNING.
@pytest.mark.parametrize("save_every_s", [pytest.param("2", marks=pytest.mark.e2e), "1000"])
def test_packed_study_killed_driver_resumes(tmp_path, cache_dir, save_every_s):
    space = space_file(tmp_path, "packres", num_samples=4, max_concurrent=1, params={"epochs": 4},
                       pruner={"name": "none"})
    study = tmp_path / "studies" / "packres"

    def ready(trials) -> bool:   # one pack finished, the other mid-way
        ran = trials[~trials.status.isin(["DONE", "PRUNED"])].epochs_run.dropna()
        return trials.status.isin(["DONE", "PRUNED"]).sum() >= 2 and len(ran) > 0 and int(ran.max()) >= 1

    before = kill_driver_when(tmp_path, cache_dir, space, study, ready, "--pack", "2",
                              env={"TUNE_GLOBAL_CHECKPOINT_S": save_every_s})
    assert (before.status == "RUNNING").any(), "killed too late to test resuming"
    run_study(tmp_path, cache_dir, "--space", space, "--resume", env={"TUNE_GLOBAL_CHECKPOINT_S": save_every_s})
    if save_every_s == "1000":
        trials = tables(study)["trials"].set_index("trial_id")
        assert not (trials.status == "RUNNING").any()
        orphans = trials[trials.status == "ERROR"]
        assert len(orphans) == 2 and orphans.error.str.startswith("orphaned").all()
        assert set(orphans.index) <= set(before[before.status == "RUNNING"].trial_id)
        assert (trials.status == "DONE").sum() == 4   # two whole packs still ran
        return
    trials = check_packs(study, 4, 2).set_index("trial_id")
    for row in before[before.status == "RUNNING"].itertuples():
        assert trials.loc[row.trial_id, "restarts"] >= 1


