"""Time budgets, more trials for a finished study, and the study's own progress lines, through the real
command line with real Ray and Optuna (issue: plan a study, give it a budget, watch it, extend it)."""
import json
import re
import time

import optuna
import pandas as pd
import pytest
from test_study import check_consistent, run_study, space_file

from study.cli import UsageError
from study.driver.progress import StudyClock
from study.durations import parse_duration


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


def status(study) -> dict:
    return json.loads((study / "status.json").read_text())


@pytest.mark.slow
def test_a_budget_stops_at_epoch_ends_and_resumes_count_only_running_time(tmp_path, cache_dir, shared_data):
    study = tmp_path / "studies" / "budget"
    # Epochs enough that neither budget (15 s in all) can finish the trials on CPUs (an epoch takes 2-4 s).
    space = space_file(tmp_path, "budget", num_samples=2, max_concurrent=2, pruner={"name": "none"},
                       params={"dataset": "cifar10", "epochs": 8, "train_limit": 2048, "eval_limit": 256,
                               "base_filters": 8, "batch_size": 64, "depth": 2})
    common = ["--space", space, "--data-root", str(shared_data), "--num-cpus", "2"]
    t0 = time.monotonic()
    p = run_study(tmp_path, cache_dir, *common, "--time-budget", "10s")
    took = time.monotonic() - t0
    assert "time budget spent" in p.stdout and "--resume" in p.stdout, p.stdout[-3000:]
    assert "Failed to fetch metrics" not in p.stdout + p.stderr   # Ray's noise for a trial stopped before epoch 1
    trials = pd.read_parquet(study / "results" / "trials.parquet")
    stopped = trials[trials.status == "STOPPED"]
    assert len(stopped) >= 1 and (stopped.epochs_run < 8).all(), trials[["trial_id", "status", "epochs_run"]]
    # A trial stops at the first epoch end after the deadline: the overrun is at most two epochs, plus
    # a trial's time outside its epochs (its actor's start, decoding the data: long on a loaded machine).
    epochs = pd.read_parquet(study / "results" / "epochs.parquet")
    longest_epoch = epochs.seconds.max()
    outside = (trials.set_index("trial_id").wall_time_s - epochs.groupby("trial_id").seconds.sum()).max()
    slack = 2 * longest_epoch + max(outside, 0) + 20
    first = status(study)
    assert first["state"] == "budget" and 10 <= first["elapsed_s"] <= 10 + slack, (first, longest_epoch, outside)
    # Optuna was told nothing of the stopped trials: they are not scored as if they had finished.
    ot = {t.number: t for t in optuna.load_study(study_name="budget",
                                                 storage=f"sqlite:///{study / 'optuna.db'}").get_trials()}
    assert all(ot[n].state.name == "RUNNING" for n in stopped.optuna_number)
    print(f"\n10 s budget: the run took {took:.0f} s (epochs up to {longest_epoch:.1f} s, {outside:.1f} s outside "
          f"them, Ray start and stop)")

    # A plain --resume of a study whose budget is spent is refused with both ways on.
    p = run_study(tmp_path, cache_dir, *common, "--resume", check=False)
    assert p.returncode == 2 and "--time-budget 1h" in p.stderr and "--time-budget none" in p.stderr

    time.sleep(5)   # downtime: never counted
    run_study(tmp_path, cache_dir, *common, "--resume", "--time-budget", "5s")
    second = status(study)
    ran = second["elapsed_s"] - first["elapsed_s"]
    assert second["state"] == "budget" and 5 <= ran <= 5 + slack, (first, second, slack)

    p = run_study(tmp_path, cache_dir, *common, "--resume", "--time-budget", "none")
    tables = check_consistent(study, 2)
    assert set(tables["trials"].status) == {"DONE"}
    resumed = tables["trials"][tables["trials"].trial_id.isin(stopped.trial_id)]
    assert (resumed.resumed_at_epoch > 1).all()   # continued from the budget's checkpoint, not from scratch
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
    run_study(tmp_path, cache_dir, "--space", space, "--resume", "--num-samples", "4")
    tables = check_consistent(study, 4)   # exactly the new total, no (trial, epoch) row lost or twice
    assert set(tables["trials"].status) == {"DONE"}
    assert json.loads((study / "study.json").read_text())["num_samples"] == 4
