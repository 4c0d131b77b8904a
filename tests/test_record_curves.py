"""scripts/record_curves.py: one row per (configuration, epoch), stable ids, reruns append nothing,
and the recorded figures are run_trial's."""
import importlib.util
import json
import subprocess
import sys
from dataclasses import fields

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import PYTHON, ROOT, python_env

from study.config import TrialConfig
from study.results.contract import EPOCH_METRICS, epoch_gain

SCRIPT = ROOT / "scripts" / "record_curves.py"


def _module():
    if "record_curves" not in sys.modules:   # a script, not a package module: loaded from its file once
        spec = importlib.util.spec_from_file_location("record_curves", SCRIPT)
        sys.modules["record_curves"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["record_curves"])
    return sys.modules["record_curves"]


def record(out, cache_dir, *extra):
    return subprocess.run([PYTHON, str(SCRIPT), "--smoke", "--dataset", "samples", "--out", str(out),
                           "--cache-dir", str(cache_dir), *extra],
                          check=False, capture_output=True, text=True, env=python_env(), timeout=300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("curves") / "curves.parquet"
    first = record(out, cache_dir)
    assert first.returncode == 0, first.stderr
    return out, first


def test_one_row_per_config_and_epoch(smoke):
    out, _ = smoke
    df = pd.read_parquet(out)
    rc = _module()
    assert len(df) == 2 * rc.SMOKE["epochs"]
    assert not df.duplicated(["config_id", "epoch"]).any()
    assert sorted(df.groupby("config_id")["epoch"].apply(list).tolist()) == [[1, 2], [1, 2]]
    # the gains are the contract's formula; every epoch has its seconds
    for split in ("val", "test"):
        assert (df[f"{split}_gain"] == epoch_gain(df, split)).all()
    assert (df["seconds"] > 0).all() and df["error"].isna().all()
    meta = json.loads(pq.read_schema(out).metadata[b"curves"])
    assert meta["seed"] == 0 and meta["machine"]["threads"] == 1 and meta["machine"]["torch"]
    assert meta["space"] == json.loads(json.dumps(rc.SPACE)) and "--smoke" in meta["commands"][0]["command"]


def test_config_ids_are_stable_hashes_of_the_drawn_configs(smoke):
    out, _ = smoke
    df = pd.read_parquet(out)
    rc = _module()
    fixed = {**rc.FIXED, **rc.SMOKE}
    for index in (0, 1):
        cfg = rc.draw(0, index, "samples", fixed)
        assert cfg == rc.draw(0, index, "samples", fixed)   # the same draw whatever came before
        assert set(df[df["draw"] == index]["config_id"]) == {rc.config_id(cfg)}
    # a different seed draws different configurations, a different value a different id
    assert rc.draw(1, 0, "samples", fixed) != rc.draw(0, 0, "samples", fixed)
    cfg = rc.draw(0, 0, "samples", fixed)
    ids = {rc.config_id(cfg)} | {rc.config_id(TrialConfig(**{**cfg.__dict__, "lr": cfg.lr * 2}))}
    assert len(ids) == 2


def test_a_rerun_appends_nothing_and_a_longer_one_only_the_new_configs(smoke, cache_dir):
    out, _ = smoke
    before = pd.read_parquet(out)
    again = record(out, cache_dir)
    assert again.returncode == 0, again.stderr
    assert "recorded 0 new" in again.stdout
    pd.testing.assert_frame_equal(pd.read_parquet(out), before)
    more = record(out, cache_dir, "--configs", "3")
    assert more.returncode == 0, more.stderr
    after = pd.read_parquet(out)
    assert "recorded 1 new" in more.stdout and len(after) == len(before) + 2
    pd.testing.assert_frame_equal(after.iloc[:len(before)], before)
    # the commands that added rows (a rerun that added none wrote nothing)
    commands = [c["command"] for c in json.loads(pq.read_schema(out).metadata[b"curves"])["commands"]]
    assert len(commands) == 2 and commands[1].endswith("--configs 3")


def test_figures_are_what_run_trial_returns(smoke, cache_dir):
    import torch

    from study.engine import run_trial

    out, _ = smoke
    df = pd.read_parquet(out)
    first = df[df["draw"] == 0].sort_values("epoch")
    values = {f.name: first.iloc[0][f.name] for f in fields(TrialConfig)}
    cfg = TrialConfig.from_dict({k: v.item() if hasattr(v, "item") else v for k, v in values.items()})
    assert _module().config_id(cfg) == first.iloc[0]["config_id"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        history = run_trial(cfg, cache_dir=cache_dir, device="cpu", work_dir=out.parent, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    assert [r["epoch"] for r in history] == first["epoch"].tolist()
    for row, (_, recorded) in zip(history, first.iterrows()):
        for m in EPOCH_METRICS:
            assert recorded[m] == pytest.approx(row[m], rel=1e-6, abs=1e-6), m


@pytest.mark.parametrize("args, says", [
    (["--configs", "0"], "--configs 0"),
    (["--configs", "-3"], "--configs -3"),
    (["--seed", "-1"], "--seed -1"),
    (["--out", "{tmp}/curves.csv"], ".parquet"),
    (["--data-root", "{tmp}/nowhere"], "--data-root"),
    (["--seed", "7"], "seed 0"),            # the table was recorded under seed 0
    ([], "fixed"),                          # --smoke off: the table's fixed values differ
])
def test_bad_input_is_one_error_line_and_leaves_the_table(smoke, cache_dir, tmp_path, args, says):
    out, _ = smoke
    before = out.read_bytes()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    cmd = [PYTHON, str(SCRIPT), "--dataset", "samples", "--cache-dir", str(cache_dir), "--out", str(out), *args]
    if args:
        cmd.insert(2, "--smoke")
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, env=python_env(), timeout=300)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], p.stderr
    assert out.read_bytes() == before and not list(tmp_path.iterdir())


def test_a_table_it_did_not_write_is_never_overwritten(cache_dir, tmp_path):
    other = tmp_path / "other.parquet"
    pd.DataFrame({"a": [1, 2]}).to_parquet(other)
    before = other.read_bytes()
    p = record(other, cache_dir)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "not a curves table" in p.stderr, p.stderr
    assert other.read_bytes() == before and sorted(tmp_path.iterdir()) == [other]


def _curves(finals: dict[str, list[float]]) -> pd.DataFrame:
    """A curves table of the given val PSNR per epoch (gray 20 dB, test = val - 1 dB), the space's values."""
    rc = _module()
    rows = []
    for n, (cid, curve) in enumerate(finals.items()):
        cfg = rc.draw(0, n, "samples", {**rc.FIXED, "epochs": len(curve)})
        for epoch, v in enumerate(curve, 1):
            rows.append({"config_id": cid, "draw": n, **cfg.__dict__, "epoch": epoch, "val_psnr": v,
                         "val_gray_psnr": 20.0, "test_psnr": v - 1, "test_gray_psnr": 20.0, "seconds": 2.0,
                         "test_gain": v - 21, "error": None})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("curves, leader_wins, spearman", [
    # the order never changes: the epoch-2 leader wins, ranks agree
    ({"a": [18, 19, 22], "b": [17, 18, 21], "c": [16, 17, 20]}, True, 1.0),
    # a late bloomer: last at epoch 2, first at the end
    ({"a": [18, 19, 20], "b": [17, 18, 19.5], "c": [16, 17, 23]}, False, -0.5),
    # a curve that fails at epoch 3 (NaN) ranks last there
    ({"a": [18, 21, float("nan")], "b": [17, 18, 19], "c": [16, 17, 18]}, False, -0.5),
])
def test_summary_tells_how_well_epoch_two_foresees_the_last(curves, leader_wins, spearman):
    s = _module().summary(_curves(curves), group=3, draws=5)
    assert s["configs"] == 3 and s["rows"] == 9 and s["epochs"] == 3
    assert s["epoch2_leader_is_last_epoch_leader"] is leader_wins
    assert s["spearman_epoch2_vs_last"] == pytest.approx(spearman)
    assert s["groups_of_3"]["epoch2_leader_wins"] == float(leader_wins)
    winner = max(curves, key=lambda c: -1e9 if curves[c][-1] != curves[c][-1] else curves[c][-1])
    assert s["best_by_val"]["config_id"] == winner
    assert s["seconds_per_config"]["median"] == 6.0


def test_summary_of_a_recorded_table_writes_nothing(smoke, tmp_path):
    out, _ = smoke
    before = out.read_bytes()
    p = subprocess.run([PYTHON, str(SCRIPT), "--summary", "--out", str(out)], check=False, capture_output=True,
                       text=True, env=python_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["rows"] == len(pd.read_parquet(out)) and s["epochs"] == 2 and out.read_bytes() == before
    missing = subprocess.run([PYTHON, str(SCRIPT), "--summary", "--out", str(tmp_path / "none.parquet")],
                             check=False, capture_output=True, text=True, env=python_env(), timeout=300)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv, recorded", [
    (["--data-root", "/home/me/data", "--configs", "9"], "--data-root DATA --configs 9"),
    (["--data-root=../data", "--cache-dir", "/tmp/c"], "--data-root=DATA --cache-dir CACHE"),
    (["--cache-dir=/x y", "--out", "t.parquet"], "--cache-dir=CACHE --out t.parquet"),
    (["--configs", "3", "--data-root"], "--configs 3 --data-root"),   # a value missing: nothing to hide
    (["--seed", "/not/a/folder/option"], "--seed /not/a/folder/option"),
])
def test_the_recorded_command_names_no_folder_of_the_machine(argv, recorded):
    assert _module().portable_command(argv) == f"python scripts/record_curves.py {recorded}"


def test_the_shipped_tables_commands_name_no_folder_of_the_machine():
    meta = json.loads(pq.read_metadata(ROOT / "docs" / "search" / "cifar10-curves.parquet").metadata[b"curves"])
    for entry in meta["commands"]:
        argv = entry["command"].split()[2:]
        assert _module().portable_command(argv) == entry["command"], entry
