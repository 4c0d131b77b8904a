"""The driver at scale: a synthetic study (real Ray Tune, Optuna, pruning, results, checkpoints; generated
epoch curves instead of training) through the real command line, its benchmark, and a crash and resume."""
import json
import subprocess
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from conftest import PYTHON, ROOT, python_env
from test_study import kill_driver_when, optuna_study, run_study, tables

from study.bench_space import space_text
from study.config import TrialConfig
from study.results.store import read_table
from study.space.parse import parse_space
from study.space.reading import SpaceError
from study.tune.synthetic import CHECKPOINT_FILE, curve_row, run_trial

BENCH_KEYS = {"driver_results_per_s", "driver_p50_ms", "driver_p99_ms", "ray_results_per_s", "wall_s",
              "ray_wall_s", "study"}


def check_study(study, n_trials: int) -> None:
    """Every trial finished, one epochs row per (trial, epoch) it ran, and Optuna agreeing with the trials table."""
    t = tables(study)
    trials, epochs = t["trials"], t["epochs"]
    assert len(trials) == n_trials and trials.trial_id.is_unique
    assert set(trials.status) <= {"DONE", "PRUNED"}, trials.status.tolist()
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    for row in trials.itertuples():
        got = sorted(epochs.loc[epochs.trial_id == row.trial_id, "epoch"])
        assert got == list(range(1, row.epochs_run + 1)), (row.trial_id, got)
        if row.status == "DONE":
            assert row.epochs_run == row.epochs
    ot = optuna_study(study)
    by_number = {tr.number: tr for tr in ot.get_trials(deepcopy=False)}
    assert len([tr for tr in by_number.values() if "orphaned" not in tr.user_attrs]) == n_trials
    for row in trials.itertuples():
        tr = by_number[row.optuna_number]
        assert tr.state.name == {"DONE": "COMPLETE", "PRUNED": "PRUNED"}[row.status], row.trial_id
        assert sorted(tr.intermediate_values) == list(range(1, row.epochs_run + 1))
        if row.status == "DONE":
            assert tr.value == pytest.approx(row.best_val_psnr, abs=1e-6)


# ---- the synthetic trial on its own (fast)

@pytest.mark.parametrize("output", ["rgb", "uv", "uv-classes"])
@pytest.mark.parametrize("epochs,stop_after", [(1, 0), (4, 2), (7, 6)])
def test_synthetic_rows_are_the_engines_and_resume_repeats_them(tmp_path, output, epochs, stop_after):
    cfg = TrialConfig(dataset="samples", output=output, epochs=epochs)
    whole = run_trial(cfg, report=lambda row, folder: None, epoch_seconds=0, work_dir=tmp_path, log=lambda s: None)
    assert [r["epoch"] for r in whole] == list(range(1, epochs + 1))
    expected = {"epoch", "train_loss", "lr", "seconds", "precision", "best_val_psnr", "best_epoch",
                *(f"{s}_{m}" for s in ("val", "test") for m in ("loss", "psnr", "ssim", "colourfulness", "gray_psnr"))}
    for r in whole:
        assert expected <= set(r)
        assert (len(set(r) - expected) == 16) == (output == "uv-classes")   # the temperature curve's columns
    # A checkpoint folder with each row, then resuming from one: the same rows after it.
    folders = {}

    def keep(row, folder):
        folders[row["epoch"]] = json.loads((folder / CHECKPOINT_FILE).read_text())

    run_trial(cfg, report=keep, epoch_seconds=0, work_dir=tmp_path, log=lambda s: None)
    assert folders == {e: {"epoch": e} for e in range(1, epochs + 1)}
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / CHECKPOINT_FILE).write_text(json.dumps({"epoch": stop_after}))
    rest = []
    run_trial(cfg, report=lambda row, folder: rest.append(row), epoch_seconds=0, resume_from=saved if stop_after else None,
              work_dir=tmp_path, log=lambda s: None)
    assert rest == whole[stop_after:]
    assert not list(tmp_path.glob("synthetic-checkpoint-*"))   # each folder goes once reported


def test_curves_differ_by_config_and_stay_above_gray():
    rows = [curve_row(TrialConfig(dataset="samples", lr=lr, depth=d), 20) for lr in (1e-3, 2e-3) for d in (2, 3)]
    assert len({r["val_psnr"] for r in rows}) == 4
    assert all(r["val_psnr"] > r["val_gray_psnr"] for r in rows)


@pytest.mark.parametrize("value,ok", [({"epoch_seconds": 0.01}, True), ({"epoch_seconds": 0}, True),
                                      ({"epoch_seconds": -1}, False), ({"epoch_seconds": "1s"}, False),
                                      ({"epoch_seconds": 1e9}, False), ({}, False), (0.01, False),
                                      ({"epoch_seconds": 1, "x": 2}, False), ({"epoch_seconds": True}, False)])
def test_space_synthetic_key(tmp_path, value, ok):
    raw = yaml.safe_load(space_text(4, 2, 2, 0.01))
    raw["synthetic"] = value
    if ok:
        assert parse_space(raw, tmp_path / "s.yaml").synthetic == {"epoch_seconds": float(value["epoch_seconds"])}
    else:
        with pytest.raises(SpaceError, match="synthetic"):
            parse_space(raw, tmp_path / "s.yaml")


def test_bench_driver_bad_option_is_one_error_line(tmp_path):
    p = subprocess.run([PYTHON, "-m", "study.bench", "--parts", "driver", "--trials", "0", "--storage", str(tmp_path)],
                       cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "--trials" in p.stderr
    assert "Traceback" not in p.stderr and not list(tmp_path.iterdir())


def test_bench_growth_smoke(tmp_path):
    """The growth benchmark: a study filled with ended trials, then new ones through the driver's own parts;
    the study it leaves is consistent (one row per (trial, epoch), Optuna agreeing with the tables)."""
    p = subprocess.run([PYTHON, "-m", "study.bench", "--parts", "driver", "--growth", "30", "--epochs", "3",
                        "--new", "8", "--concurrency", "2", "--storage", str(tmp_path), "--json"],
                       cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (out,) = json.loads(p.stdout.strip().splitlines()[-1])["growth"]
    assert out["trials_before"] == 30 and out["new_trials"] == 8 and 8 <= out["results"] <= 8 * 3
    assert 0 < out["p50_ms"] <= out["p99_ms"] <= out["max_ms"]
    study = Path(out["study"])
    t = {name: read_table(str(study), name) for name in ("trials", "epochs")}
    assert len(t["trials"]) == 38 and not t["epochs"].duplicated(["trial_id", "epoch"]).any()
    stored = {tr.number: tr for tr in optuna.load_study(study_name="growth", storage=f"sqlite:///{study / 'optuna.db'}")
              .get_trials()}
    assert len(stored) == 38
    for row in t["trials"].itertuples():
        tr = stored[row.optuna_number]
        assert tr.state.name == {"DONE": "COMPLETE", "PRUNED": "PRUNED"}[row.status], row.trial_id
        assert sorted(tr.intermediate_values) == sorted(t["epochs"].epoch[t["epochs"].trial_id == row.trial_id])


def test_scale_s3_counts_requests_by_kind(tmp_path):
    """scripts/scale_s3.py's smoke: a tiny synthetic study on moto's S3 server; every request it answered is
    counted under one kind, the study's own writes among them, and the study reads back over S3."""
    pytest.importorskip("moto")
    p = subprocess.run([PYTHON, str(ROOT / "scripts" / "scale_s3.py"), "--trials", "2", "--epochs", "2",
                        "--concurrency", "2", "--json", str(tmp_path / "s3.json")], cwd=tmp_path, env=python_env(),
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads((tmp_path / "s3.json").read_text())
    assert out["results"] == 4 and out["requests"] == sum(out["by_kind_and_method"].values()) > 0
    kinds = out["per_result_by_kind"]
    assert kinds["results"] > 0 and kinds["checkpoints"] > 0 and kinds["ray state"] > 0, kinds
    assert set(kinds) <= {"results", "study files", "checkpoints", "ray state", "ray trial logs",
                          "folders and listings"}
    assert "'trials': 2," in out["rows"] and "'epochs': 4," in out["rows"], out["rows"]
    assert out["read_tables_requests"] > 0 and out["info_s"] > 0


# ---- whole studies

@pytest.mark.slow
def test_bench_driver_smoke(tmp_path):
    p = subprocess.run([PYTHON, "-m", "study.bench", "--parts", "driver", "--trials", "6", "--epochs", "3",
                        "--concurrency", "2", "--storage", str(tmp_path / "studies"), "--json", "--no-pruning"],
                       cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert BENCH_KEYS <= set(out), out
    assert out["driver_results_per_s"] > 0 and out["ray_results_per_s"] > 0
    assert 0 < out["driver_p50_ms"] <= out["driver_p99_ms"]
    study = tmp_path / "studies" / out["study"].rsplit("/", 1)[-1]
    check_study(study, 6)
    # Without pruning both runs report every epoch of every trial: the same work, so the wall times compare.
    assert out["results"] == len(tables(study)["epochs"]) == out["ray_results"] == 6 * 3


@pytest.mark.slow
def test_synthetic_study_killed_and_resumed(tmp_path, cache_dir):
    space = tmp_path / "synthetic.yaml"
    space.write_text(space_text(12, 5, 2, 0.3))
    study = tmp_path / "studies" / "synthetic"

    def some_ended(trials: pd.DataFrame | None) -> bool:
        return trials is not None and trials.status.isin(["DONE", "PRUNED"]).sum() >= 4

    left = kill_driver_when(tmp_path, cache_dir, str(space), study, some_ended)
    assert (left.status == "RUNNING").any() or len(left) < 12   # killed mid-run
    run_study(tmp_path, cache_dir, "--space", str(space), "--resume", "--num-cpus", "2", timeout=400)
    check_study(study, 12)
    # scripts/scale_study.py's smoke: the finished study read back and resumed with more trials until the
    # first is in, then stopped with SIGTERM (its state saved: the study still checks out).
    p = subprocess.run([PYTHON, str(ROOT / "scripts" / "scale_study.py"), "--study", str(study)], cwd=tmp_path,
                       env=python_env(), capture_output=True, text=True, timeout=400, check=False)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["trials"] == 12 and 0 < out["read_tables_s"] < out["read_tables_process_s"], out
    assert all(out[k] > 0 for k in ("info_s", "analysis_s", "resume_first_trial_s", "resume_stop_s")), out
    assert 0 < out["resume_first_asked_s"] <= out["resume_first_new_trial_s"], out   # asked before it starts
    assert len(read_table(study, "trials")) > 12
