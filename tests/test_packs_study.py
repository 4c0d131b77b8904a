"""Packs in a study (real Ray, Optuna SQLite, Parquet): Optuna sees one trial per member, each member
is reported every epoch and pruned on its own, results hold one row per member, and a dead worker or a
dead driver loses or duplicates no member's (trial, epoch) row."""
import pandas as pd
import pytest
import torch

from test_study import (check_consistent, kill_a_worker_mid_run, kill_driver_when, optuna_study, run_study, space_file,
                        tables)

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
    from study.colorize import load_model
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


def test_each_member_is_reported_and_pruned_on_its_own(tmp_path):
    import optuna
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from study import tune_backend as tb
    from study.space import load_space

    space = load_space("smoke")
    searcher = tb.PruningOptunaSearch(space=space.define, metric=tb.METRIC, mode="max", study_name="p",
                                      storage_url=f"sqlite:///{tmp_path / 'optuna.db'}", pack=3,
                                      pruner=optuna.pruners.ThresholdPruner(lower=10.0))
    config = searcher.suggest("t")
    assert len(config["pack"]) == 3
    firsts = config["pack"][0]
    for member in config["pack"][1:]:   # the structure is the first member's; the rest is sampled
        assert {k: member[k] for k in ("depth", "sampling", "output")} == \
            {k: firsts[k] for k in ("depth", "sampling", "output")}
    scheduler = tb.OptunaPruningScheduler(searcher)
    trial = Trial("ColorizeTrial", config=config, trial_id="t", stub=True)

    def flat(epoch, psnrs):  # as Tune hands results to schedulers: flattened
        out = {"epoch": epoch, tb.METRIC: max(psnrs.values())}
        for k, v in psnrs.items():
            out.update({f"members/{k}/val_psnr": v, f"members/{k}/best_val_psnr": v,
                        f"members/{k}/epochs": 3})
        return out

    # Member 1 falls below the threshold in epoch 1: only it is pruned; the pack goes on.
    assert scheduler.on_trial_result(None, trial, flat(1, {"0": 20.0, "1": 5.0, "2": 21.0})) == \
        TrialScheduler.CONTINUE
    assert searcher.finished == {"t_m1": ("PRUNED", 1)}
    scheduler.on_trial_result(None, trial, flat(2, {"0": 22.0, "2": 23.0}))
    scheduler.on_trial_result(None, trial, flat(3, {"0": 21.0, "2": 24.0}))   # both reach their epochs
    study = optuna.load_study(study_name="p", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    got = {t.user_attrs["pack_member"]: t for t in study.get_trials()}
    assert got[1].state.name == "PRUNED" and got[1].intermediate_values == {1: 5.0}
    assert got[0].state.name == "COMPLETE" and got[0].intermediate_values == {1: 20.0, 2: 22.0, 3: 21.0}
    assert got[0].value == 21.0 and got[2].value == 24.0   # the last report's best (METRIC) per member
    # A restored pack re-running epoch 1 stops member 1 again where it ended.
    scheduler.on_trial_result(None, trial, flat(1, {"0": 20.0, "1": 5.0, "2": 21.0}))
    assert searcher.finished["t_m1"] == ("PRUNED", 1)


def test_two_objectives_make_a_front_without_pruning(tmp_path):
    import optuna
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from study import tune_backend as tb
    from study.space import load_space

    space = load_space("smoke")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = tb.PruningOptunaSearch(space=space.define, metric=tb.METRIC, mode="max", study_name="mo",
                                      storage_url=url, pruner=optuna.pruners.NopPruner(),
                                      objectives=("val_psnr_gain", "val_colourfulness"))
    scheduler = tb.OptunaPruningScheduler(searcher)
    trial = Trial("ColorizeTrial", config=searcher.suggest("a"), trial_id="a", stub=True)
    rows = [(1, 20.0, 0.3, 1), (2, 23.0, 0.5, 2), (3, 22.0, 0.9, 2)]   # epoch, val PSNR, colour, best epoch
    for epoch, p, c, best in rows:
        row = {"epoch": epoch, "val_psnr": p, "val_gray_psnr": 21.0, "val_colourfulness": c,
               "best_epoch": best, tb.METRIC: max(r[1] for r in rows[:epoch])}
        assert scheduler.on_trial_result(None, trial, row) == TrialScheduler.CONTINUE
    searcher.on_trial_complete("a", row)
    ot = optuna.load_study(study_name="mo", storage=url)
    assert [d.name for d in ot.directions] == ["MAXIMIZE", "MAXIMIZE"]
    assert ot.metric_names == ["val_psnr_gain", "val_colourfulness"]
    (t,) = ot.get_trials()
    # Both objectives at the best epoch (2, by val PSNR): gain 23 - 21 dB, colourfulness 0.5.
    assert t.state.name == "COMPLETE" and t.values == [2.0, 0.5] and t.intermediate_values == {}
    with pytest.raises(tb.ConfigError, match="not known"):
        tb.PruningOptunaSearch(space=space.define, metric=tb.METRIC, mode="max", study_name="x",
                               storage_url=url, pruner=optuna.pruners.NopPruner(),
                               objectives=("val_psnr_gain", "sharpness"))
