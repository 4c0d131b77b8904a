import json
import subprocess

from conftest import PYTHON, python_env


def test_bench_smoke_prints_both_pipelines_and_ratio(tmp_path, cache_dir):
    out = tmp_path / "bench.json"
    p = subprocess.run([PYTHON, "-m", "study.bench", "--steps", "2", "--warmup", "1", "--images", "256",
                        "--batches", "64,128", "--workers", "0", "--cache-dir", str(cache_dir), "--json", str(out)],
                       env=python_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["device"] == "cpu" and figures["reference_b64_img_s"] > 0
    for b in (64, 128):
        assert figures[f"ours_b{b}_img_s"] > 0
        assert abs(figures[f"ratio_b{b}"] - figures[f"ours_b{b}_img_s"] / figures["reference_b64_img_s"]) < 0.02
    assert "x" in p.stdout and "the reference" in p.stdout
