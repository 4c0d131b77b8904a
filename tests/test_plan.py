"""study.plan: the estimate of a study's cost, checked against a real study run on this machine."""
import json
import subprocess
import sys
import time

import pytest
import torch
from conftest import PYTHON, python_env
from test_study import run_study
from torch.utils.flop_counter import FlopCounterMode

from study.config import SAMPLINGS, UNetConfig
from study.engine.models import build_unet
from study.engine.timing import Structure
from study.plan import _makespan, _pruning
from study.space.parse import load_space

# Runs the plan as `python -m study.plan` does, then says whether Ray was ever imported.
PLAN_NO_RAY = ("import sys; from study import cli; from study.plan import _main; status = cli.run(_main, sys.argv[1:]); "
               "print('RAY IMPORTED' if 'ray' in sys.modules else 'no ray', file=sys.stderr); sys.exit(status)")


def plan(tmp_path, *args, timeout=120):
    folder = tmp_path / "plan-cwd"
    folder.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    p = subprocess.run([PYTHON, "-c", PLAN_NO_RAY, *args], cwd=folder, env=python_env(), capture_output=True,
                       text=True, timeout=timeout)
    took = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    assert "no ray" in p.stderr, p.stderr[-2000:]
    assert list(folder.iterdir()) == [], "the plan wrote files"
    return p.stdout, took


@pytest.mark.parametrize("sampling", sorted(SAMPLINGS))
def test_multiply_adds_match_torch_count(sampling):
    # The analytic count that places structures between the two timed ones, against torch's own count
    # of the built network's forward pass (FLOPs = 2 x multiply-adds).
    for depth, width, res, output in ((2, 8, 32, "uv"), (4, 16, 64, "rgb"), (3, 32, 48, "uv")):
        s = Structure("x", res, depth, sampling, output, width, 64, 64)
        with torch.device("meta"):
            net = build_unet(UNetConfig(depth=depth, sampling=sampling, output=output, base_filters=width,
                                        max_filters=64), res)
            with FlopCounterMode(display=False) as count:
                net(torch.zeros(1, 1, res, res))
        assert s.macs() == pytest.approx(count.get_total_flops() / 2, rel=0.01), (depth, width, res)


def test_pruning_assumptions_and_schedule():
    smoke = load_space("smoke")   # median pruner: 2 startup trials, warm-up 1
    text, share = _pruning(smoke, pack=1)
    assert "first 2 trials run in full" in text and "50%" in text
    assert [share(i, 3) for i in range(6)] == [1, 1, 1 / 3, 1, 1 / 3, 1]
    halving = load_space("smoke")
    halving.pruner = {"name": "successive_halving", "reduction_factor": 3, "min_resource": 1}
    text, share = _pruning(halving, pack=1)
    # 9 epochs: all run 1, a third go on to 3, a ninth to 9.
    assert share(0, 9) == pytest.approx((1 + 2 / 3 + 6 / 9) / 9)
    assert _pruning(load_space("report"), pack=1)[1](5, 30) == 1.0
    # Six 10 s units on two slots: three each, plus each slot's worker start and the later units' gaps.
    from study.plan import TRIAL_GAP_S, WORKER_START_S
    assert _makespan([10.0] * 6, 2) == pytest.approx(30 + WORKER_START_S + 2 * TRIAL_GAP_S)


def test_the_feasibility_check_a_run_makes_imports_no_torch():
    # Every run (and --resume) checks its study can end within a century before Ray starts: from a bound that
    # times nothing, so it must not pay for torch (seconds of a resume's start); a plan that times does.
    code = ("import sys\nfrom study.plan import Request, check_feasible\nfrom study.space import load_space\n"
            "space = load_space('full')\n"
            "check_feasible(space, Request(num_samples=96, max_concurrent=4, resources={'cpu': 1, 'gpu': 0}, pack=1,"
            " cluster_resources={'CPU': 2}))\nfrom study.plan import local_resources\nlocal_resources()\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([PYTHON, "-c", code], env=python_env(), capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stdout + out.stderr[-2000:]


def test_gpus_are_counted_by_torch_where_a_gpu_driver_has_a_device_node(tmp_path, monkeypatch):
    from study import plan
    from study.engine import gpus
    monkeypatch.setattr(gpus, "GPU_DEVICE_NODES", (str(tmp_path / "nvidia*"), str(tmp_path / "kfd")))
    assert gpus.local_gpus() == 0   # no node: none, and torch is not asked
    (tmp_path / "kfd").touch()
    assert gpus.local_gpus() == torch.cuda.device_count()
    assert plan.local_resources(3, None) == {"CPU": 3, "GPU": torch.cuda.device_count()}
    assert plan.local_resources(None, 2)["GPU"] == 2


def test_plan_of_big_spaces_within_a_minute_and_says_what_to_change(tmp_path):
    out, took = plan(tmp_path, "--space", "full", "--num-cpus", "2")
    assert took < 60, took
    assert "plan of study space full: 96 trials" in out
    assert "cifar10: ~48 trials" in out and "flowers102: ~48 trials" in out
    assert "successive halving: every trial runs 1 epoch(s), then 1/4 of them go on" in out and "estimate:" in out
    # Days of CPU time: the plan says so, and what to change.
    assert "warning: this plan does not fit in a day" in out and "--time-budget" in out and "a GPU" in out
    out, took = plan(tmp_path, "--space", "report", "--num-cpus", "2", "--json")
    assert took < 60, took
    p = json.loads(out)
    assert p["num_samples"] == 8 and p["structures"] == 8 and p["pruning"].startswith("no pruning")
    assert p["concurrent"] == 1 and p["limited_by"] == "CPUs"   # 2 CPUs per trial on 2 CPUs
    assert p["datasets"]["flowers102"]["epochs"] == 100 and p["datasets"]["cifar10"]["train"] == 40000
    assert p["device_unit"] == "CPU-core-hours" and p["wall_s"] > 86400


def test_bad_space_is_one_error_line(tmp_path):
    p = subprocess.run([PYTHON, "-m", "study.plan", "--space", "no-such-space"], cwd=tmp_path, env=python_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_smoke_estimate_within_a_factor_of_two_of_a_real_run(tmp_path, cache_dir):
    # Both on this machine one after the other, so that a load from elsewhere weighs on both.
    out, _ = plan(tmp_path, "--space", "smoke", "--num-cpus", "2", "--json")
    estimate = json.loads(out)["wall_s"]
    t0 = time.perf_counter()
    run_study(tmp_path, cache_dir, "--space", "smoke", "--num-cpus", "2")
    real = time.perf_counter() - t0
    print(f"smoke: estimate {estimate:.0f} s, real {real:.0f} s", file=sys.stderr)
    assert real / 2 <= estimate <= real * 2, (estimate, real)
