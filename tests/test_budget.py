"""Time budgets, more trials for a finished study, and the study's own progress lines, through the real
command line with real Ray and Optuna: plan a study, give it a budget, watch it, extend it."""
import json
import re
import time

import optuna
import pandas as pd
import pytest
from test_study import check_consistent, run_study, space_file

from study.cli import UsageError
from study.driver.progress import StudyClock, progress_line
from study.durations import parse_duration
from study.results import read_table
from study.tune.searcher import STOPPED_ATTR

# What a budget's overrun is made of, besides the epoch a trial was in at the deadline (it stops at that
# epoch's end with its checkpoint; a trial that trained no epoch in this run stops at once): the step of
# Tune's loop the deadline fell in (a trial's start: its original previews decoded by the driver), then
# Tune's stop: its last state save, its wait of up to 5 s for the trials' actors to end
# (TuneController._cleanup_trials in Ray 2.60), and the driver's last writes. Seen on a loaded 2-core
# machine: 7-10 s with no epoch to wait for.
TUNE_STOP_S = 5 + 15


@pytest.mark.parametrize("text, seconds", [("90m", 5400), ("2h", 7200), ("1d", 86400), ("45s", 45),
                                           ("1h30m", 5400), ("3600", 3600), (120, 120), ("none", None)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "2 weeks", "0.0s", "400d", ""])
def test_bad_durations_say_what_to_write(text):
    with pytest.raises(UsageError, match="90m, 2h, 1d|more than 0"):
        parse_duration(text)


def test_the_clock_counts_running_time_only():
    # 100 s run before, a budget of 150 s granted at 40 s of running time: 90 s were used, 60 s are left.
    clock = StudyClock(spent_before_s=100, budget_s=150, granted_at_s=40, started=1000.0)
    assert clock.left(1000.0) == 90
    assert clock.left(1030.0) == 60 and clock.deadline == 1090.0 and clock.expired(1090.0)


@pytest.mark.parametrize("left, state, says", [
    (90.0, "running", "(1m30s left)"),
    (0.3, "running", "(1s left)"),                 # never "0s left" while time is left
    (0.0, "running", "budget spent at 12:00:00: stopping"),
    (-20.0, "running", "budget spent at 12:00:00: stopping"),
    (-3.0, "budget", "budget spent at 12:00:00"),
    (-3.0, "finished", "budget spent at 12:00:00"),
])
def test_the_progress_line_says_when_the_budget_is_spent(left, state, says):
    ends = time.mktime(time.strptime("2026-12-01 12:00:00", "%Y-%m-%d %H:%M:%S"))
    rec = {"counts": {"RUNNING": 1}, "total": 2, "best": None, "model_images_per_s": 0.0, "elapsed_s": 10.0,
           "projected_finish": None, "budget_ends": ends, "budget_left_s": left, "state": state}
    line = progress_line(rec)
    assert line.endswith(says) if state != "running" or left > 0 else says in line, line
    assert "(0s left)" not in line and ("stopping" in line) == (state == "running" and left <= 0), line


def status(study) -> dict:
    return json.loads((study / "status.json").read_text())


def epochs_run(study) -> pd.Series:
    """Epochs each trial has run so far, by trial id (empty while no trial has started)."""
    trials = read_table(str(study), "trials")
    return trials.set_index("trial_id").epochs_run.fillna(0) if trials is not None else pd.Series(dtype=float)


def longest_epoch(study) -> float:
    epochs = read_table(str(study), "epochs")
    return float(epochs.seconds.max()) if epochs is not None and len(epochs) else 0.0


@pytest.mark.slow
def test_a_budget_stops_at_epoch_ends_and_resumes_count_only_running_time(tmp_path, cache_dir, shared_data):
    study = tmp_path / "studies" / "budget"
    # Epochs enough that neither budget (25 s in all) can finish the trials on CPUs (an epoch takes 2-4 s). The
    # first budget lets trials that start within a few seconds train some epochs (a loaded machine may start
    # them later: they are then stopped before their first epoch, and start again on resume).
    epochs = 12
    space = space_file(tmp_path, "budget", num_samples=2, max_concurrent=2, pruner={"name": "none"},
                       params={"dataset": "cifar10", "epochs": epochs, "train_limit": 2048, "eval_limit": 256,
                               "base_filters": 8, "batch_size": 64, "depth": 2})
    common = ["--space", space, "--data-root", str(shared_data), "--num-cpus", "2"]
    t0 = time.monotonic()
    p = run_study(tmp_path, cache_dir, *common, "--time-budget", "20s")
    took = time.monotonic() - t0
    assert "time budget spent" in p.stdout and "--resume" in p.stdout, p.stdout[-3000:]
    assert "Failed to fetch metrics" not in p.stdout + p.stderr   # Ray's noise for a trial stopped before epoch 1
    trials = read_table(str(study), "trials")
    assert trials is None or (set(trials.status) == {"STOPPED"} and (trials.epochs_run.fillna(0) < epochs).all()), (
        trials)
    # Past the deadline a trial finishes the epoch it is in (one that trained none in this run stops at once),
    # then Tune stops: the overrun is at most the longest epoch and Tune's stop, however long trials take to
    # start on a loaded machine (a trial still starting at the deadline may not have made the trials table).
    first = status(study)
    assert first["state"] == "budget" and 20 <= first["elapsed_s"] <= 20 + longest_epoch(study) + TUNE_STOP_S, (
        first, longest_epoch(study))
    # Optuna was told nothing of the stopped trials: they are not scored as if they had finished.
    ot = optuna.load_study(study_name="budget", storage=f"sqlite:///{study / 'optuna.db'}").get_trials()
    assert ot and all(t.state.name == "RUNNING" for t in ot)
    print(f"\n20 s budget: the run took {took:.0f} s, {first['elapsed_s']:.1f} s of them the study's; epochs run: "
          f"{epochs_run(study).to_dict()} (epochs up to {longest_epoch(study):.1f} s)")

    # A plain --resume of a study whose budget is spent is refused with both ways on.
    p = run_study(tmp_path, cache_dir, *common, "--resume", check=False)
    assert p.returncode == 2 and "--time-budget 1h" in p.stderr and "--time-budget none" in p.stderr

    time.sleep(5)   # downtime: never counted
    run_study(tmp_path, cache_dir, *common, "--resume", "--time-budget", "5s")
    second = status(study)
    ran = second["elapsed_s"] - first["elapsed_s"]
    assert second["state"] == "budget" and 5 <= ran <= 5 + longest_epoch(study) + TUNE_STOP_S, (
        first, second, longest_epoch(study))
    before = epochs_run(study)
    print(f"5 s budget on resume: {ran:.1f} s of running time; epochs run: {before.to_dict()}")

    run_study(tmp_path, cache_dir, *common, "--resume", "--time-budget", "none")
    tables = check_consistent(study, 2)
    assert set(tables["trials"].status) == {"DONE"}
    ot = optuna.load_study(study_name="budget", storage=f"sqlite:///{study / 'optuna.db'}").get_trials()
    assert not [t.number for t in ot if t.user_attrs.get(STOPPED_ATTR)]   # finished: no longer marked stopped
    # Each stopped trial goes on from the checkpoint of the epoch it stopped at (one stopped before its first
    # epoch starts at epoch 1: it had nothing to lose).
    resumed = tables["trials"].set_index("trial_id").resumed_at_epoch
    assert (resumed[before.index] == before + 1).all(), (resumed.to_dict(), before.to_dict())
    assert status(study)["state"] == "finished"


@pytest.mark.slow
def test_a_finished_study_gets_more_trials_and_plain_progress_lines(tmp_path, cache_dir):
    study = tmp_path / "studies" / "more"
    space = space_file(tmp_path, "more", num_samples=2, max_concurrent=2, pruner={"name": "none"},
                       params={"epochs": 2})
    p = run_study(tmp_path, cache_dir, "--space", space, "--num-cpus", "2")
    lines = [line for line in p.stdout.splitlines() if "model-images/s" in line]
    assert lines and "\x1b" not in p.stdout and "\r" not in p.stdout
    last = lines[-1]
    for part in ("trials 2/2 ended: 2 done", "dB over gray", "elapsed", "projected finish"):
        assert part in last, last
    assert re.search(r"best [+-]\d+\.\d\d dB over gray \(\w+, samples ", last), last
    assert re.search(r"\| [\d,]+ model-images/s", last) and int(re.search(r"([\d,]+) model-images/s",
                                                                         last)[1].replace(",", "")) > 0
    assert "/tmp/ray/session" not in p.stdout and "View detailed results" not in p.stdout
    assert status(study)["counts"] == {"DONE": 2}

    p = run_study(tmp_path, cache_dir, "--space", space, "--resume", "--num-samples", "1", check=False)
    assert p.returncode == 2 and "already started 2 trials" in p.stderr
    # Tune's count of trials made as a kill can leave it: saved before the last trial was made, which ran and
    # is in the tables. The resume still makes only the trials the study needs.
    import ray.cloudpickle as cloudpickle
    for saved in study.glob("search_gen_state-*.json"):
        state = cloudpickle.loads(saved.read_bytes())
        saved.write_bytes(cloudpickle.dumps({**state, "counter": state["counter"] - 1, "finished": False}))
    run_study(tmp_path, cache_dir, "--space", space, "--resume", "--num-samples", "4")
    tables = check_consistent(study, 4)   # exactly the new total, no (trial, epoch) row lost or twice
    assert set(tables["trials"].status) == {"DONE"}
    assert json.loads((study / "study.json").read_text())["num_samples"] == 4


def _epoch(epoch: int, parked: bool = False) -> dict:
    from study.results import EPOCH_METRICS
    from study.tune.keys import METRIC, PARKED_KEY
    return {"epoch": epoch, **{k: 20.0 for k in EPOCH_METRICS}, METRIC: 20.0, "best_epoch": epoch,
            "seconds": 1.0, **({PARKED_KEY: True} if parked else {})}


# Each trial: its Tune status and what it did in this run: "started" (no epoch yet: a new trial, or a
# restored one whose checkpoint is saved), "trained" (an epoch, and it trains on), "parked" (stopped at an
# epoch's end past the deadline, its checkpoint registered), "pending" (not started).
@pytest.mark.parametrize("trials, expired, stops", [
    (["started"], True, True),
    (["trained"], True, False),
    (["parked"], True, True),
    (["parked", "trained"], True, False),
    (["parked", "started"], True, True),
    (["pending"], True, True),
    (["pending", "trained"], True, False),
    (["started", "pending", "parked"], True, True),
    ([], True, True),
    (["parked", "started"], False, False),
])
def test_a_spent_budget_stops_the_study_once_no_running_trial_would_lose_an_epoch(tmp_path, trials, expired,
                                                                                 stops):
    from ray.tune import Checkpoint
    from ray.tune.experiment import Trial

    from study.space.parse import load_space
    from study.tune.callback import ResultsCallback
    from study.tune.searcher import OptunaSearcher
    from study.tune.state import DriverState

    clock = StudyClock(budget_s=5.0)   # spent (if ``expired``) once the trials have been asked for
    d = DriverState(storage_url=f"sqlite:///{tmp_path / 'optuna.db'}", space=load_space("smoke"),
                    study_root=str(tmp_path / "study"), clock=clock)
    searcher = OptunaSearcher("b", d)
    callback = ResultsCallback(searcher, d)
    callback.setup()
    (tmp_path / "ckpt").mkdir()
    tune_trials = []
    for i, what in enumerate(trials):
        trial = Trial("ColorizeTrial", config=searcher.suggest(f"t{i}") or {}, trial_id=f"t{i}", stub=True)
        tune_trials.append(trial)
        if what == "pending":
            continue
        trial.set_status(Trial.RUNNING)
        callback.on_trial_start(0, tune_trials, trial)
        if what in ("trained", "parked"):
            trial.update_last_result(_epoch(1, parked=what == "parked"))   # as Tune records a result
            callback.on_trial_result(0, tune_trials, trial, trial.last_result)
            callback.on_checkpoint(0, tune_trials, trial, Checkpoint.from_directory(str(tmp_path / "ckpt")))
    if expired:
        clock.started -= 10.0
    callback.on_step_end(1, tune_trials)
    assert d.budget_stopped is stops
    staged = callback.writer.tables["trials"]
    statuses = set(staged.status) if staged is not None else set()
    assert (statuses <= {"STOPPED"}) if stops else ("STOPPED" not in statuses), staged
    if stops and staged is not None:   # the stopped trials end here: written at once
        assert set(pd.read_parquet(tmp_path / "study" / "results" / "trials.parquet").status) == {"STOPPED"}
    # Optuna is told why a stopped trial stays RUNNING (a dashboard shows it with no driver alive).
    db = optuna.load_study(study_name=searcher.study.study_name, storage=d.storage_url)   # as a dashboard does
    marked = {t.user_attrs["ray_trial_id"] for t in db.get_trials() if t.user_attrs.get(STOPPED_ATTR)}
    assert marked == ({t.trial_id for t in tune_trials if t.status == "RUNNING"} if stops else set())
