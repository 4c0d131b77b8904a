"""The study's searcher (study.tune.searcher): Optuna through its public API, pickles without secrets,
members of packs pruned on their own, fronts of two objectives; each given the driver state as build_tuner
gives it."""
import pickle
from pathlib import Path

import optuna
import pandas as pd
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from study.engine import STRUCTURE
from study.space.parse import load_space
from study.tune import searcher as ts
from study.tune.callback import ResultsCallback
from study.tune.pruning import OptunaPruningScheduler
from study.tune.state import DriverState


@pytest.fixture()
def driver(tmp_path):
    """A driver state as build_tuner makes one; returns a function (space, **changes) -> DriverState."""
    def make(space, **changes):
        return DriverState(storage_url=f"sqlite:///{tmp_path / 'optuna.db'}", space=space,
                           study_root=str(tmp_path / "study"), **changes)
    return make


def test_pickles_hold_no_database_and_resume_reconnects(tmp_path, driver):
    space = load_space("smoke")
    d = driver(space, data_root=str(tmp_path / "data-root"), cache_dir=str(tmp_path / "cache-dir"))
    url = d.storage_url
    searcher = ts.OptunaSearcher("s", d, seed=3)
    config = searcher.suggest("t1")
    assert searcher.optuna_number("t1") == 0 and "dataset" in config
    blob = pickle.dumps(searcher)
    # What Ray writes to tuner.pkl and searcher-state-*.pkl: no storage, sampler, engine, URL (a password),
    # space or driver state; the scheduler and the results callback (tuner.pkl) hold none either.
    searcher.save(str(tmp_path / "state.pkl"))
    others = [pickle.dumps(OptunaPruningScheduler(searcher, d)), pickle.dumps(ResultsCallback(searcher, d))]
    for data in (blob, (tmp_path / "state.pkl").read_bytes(), *others):
        for secret in (b"RDBStorage", b"sqlalchemy", b"optuna.db", b"Sampler", b"_thread", b"DriverState",
                       b"data-root", b"cache-dir", b"smoke.yaml"):
            assert secret not in data, secret
    again = pickle.loads(blob)
    assert again._study is None and again._storage is None
    with pytest.raises(RuntimeError, match="driver state"):   # unpickled: nothing until it is given one
        again.suggest("t2")
    # Rebuilt from the URL the driver holds: the same Optuna trial, still RUNNING, and it is told as usual.
    again.bind(d)
    again.restore(str(tmp_path / "state.pkl"))
    study = optuna.load_study(study_name="s", storage=url)
    (t,) = study.get_trials()
    assert t.state.name == "RUNNING" and t.user_attrs["ray_trial_id"] == "t1"
    assert {k: v for k, v in config.items() if k in t.params} == t.params
    again.on_trial_complete("t1", {"epoch": 2, ts.METRIC: 21.5})
    again.flush()   # the stored study is written behind the driver's per-result path
    assert study.get_trials()[0].state.name == "COMPLETE" and study.get_trials()[0].value == 21.5


def test_asked_after_the_last_save_is_failed_as_an_orphan_on_resume(tmp_path, driver):
    d = driver(load_space("smoke"))
    url = d.storage_url
    searcher = ts.OptunaSearcher("o", d)
    searcher.suggest("a")
    searcher.save(str(tmp_path / "state.pkl"))
    searcher.suggest("b")                      # the driver crashes before saving this one
    fresh = ts.OptunaSearcher("o", d)
    fresh.restore(str(tmp_path / "state.pkl"))
    # Levelled when the resumed searcher first uses the study (a large study is still being read before):
    # before its first ask, the orphan is failed.
    fresh.suggest("c")
    got = {t.user_attrs["ray_trial_id"]: t for t in optuna.load_study(study_name="o", storage=url).get_trials()}
    assert got["a"].state.name == "RUNNING" and got["c"].state.name == "RUNNING"
    assert got["b"].state.name == "FAIL" and "driver crash" in got["b"].user_attrs["orphaned"]


def test_known_to_the_searchers_state_but_not_to_tunes_is_failed_as_an_orphan(tmp_path, driver):
    """A kill between Tune's save of the searcher's state and of its own: the searcher knows a trial ("b")
    that Tune's restore does not add again and that never reached the tables. It is failed as an orphan;
    the trials Tune adds again stay."""
    d = driver(load_space("smoke"))
    searcher = ts.OptunaSearcher("o", d)
    searcher.suggest("a")
    searcher.suggest("b")
    searcher.save(str(tmp_path / "state.pkl"))
    fresh = ts.OptunaSearcher("o", d)
    fresh.restore(str(tmp_path / "state.pkl"))
    fresh.note_readded("a")   # what Tune's restore does for each trial of its saved state
    fresh.suggest("c")
    got = {t.user_attrs["ray_trial_id"]: t for t in optuna.load_study(study_name="o", storage=d.storage_url).get_trials()}
    assert got["a"].state.name == "RUNNING" and got["c"].state.name == "RUNNING"
    assert got["b"].state.name == "FAIL" and "driver crash" in got["b"].user_attrs["orphaned"]


def test_a_bad_config_stays_in_its_trial(tmp_path, driver):
    d = driver(load_space("smoke"))
    searcher = ts.OptunaSearcher("s", d)
    config = searcher.suggest("t1")
    callback = ResultsCallback(searcher, d)
    bad = Trial("ColorizeTrial", config={**config, "base_filters": 0}, stub=True)
    (cfg, error), = callback._configs(bad)
    assert cfg["base_filters"] == 0 and "base_filters" in error
    callback._stage_trial(bad, "ERROR")
    callback.writer.flush()
    row = pd.read_parquet(Path(tmp_path) / "study" / "results" / "trials.parquet")
    assert row.status.tolist() == ["ERROR"] and "base_filters" in row.error.iloc[0]


def test_each_member_is_reported_and_pruned_on_its_own(tmp_path, driver):
    space = load_space("smoke")
    space.pruner = {"name": "none"}
    d = driver(space, structure=STRUCTURE)
    url = d.storage_url
    searcher = ts.OptunaSearcher("p", d, pack=3)
    # A threshold pruner through the study's public attribute (the space offers median/halving/hyperband).
    searcher.study.pruner = optuna.pruners.ThresholdPruner(lower=10.0)
    config = searcher.suggest("t")
    assert len(config["pack"]) == 3
    firsts = config["pack"][0]
    for member in config["pack"][1:]:   # the structure is the first member's; the rest is sampled
        assert {k: member[k] for k in ("depth", "sampling", "output")} == \
            {k: firsts[k] for k in ("depth", "sampling", "output")}
    scheduler = OptunaPruningScheduler(searcher, d)
    trial = Trial("ColorizeTrial", config=config, trial_id="t", stub=True)

    def flat(epoch, psnrs):  # as Tune hands results to schedulers: flattened
        out = {"epoch": epoch, ts.METRIC: max(psnrs.values())}
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
    searcher.flush()
    study = optuna.load_study(study_name="p", storage=url)
    got = {t.user_attrs["pack_member"]: t for t in study.get_trials()}
    assert got[1].state.name == "PRUNED" and got[1].intermediate_values == {1: 5.0}
    assert got[0].state.name == "COMPLETE" and got[0].intermediate_values == {1: 20.0, 2: 22.0, 3: 21.0}
    assert got[0].value == 21.0 and got[2].value == 24.0   # the last report's best (METRIC) per member
    # A restored pack re-running epoch 1 stops member 1 again where it ended.
    scheduler.on_trial_result(None, trial, flat(1, {"0": 20.0, "1": 5.0, "2": 21.0}))
    assert searcher.finished["t_m1"] == ("PRUNED", 1)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_two_objectives_make_a_front_without_pruning(tmp_path, driver, sampler):
    space = load_space("smoke")
    space.pruner, space.sampler = {"name": "none"}, {"name": sampler}
    d = driver(space)
    url = d.storage_url
    searcher = ts.OptunaSearcher("mo", d, objectives=("val_psnr_gain", "val_colourfulness"))
    scheduler = OptunaPruningScheduler(searcher, d)
    trial = Trial("ColorizeTrial", config=searcher.suggest("a"), trial_id="a", stub=True)
    pickle.dumps(searcher)   # NSGA-II's sampler holds a lock in Optuna 5.1: it must never be pickled
    rows = [(1, 20.0, 0.3, 1), (2, 23.0, 0.5, 2), (3, 22.0, 0.9, 2)]   # epoch, val PSNR, colour, best epoch
    for epoch, p, c, best in rows:
        row = {"epoch": epoch, "val_psnr": p, "val_gray_psnr": 21.0, "val_colourfulness": c,
               "best_epoch": best, ts.METRIC: max(r[1] for r in rows[:epoch])}
        assert scheduler.on_trial_result(None, trial, row) == TrialScheduler.CONTINUE
    searcher.on_trial_complete("a", row)
    searcher.flush()
    ot = optuna.load_study(study_name="mo", storage=url)
    assert [d.name for d in ot.directions] == ["MAXIMIZE", "MAXIMIZE"]
    assert ot.metric_names == ["val_psnr_gain", "val_colourfulness"]
    (t,) = ot.get_trials()
    # Both objectives at the best epoch (2, by val PSNR): gain 23 - 21 dB, colourfulness 0.5.
    assert t.state.name == "COMPLETE" and t.values == [2.0, 0.5] and t.intermediate_values == {}
    with pytest.raises(ts.ConfigError, match="not known"):
        ts.OptunaSearcher("x", d, objectives=("val_psnr_gain", "sharpness"))


def test_resumed_sampler_goes_on_deterministically(tmp_path, driver):
    space = load_space("smoke")
    space.sampler = {"name": "random"}
    d = driver(space)
    first = ts.OptunaSearcher("d", d, seed=7)
    a = [first.suggest(f"t{i}") for i in range(2)]
    first.save(str(tmp_path / "state.pkl"))
    # Two drivers resuming the same saved study (the same database) draw the same next configuration.
    snapshot = (tmp_path / "optuna.db").read_bytes()
    draws = []
    for _ in range(2):
        (tmp_path / "optuna.db").write_bytes(snapshot)
        again = ts.OptunaSearcher("d", d, seed=7)
        again.restore(str(tmp_path / "state.pkl"))
        draws.append(again.suggest("t2"))
    assert draws[0] == draws[1] and draws[0] not in a


def test_a_resumed_tuner_runs_with_the_driver_state_of_the_run_that_resumes_it(tmp_path):
    # build_tuner as study.run calls it: a new study, then --resume from another data folder (Ray unpickles the
    # searcher, scheduler and callback from tuner.pkl; the resuming run hands them its own driver state).
    from dataclasses import replace

    from study.driver import StudyClock
    from study.tune import ray_internals
    from study.tune.backend import StudySettings, build_tuner

    root = tmp_path / "studies" / "r"
    root.mkdir(parents=True)
    settings = StudySettings(study_root=str(root), space=load_space("smoke"), seed=0,
                             storage_url=f"sqlite:///{root}/optuna.db", optuna_study_name="r", num_samples=2,
                             max_concurrent=1, resources={"cpu": 1}, data_root=str(tmp_path / "first-data"),
                             cache_dir=None, resume=False, clock=StudyClock())
    first = build_tuner(settings)
    saved = (root / "tuner.pkl").read_bytes()
    for secret in (b"optuna.db", b"first-data", b"DriverState", b"StudyClock"):
        assert secret not in saved, secret
    again = build_tuner(replace(settings, resume=True, data_root=str(tmp_path / "moved-data")))
    searcher, scheduler, callback = ray_internals.restored_parts(again.tuner)
    assert searcher is not first.results.searcher   # unpickled, not the first run's
    assert scheduler.searcher is searcher and callback.searcher is searcher and callback is again.results
    assert searcher.driver is scheduler.driver is callback.driver is again.driver
    assert callback.data_root == str(tmp_path / "moved-data") and again.driver.clock is settings.clock
