import json
import subprocess

import pytest
from conftest import PYTHON, python_env

from study.bench import main
from study.engine.data import DataError


def test_bench_smoke_prints_every_row_and_ratio(tmp_path, cache_dir):
    """CI's smoke mode: every part of the bench on the CPU, one timed step each."""
    out = tmp_path / "bench.json"
    scratch = tmp_path / "cache"
    p = subprocess.run([PYTHON, "-m", "study.bench", "--steps", "1", "--warmup", "1", "--images", "128",
                        "--batches", "16", "--packs", "1,2", "--pack-batch", "16", "--flowers-batch", "2",
                        "--flowers-pack", "2", "--flowers-images", "2", "--flowers-size", "64", "--workers", "0",
                        "--cache-dir", str(scratch), "--json", str(out)],
                       env=python_env(COLORIZE_DATA_ROOT=""), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["device"] == "cpu" and figures["reference_b64_img_s"] > 0
    assert "bundled sample photos (no --data-root given)" in figures["data"]
    ratio = figures["trial_fp32_b16_img_s"] / figures["reference_b64_img_s"]
    assert abs(figures["trial_fp32_b16_ratio"] - ratio) < 0.02
    for key in ("pack2_fp32_b16_model_img_s", "flowers_trial_fp32_b2_img_s", "flowers_pack2_fp32_b2_model_img_s"):
        assert figures[key] > 0, key
    assert "pack of 2 fused UNets" in p.stdout and "the reference" in p.stdout
    # Ops per step, the launch-count proxy: a pack of 2 dispatches far fewer than two trials.
    ops = {r["key"]: r["ops_per_step"] for r in figures["rows"] if "ops_per_step" in r}
    assert ops["trial_fp32_b16_img_s"] > 50
    assert ops["pack2_fp32_b16_model_img_s"] < 1.5 * ops["trial_fp32_b16_img_s"], ops
    # A trial runs through the engine as a pack of one: about the ops of a plain model step (the loss's
    # per-member mean costs one or two).
    assert ops["trial_fp32_b16_img_s"] <= ops["pack1_fp32_b16_model_img_s"] <= ops["trial_fp32_b16_img_s"] + 2, ops
    assert "ops/step" in p.stdout
    # The JPEGs it wrote lived in its own cache folder and are gone.
    assert not list(scratch.glob("bench-jpeg-*"))


def test_data_root_without_cifar10_stops(tmp_path):
    (tmp_path / "flowers102").mkdir()
    p = subprocess.run([PYTHON, "-m", "study.bench", "--data-root", str(tmp_path), "--cache-dir",
                        str(tmp_path / "cache")], env=python_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "no cifar10/ folder" in p.stderr and str(tmp_path) in p.stderr
    assert "Traceback" not in p.stderr
    assert not list((tmp_path / "cache").glob("bench-jpeg-*"))


def test_data_root_without_flowers102_stops_before_any_timing(tmp_path, capsys):
    (tmp_path / "cifar10").mkdir()
    with pytest.raises(DataError, match="no flowers102/ folder.*--parts reference,trial,pack"):
        main(["--data-root", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--steps", "1"])
    assert "reference" not in capsys.readouterr().out  # it stopped before the first row


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps: 0 must be > 0"),
    (["--packs", "4,-1"], "--packs: -1 must be > 0"),
    (["--batches", "64,x"], "'x' is not a whole number"),
    (["--warmup", "-1"], "--warmup: -1 must be >= 0"),
    (["--parts", "trial,gpu"], "['gpu'] unknown"),
])
def test_bad_options_are_rejected_not_replaced(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
