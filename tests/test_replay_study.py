"""A space's ``synthetic: {replay: <table>}``: trials report the recorded rows of their nearest recorded
configuration (study.space.replay, study.tune.synthetic), by the same rule as analysis.replay's proposals;
and through the real driver (python -m study.run), the study's epochs table is those recorded rows."""
import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT
from test_study import run_study, tables

from analysis.replay import table_curves
from study.config import TrialConfig
from study.engine import NonFiniteLossError
from study.results.contract import EPOCH_METRICS
from study.space.parse import parse_space
from study.space.reading import SpaceError
from study.space.replay import nearest_rows, read_curves
from study.tune.synthetic import CHECKPOINT_FILE, run_trial, synthetic_rows

TABLE = ROOT / "docs" / "search" / "cifar10-curves.parquet"
SPACE = {"output": ["rgb", "uv"], "sampling": ["maxpool-upsample", "strided-transposed"],
         "lr": ["loguniform", 1e-4, 1e-2]}
FIXED = {"dataset": "samples", "depth": 2, "base_filters": 8, "batch_size": 16, "train_limit": 16, "eval_limit": 8,
         "preview_count": 0, "seed": 0, "epochs": 3}
CONFIGS = [("uv", "maxpool-upsample", 1e-3), ("rgb", "maxpool-upsample", 3e-3), ("uv", "strided-transposed", 2e-4),
           ("rgb", "strided-transposed", 5e-4)]


def tiny_table(path, fail_last: bool = False):
    """Four recorded configurations x 3 epochs, figures that differ by configuration and epoch."""
    rows = []
    for k, (output, sampling, lr) in enumerate(CONFIGS):
        for e in range(1, 4):
            figures = {m: 0.1 * k + 0.01 * e + i for i, m in enumerate(EPOCH_METRICS)}
            figures.update(val_psnr=22 + k + 0.2 * e, test_psnr=21.9 + k + 0.2 * e, val_gray_psnr=22.0,
                           test_gray_psnr=22.0)
            error = "training loss became nan" if fail_last and k == 3 and e == 3 else None
            if error:
                figures = {m: math.nan for m in figures}
            rows.append({"config_id": f"id{k}", "draw": k, **FIXED, "output": output, "sampling": sampling, "lr": lr,
                         "epoch": e, **figures, "seconds": 10.0 * (k + 1) + e, "error": error})
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.replace_schema_metadata({b"curves": json.dumps({"space": SPACE}).encode()}), path)
    return pd.DataFrame(rows)


def space_raw(table) -> dict:
    return {"sampler": {"name": "random"}, "pruner": {"name": "none"}, "num_samples": 6, "max_concurrent": 2,
            "resources": {"cpu": 1, "gpu": 0}, "max_failures": 0, "synthetic": {"replay": str(table)},
            "params": {**FIXED, "output": {"choice": ["rgb", "uv"]},
                       "sampling": {"choice": ["maxpool-upsample", "strided-transposed"]},
                       "lr": {"loguniform": [1e-4, 1e-2]}}}


@pytest.mark.parametrize("value,match", [
    (None, None), ("missing.parquet", "no such file"), ("notes.txt", r"a curves table \(\.parquet\)"),
    ("plain.parquet", "is not a curves table"), (3, "the path of a curves table"),
])
def test_the_replay_key_names_a_curves_table(tmp_path, monkeypatch, value, match):
    monkeypatch.chdir(tmp_path)
    tiny_table(tmp_path / "t.parquet")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "plain.parquet")
    raw = space_raw("t.parquet" if value is None else value)
    if match is None:   # a relative path, from the current folder, stored absolute
        space = parse_space(raw, tmp_path / "s.yaml")
        assert space.synthetic == {"epoch_seconds": 0.0, "replay": str(tmp_path / "t.parquet")}
        return
    with pytest.raises(SpaceError, match=f"synthetic.replay: .*{match}"):
        parse_space(raw, tmp_path / "s.yaml")


@pytest.mark.parametrize("synthetic", [{"replay": "t.parquet", "epoch_seconds": -1}, {"replay": "t.parquet", "x": 1}, {}])
def test_a_bad_synthetic_mapping_is_refused(tmp_path, monkeypatch, synthetic):
    monkeypatch.chdir(tmp_path)
    tiny_table(tmp_path / "t.parquet")
    raw = {**space_raw("t.parquet"), "synthetic": synthetic}
    with pytest.raises(SpaceError, match="synthetic"):
        parse_space(raw, tmp_path / "s.yaml")


@pytest.mark.parametrize("values,expected", [
    ({"output": "uv", "sampling": "maxpool-upsample", "lr": 1e-3}, "id0"),      # a recorded configuration
    ({"output": "rgb", "sampling": "maxpool-upsample", "lr": 1e-4}, "id1"),     # one categorical off beats lr
    ({"output": "uv", "sampling": "strided-transposed", "lr": 1e-2}, "id2"),
    ({"output": "rgb", "sampling": "strided-transposed", "lr": 6e-4}, "id3"),
])
def test_a_trial_replays_the_recorded_rows_of_its_nearest_configuration(tmp_path, values, expected):
    rows = tiny_table(tmp_path / "t.parquet")
    cfg = TrialConfig(**{**FIXED, **values})
    got = synthetic_rows(cfg, replay=tmp_path / "t.parquet")
    mine = rows[rows["config_id"] == expected]
    assert [r["epoch"] for r in got] == [1, 2, 3]
    for r, (_, want) in zip(got, mine.iterrows()):
        assert {m: r[m] for m in (*EPOCH_METRICS, "seconds")} == {m: want[m] for m in (*EPOCH_METRICS, "seconds")}
    assert got[-1]["best_epoch"] == 3 and got[-1]["best_val_psnr"] == mine["val_psnr"].max()


def test_a_replayed_trial_resumes_after_its_checkpoint_with_the_same_rows(tmp_path):
    tiny_table(tmp_path / "t.parquet")
    cfg = TrialConfig(**{**FIXED, "output": "rgb", "sampling": "maxpool-upsample", "lr": 3e-3})
    whole = run_trial(cfg, report=lambda row, folder: None, epoch_seconds=0, work_dir=tmp_path, log=lambda s: None,
                      replay=tmp_path / "t.parquet")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / CHECKPOINT_FILE).write_text(json.dumps({"epoch": 1}))
    rest = []
    run_trial(cfg, report=lambda row, folder: rest.append(row), epoch_seconds=0, work_dir=tmp_path,
              resume_from=tmp_path / "saved", log=lambda s: None, replay=tmp_path / "t.parquet")
    assert rest == whole[1:]


def test_a_recorded_failure_ends_the_replayed_trial_as_the_engine_would(tmp_path):
    tiny_table(tmp_path / "t.parquet", fail_last=True)
    cfg = TrialConfig(**{**FIXED, "output": "rgb", "sampling": "strided-transposed", "lr": 5e-4})
    reported = []
    with pytest.raises(NonFiniteLossError, match="training loss became nan"):
        run_trial(cfg, report=lambda row, folder: reported.append(row), epoch_seconds=0, work_dir=tmp_path,
                  log=lambda s: None, replay=tmp_path / "t.parquet")
    assert [r["epoch"] for r in reported] == [1, 2]


def test_the_study_and_the_analysis_replay_map_proposals_alike():
    """study.space.replay (a study's trial) and analysis.replay (a sampler's proposal) hold one rule."""
    if not TABLE.is_file():
        pytest.skip("no curves table")
    rows, space = read_curves(TABLE)
    curves = table_curves(TABLE)
    rng = np.random.default_rng(0)
    for _ in range(60):
        values = {a.name: (a.values[int(rng.integers(len(a.values)))] if a.kind == "choice" else
                           float(np.exp(rng.uniform(*np.log(a.values))))) for a in curves.axes}
        assert nearest_rows(rows, space, values)["config_id"].iloc[0] == curves.ids[curves.nearest(values)]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="study/tune/trainable.py must pass replay=space.synthetic.get('replay') "
                                       "to synthetic.run_trial")
def test_a_replay_study_through_the_real_driver_reports_the_recorded_rows(tmp_path, cache_dir):
    rows = tiny_table(tmp_path / "t.parquet")
    (tmp_path / "replay.yaml").write_text(yaml.safe_dump(space_raw(tmp_path / "t.parquet")))
    run_study(tmp_path, cache_dir, "--space", str(tmp_path / "replay.yaml"), "--num-cpus", "2", timeout=400)
    t = tables(tmp_path / "studies" / "replay")
    trials, epochs = t["trials"], t["epochs"]
    assert len(trials) == 6 and set(trials["status"]) == {"DONE"}
    space = {"output": SPACE["output"], "sampling": SPACE["sampling"], "lr": SPACE["lr"]}
    for trial in trials.itertuples():
        want = nearest_rows(rows, space, {"output": trial.output, "sampling": trial.sampling, "lr": trial.lr})
        got = epochs[epochs["trial_id"] == trial.trial_id].sort_values("epoch")
        assert got["epoch"].tolist() == want["epoch"].tolist()
        for m in (*EPOCH_METRICS, "seconds"):
            assert got[m].tolist() == pytest.approx(want[m].tolist()), (trial.trial_id, m)
