"""``--resume`` of a study that has run all its trials: one line says so and how to add trials; no Ray
starts, nothing is written, exit 0 (a real study of two trials, run to its end first)."""
import os
import shlex
from pathlib import Path

import pytest
from test_study import fingerprint, run_study, space_file

pytestmark = pytest.mark.slow
N_TRIALS = 2


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("finished")
    space = space_file(tmp, "two", num_samples=N_TRIALS, max_concurrent=2, params={"epochs": 1})
    run_study(tmp, cache_dir, "--space", space, "--num-cpus", "2")
    return tmp, space


@pytest.mark.parametrize("extra", [[], ["--num-samples", str(N_TRIALS)]], ids=["as-it-was", "same-total"])
def test_resuming_a_finished_study_says_so_in_one_line_and_starts_nothing(finished, cache_dir, extra):
    tmp, space = finished
    study = tmp / "studies" / "two"
    before = fingerprint(study)
    ray_tmp = tmp / f"ray-tmp-{len(extra)}"   # where a Ray that started would put its session
    ray_tmp.mkdir()
    p = run_study(tmp, cache_dir, "--space", space, "--resume", *extra, env={"RAY_TMPDIR": str(ray_tmp)})
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and not p.stderr.strip(), p.stdout + p.stderr
    assert lines[0].startswith(f"nothing to run: the study has done all its {N_TRIALS} trials "
                               f"({N_TRIALS} of {N_TRIALS} done or pruned)"), lines[0]
    assert f"--num-samples M with M > {N_TRIALS}" in lines[0]
    # The command it gives runs more: the same study, a larger total.
    cmd = shlex.split(lines[0].split(": ", 2)[2])
    assert cmd[:3] == ["python", "-m", "study.run"] and "--resume" in cmd
    assert int(cmd[cmd.index("--num-samples") + 1]) > N_TRIALS and cmd[cmd.index("--name") + 1] == "two"
    assert not os.listdir(ray_tmp), os.listdir(ray_tmp)
    assert fingerprint(study) == before


def test_the_plan_of_a_finished_study_says_the_same(finished, cache_dir):
    tmp, space = finished
    run = run_study(tmp, cache_dir, "--space", space, "--resume")
    plan = run_study(tmp, cache_dir, "--space", space, "--resume", "--plan")
    assert plan.stdout.strip().splitlines()[-1] == run.stdout.strip(), plan.stdout
