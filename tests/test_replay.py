"""Search strategies replayed on recorded curves (analysis.replay, scripts/replay_search.py): a trial reports
exactly its recorded curve, compute is the recorded seconds of the epochs run, pruning saves compute, a
proposal maps to its nearest recorded configuration, and the replay's samplers are the study's."""
import json
import math
import subprocess

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PYTHON, ROOT, python_env

from analysis.replay import (STRATEGIES, Axis, OptunaFactories, OptunaJudge, Strategy, curves_from_frame, simulate,
                             table_curves)
from analysis.replay_figures import WITHIN_DB, compute_to_best, found_at, summary

AXES = (Axis("output", "choice", ("rgb", "uv")), Axis("lr", "loguniform", (1e-4, 1e-2)))
TABLE = ROOT / "docs" / "search" / "cifar10-curves.parquet"
BY_NAME = {s.name: s for s in STRATEGIES}


def _rows(n: int = 12, epochs: int = 4, seed: int = 0) -> pd.DataFrame:
    """Curves whose ranking never changes (a configuration's level shifts its whole curve), with seconds
    that differ by configuration and epoch."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        level, lr = rng.uniform(0, 4), float(f"{math.exp(rng.uniform(math.log(1e-4), math.log(1e-2))):.3g}")
        for e in range(1, epochs + 1):
            rows.append({"id": f"c{k:02d}", "epoch": e, "output": ("rgb", "uv")[k % 2], "lr": lr,
                         "val_psnr": 22 + level + 0.3 * e, "test_psnr": 22 + level + 0.3 * e - 0.05 * k,
                         "test_gray_psnr": 22.0, "seconds": 1.0 + k + 0.1 * e})
    return pd.DataFrame(rows)


def _curves(**kw):
    rows = _rows(**kw)
    return curves_from_frame(rows, "id", AXES, rows.groupby("id")["epoch"].max())


class Recording(OptunaFactories):
    """Optuna's factories, noting every (trial, epoch, value) reported."""

    def __init__(self):
        self.reports = []

    def judge(self, strategy, seed, epochs):
        reports = self.reports

        class Judge(OptunaJudge):
            def should_stop(self, trial, epoch, value):
                reports.append((trial.number, epoch, value))
                return super().should_stop(trial, epoch, value)
        return Judge()


@pytest.mark.parametrize("concurrency", [1, 3])
def test_each_trial_reports_exactly_its_configurations_recorded_curve(concurrency):
    curves, rows = _curves(), _rows()
    factories = Recording()
    run = simulate(curves, BY_NAME["random"], seed=1, trials=20, concurrency=concurrency, factories=factories)
    assert len(run.configs) == 20 and not any(run.pruned)
    by_trial: dict[int, list] = {}
    for number, epoch, value in factories.reports:
        by_trial.setdefault(number, []).append((epoch, value))
    for number, k in enumerate(run.configs):
        recorded = rows[rows["id"] == curves.ids[k]].sort_values("epoch")
        assert by_trial[number] == list(zip(recorded["epoch"], recorded["val_psnr"]))


def test_compute_is_the_recorded_seconds_of_the_epochs_run():
    curves, rows = _curves(), _rows()
    seconds = rows.groupby("id")["seconds"].sum()
    run = simulate(curves, BY_NAME["random"], seed=2, trials=15, concurrency=4)
    assert run.compute[-1] == pytest.approx(sum(seconds[curves.ids[k]] for k in run.configs))
    assert np.all(np.diff(run.compute) > 0) and np.all(np.diff(run.clock) >= 0)
    assert run.clock[-1] < run.compute[-1]   # four workers: the clock runs slower than the compute spent
    one = simulate(curves, BY_NAME["random"], seed=2, trials=15, concurrency=1)
    assert one.clock[-1] == pytest.approx(one.compute[-1])   # one worker: the clock is the compute


def test_pruning_stops_trials_early_and_saves_compute():
    curves = _curves(n=16, epochs=6)
    factories = Recording()
    pruned = simulate(curves, BY_NAME["tpe+median"], seed=0, trials=60, concurrency=2, factories=factories)
    full = simulate(curves, BY_NAME["tpe"], seed=0, trials=60, concurrency=2)
    assert sum(pruned.pruned) > 10 and not any(full.pruned)
    assert pruned.compute[-1] < 0.8 * full.compute[-1]
    ran: dict[int, int] = {}
    for number, epoch, _ in factories.reports:
        ran[number] = max(ran.get(number, 0), epoch)
    expected = sum(float(np.sum(curves.seconds[k, :ran[n]])) for n, k in enumerate(pruned.configs))
    assert pruned.compute[-1] == pytest.approx(expected)   # a pruned trial costs only the epochs it ran
    for n, k in enumerate(pruned.configs):
        assert pruned.pruned[n] == (ran[n] < curves.length[k])


def test_the_best_found_follows_val_psnr_and_reports_its_test_gain():
    curves = _curves()
    run = simulate(curves, BY_NAME["random"], seed=3, trials=40, concurrency=2)
    best = curves.best()
    assert best == int(np.argmax(np.nanmax(curves.val, axis=1)))
    assert np.all(np.diff(run.found_val) >= 0)
    if compute_to_best(run, curves, best) < math.inf:
        assert run.found[-1] == pytest.approx(curves.found(best))
    assert run.compute_to(curves.found(best) - WITHIN_DB) <= compute_to_best(run, curves, best)
    xs = np.array([0.0, run.compute[0], run.compute[-1], run.compute[-1] + 1])
    got = found_at(run, xs)
    assert math.isnan(got[0]) and got[1] == run.found[0] and got[2] == run.found[-1] and math.isnan(got[3])


@pytest.mark.parametrize("proposal,expected", [
    ({"output": "uv", "lr": 1e-3}, "exact"),              # a recorded configuration maps to itself
    ({"output": "rgb", "lr": 1e-3}, "rgb"),               # the closest lr among the same output's
    ({"output": "uv", "lr": 1e-4}, "uv low"),             # the lowest lr recorded for uv
])
def test_a_proposal_maps_to_its_nearest_recorded_configuration(proposal, expected):
    rows = pd.DataFrame([
        {"id": "a", "output": "uv", "lr": 1e-3}, {"id": "b", "output": "rgb", "lr": 1e-3 * 1.5},
        {"id": "c", "output": "rgb", "lr": 5e-3}, {"id": "d", "output": "uv", "lr": 2e-4},
        {"id": "e", "output": "uv", "lr": 1.01e-3},
    ]).assign(epoch=1, val_psnr=23.0, test_psnr=23.0, test_gray_psnr=22.0, seconds=1.0)
    curves = curves_from_frame(rows, "id", AXES, pd.Series(dtype=int))
    want = {"exact": "a", "rgb": "b", "uv low": "d"}[expected]
    assert curves.ids[curves.nearest(proposal)] == want
    # One categorical mismatch (1) outweighs any lr difference within the range (at most 1): equal lr, other
    # output, is farther than the same output at the other end of the range.
    far = curves_from_frame(rows.iloc[[1, 3]], "id", AXES, pd.Series(dtype=int))
    assert far.ids[far.nearest({"output": "uv", "lr": 1.5e-3})] == "d"


def test_the_replays_samplers_and_pruners_are_the_studys():
    from study.space.parse import make_pruner, make_sampler

    mine = OptunaFactories()
    for s in STRATEGIES:
        ours, theirs = mine.sampler(s.sampler, 0), make_sampler(s.sampler, 0)
        assert type(ours) is type(theirs)
        assert getattr(ours, "_constant_liar", None) == getattr(theirs, "_constant_liar", None)
        p, q = mine.pruner(s.pruner), make_pruner(s.pruner)
        assert type(p) is type(q)
        assert {k: v for k, v in vars(p).items() if "rng" not in k} == \
            {k: v for k, v in vars(q).items() if "rng" not in k} or type(p).__name__ == "HyperbandPruner"


def test_a_grid_replays_its_configurations_once_each():
    curves = _curves()
    grid = Strategy("grid", {"name": "random"}, {"name": "none"},
                    ({"output": "uv", "lr": 1e-3}, {"output": "rgb", "lr": 1e-3}))
    run = simulate(curves, grid, seed=0, trials=300, concurrency=8)
    assert run.configs == [curves.nearest(p) for p in grid.proposals]


def test_the_recorded_table_replays_row_for_row():
    if not TABLE.is_file():
        pytest.skip("no curves table")
    curves = table_curves(TABLE)
    rows = pd.read_parquet(TABLE)
    for k in range(0, len(curves), max(len(curves) // 8, 1)):
        mine = rows[rows["config_id"] == curves.ids[k]].sort_values("epoch")
        assert curves.val[k, :curves.length[k]].tolist() == mine["val_psnr"].tolist()
        assert curves.seconds[k, :curves.length[k]].tolist() == mine["seconds"].tolist()
        assert np.allclose(curves.test_gain[k, :curves.length[k]], mine["test_gain"])


def _tiny_table(path):
    rows = _rows(n=6, epochs=3).rename(columns={"id": "config_id"})
    for name in ("depth", "sampling", "batch_size", "base_filters", "loss", "schedule"):
        rows[name] = {"depth": 3, "sampling": "maxpool-upsample", "batch_size": 64, "base_filters": 16,
                      "loss": "mse", "schedule": "none"}[name]
    rows["epochs"] = 3
    space = {"output": ["rgb", "uv"], "lr": ["loguniform", 1e-4, 1e-2], "depth": [2, 3, 4],
             "sampling": ["maxpool-upsample", "strided-transposed"], "batch_size": [32, 64, 128],
             "base_filters": [8, 16], "loss": ["mse", "l1"], "schedule": ["none", "cosine"]}
    table = pa.Table.from_pandas(rows, preserve_index=False)
    pq.write_table(table.replace_schema_metadata({b"curves": json.dumps({"space": space}).encode()}), path)


def test_the_script_writes_its_summary_and_figure(tmp_path):
    _tiny_table(tmp_path / "t.parquet")
    p = subprocess.run([PYTHON, str(ROOT / "scripts" / "replay_search.py"), "--table", str(tmp_path / "t.parquet"),
                        "--trials", "12", "--seeds", "2", "--concurrency", "2", "--processes", "1",
                        "--only", "random", "tpe+median", "default", "report-grid",
                        "--figure", str(tmp_path / "r.png"), "--csv", str(tmp_path / "r.csv")],
                       capture_output=True, text=True, env=python_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    table = pd.read_csv(tmp_path / "r.csv")
    assert table["strategy"].tolist() == ["random", "tpe+median", "default", "report-grid"]
    assert table.loc[table["strategy"] == "report-grid", "trials"].item() == 4   # the CIFAR-10 half of the grid
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_the_script_refuses_bad_input_in_one_line(tmp_path):
    p = subprocess.run([PYTHON, str(ROOT / "scripts" / "replay_search.py"), "--table", str(tmp_path / "none.parquet")],
                       capture_output=True, text=True, env=python_env(), timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: --table")


def test_summary_counts_how_often_the_best_configuration_was_pruned():
    curves = _curves(n=16, epochs=6)
    runs = [simulate(curves, BY_NAME["tpe+sha"], seed=s, trials=40, concurrency=4) for s in range(3)]
    row = summary(runs, curves).iloc[0]
    best = curves.best()
    tried = sum(k == best for r in runs for k in r.configs)
    cut = sum(p for r in runs for k, p in zip(r.configs, r.pruned) if k == best)
    assert row["best config pruned (trials)"] == f"{cut}/{tried}"
    assert row["seeds"] == 3 and row["trials"] == 40
