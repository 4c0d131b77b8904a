"""The study as a stock `ray job submit` (Ray's documented command, no --address for study.run): it joins
the job's cluster instead of starting a private Ray, and the job's status is the study's outcome."""
import json
import re
import secrets
import subprocess

import pytest
from conftest import ROOT
from test_cluster import RAY, LocalCluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    c = LocalCluster(secrets.token_hex(32), {})
    try:
        c.start_head(cpus=2)
        yield c
    finally:
        c.stop()


def submit(head, tmp_path, *run_args, env_vars=None) -> tuple[int, str]:
    from study.submit import EXCLUDES

    runtime_env = {"working_dir": str(ROOT), "excludes": EXCLUDES + ["tests"],
                   "env_vars": {"COLORIZE_CACHE_DIR": str(tmp_path / "cache"), **(env_vars or {})}}
    cmd = [RAY, "job", "submit", "--address", head.dashboard, "--runtime-env-json", json.dumps(runtime_env),
           "--", "python", "-m", "study.run", *run_args]
    p = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=600)
    return p.returncode, re.sub(r"\x1b\[[0-9;]*m", "", p.stdout + p.stderr)


def job_status(head, text: str) -> str:
    job = re.search(r"Job '(raysubmit_\w+)'", text).group(1)
    p = subprocess.run([RAY, "job", "status", "--address", head.dashboard, job], env=head.env,
                       capture_output=True, text=True, timeout=60)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", p.stdout + p.stderr)   # the CLI colours its output
    found = re.search(r"Job '\S+' (succeeded|failed|was stopped)", plain) or \
        re.search(r"Status for job '\S+': (\w+)", plain)
    assert found, plain[-3000:]
    return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}.get(found.group(1), found.group(1))


def test_a_stock_ray_job_joins_the_cluster_and_its_status_is_the_outcome(head, tmp_path):
    import pandas as pd

    storage = tmp_path / "studies"
    args = ["--space", "smoke", "--storage", str(storage), "--num-samples", "2", "--max-concurrent", "2"]
    rc, out = submit(head, tmp_path, *args, "--name", "ok")
    assert job_status(head, out) == "SUCCEEDED", out[-4000:]
    trials = pd.read_parquet(storage / "ok" / "results" / "trials.parquet")
    assert len(trials) == 2 and set(trials.status) <= {"DONE", "PRUNED"}, trials[["trial_id", "status", "error"]]
    assert "RuntimeEnvSetupError" not in out
    head_node = [n for n in head.alive_nodes()][0]["node_id"]
    assert set(trials.node_id) == {head_node}   # trials ran on the job's cluster, not on a private Ray
    # The job ran the space from its temporary working directory: the study keeps its own copy, and its
    # resume command names the shipped space (unchanged), never the job's copy, which is gone.
    from study.info import facts
    meta = json.loads((storage / "ok" / "study.json").read_text())
    assert "_ray_pkg_" in meta["space_file"]
    assert list((storage / "ok" / "spaces").glob("*/smoke.yaml")), list((storage / "ok").iterdir())
    resume = facts(str(storage / "ok"))["commands"]["resume"]
    assert " --space smoke " in resume and "_ray_pkg_" not in resume, resume

    # Every trial fails (an unknown compile mode is each trial's error): the job is FAILED, not SUCCEEDED.
    rc, out = submit(head, tmp_path, *args, "--name", "bad", env_vars={"COLORIZE_COMPILE": "sideways"})
    assert job_status(head, out) == "FAILED", out[-4000:]
    assert "no trial of the study finished" in out
