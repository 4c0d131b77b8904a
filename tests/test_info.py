"""study.info on real studies: running, killed (a stale lock), finished, and the same study on S3 (moto)."""
import json
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

import optuna
import pyarrow.fs as pafs
import pytest
from conftest import PYTHON, python_env
from test_cluster import BUCKET, s3  # noqa: F401 - the moto S3 fixture
from test_study import check_consistent, fingerprint, kill_session, run_study, space_file

from study.results.contract import STATUSES, gain
from study.results.store import read_table

pytestmark = pytest.mark.slow


def info(study, *args, cwd=None, check=True):
    p = subprocess.run([PYTHON, "-m", "study.info", str(study), *args], cwd=cwd, env=python_env(),
                       capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def facts(study, cwd=None) -> dict:
    return json.loads(info(study, "--json", cwd=cwd).stdout)


# Two trials end before the kill and two run at it (two at a time): enough for every state below.
N_TRIALS = 4


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory, cache_dir):
    """One study seen by study.info while it runs, after its driver was killed (two trials ended, others
    mid-way), and once a copy of it in another folder was resumed to its end (the original left as it was)."""
    tmp = tmp_path_factory.mktemp("info")
    space = space_file(tmp, "tiny", num_samples=N_TRIALS, max_concurrent=2, params={"epochs": 4})
    study = tmp / "studies" / "tiny"
    cmd = [PYTHON, "-m", "study.run", "--space", space, "--storage", str(tmp / "studies"), "--cache-dir",
           str(cache_dir), "--num-cpus", "2"]
    proc = subprocess.Popen(cmd, cwd=tmp, env=python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    seen = {}
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, "the study ended before it could be killed"
            try:
                trials = read_table(study, "trials")
            except Exception:  # noqa: BLE001 - not written yet, or mid-write
                trials = None
            if trials is not None and "running" not in seen and (trials.epochs_run.fillna(0) >= 1).any():
                seen["running"] = facts(study)
                seen["running_text"] = info(study).stdout
            if "running" in seen and trials is not None and trials.status.isin(["DONE", "PRUNED"]).sum() >= 2:
                break
            time.sleep(0.5)
    finally:
        kill_session(proc.pid)   # the driver and its local Ray, as a crash would leave them
        proc.wait()
    seen["pid"] = proc.pid
    seen["before"] = read_table(study, "trials")
    seen["killed"] = facts(study)
    seen["killed_text"] = info(study).stdout
    # Resume a copy: it continues in its new place and the original stays as it was.
    shutil.copytree(study, tmp / "other" / "tiny", symlinks=True)
    seen["original"] = fingerprint(study)
    # In the copy, one running trial's checkpoints are gone, as a driver killed just after Tune deleted a
    # checkpoint it no longer keeps (before saving its state again) leaves them: it must start again.
    seen["lost"] = lose_checkpoints(tmp / "other" / "tiny", seen["before"])
    run_study(tmp, cache_dir, "--space", space, "--num-cpus", "2", "--resume", storage="other")
    seen["killed_study"], study = study, tmp / "other" / "tiny"
    seen["finished"] = facts(study, cwd="/")
    seen["finished_text"] = info(study).stdout
    seen["study"], seen["tmp"] = study, tmp
    return seen


def test_a_running_study_shows_its_driver(lifecycle):
    f = lifecycle["running"]
    assert f["state"] == "running"
    d = f["driver"]
    assert d["pid"] == lifecycle["pid"] and d["host"] == socket.gethostname() and 0 <= d["heartbeat_age_s"] < 60
    assert f["counts"]["RUNNING"] >= 1 and f["total"] == N_TRIALS
    assert f"state: running: driver pid {lifecycle['pid']} on {socket.gethostname()}" in lifecycle["running_text"]


def test_a_killed_study_shows_its_stale_lock_and_how_to_resume(lifecycle):
    f = lifecycle["killed"]
    assert f["driver"] is None and f["state"] == "stopped (its driver is gone)"
    assert f"process {lifecycle['pid']} on this host is gone" in f["stale_lock"]["reason"]
    assert "stale lock" in lifecycle["killed_text"]
    # The --resume command it printed names the study by absolute paths, so it works from any folder.
    cmd = shlex.split(f["commands"]["resume"])
    assert cmd[:3] == ["python", "-m", "study.run"] and cmd[-1] == "--resume"
    assert cmd[cmd.index("--storage") + 1] == str(lifecycle["tmp"] / "studies")
    assert Path(cmd[cmd.index("--space") + 1]).is_absolute() and cmd[cmd.index("--name") + 1] == "tiny"


def lose_checkpoints(study: Path, before) -> str | None:
    """Delete every checkpoint of the first trial that ran at the kill and had one; its id (None: none had)."""
    for row in before[before.status == "RUNNING"].sort_values("trial_id").itertuples():
        found = sorted(study.glob(f"{row.trial_id}*/checkpoint_*"))
        if found:
            for folder in found:
                shutil.rmtree(folder)
            return row.trial_id
    return None


@pytest.mark.e2e
def test_killed_driver_resumes_and_completes(lifecycle):
    before = lifecycle["before"]
    assert len(before) < N_TRIALS or (before.status == "RUNNING").any(), "killed too late to test resuming"
    assert fingerprint(lifecycle["killed_study"]) == lifecycle["original"]   # the copy resumed, not it
    after = check_consistent(lifecycle["study"], N_TRIALS)["trials"].set_index("trial_id")
    # Trials that ran when the driver died restarted (from their checkpoints): it is recorded.
    for row in before[before.status == "RUNNING"].itertuples():
        again = after.loc[row.trial_id]
        assert again.restarts >= 1, again
        # It reported again (from its checkpoint, or from scratch if it had none), unless it failed first:
        # the error is then its record (a loaded machine can fail a restart; the study goes on).
        assert again.resumed_at_epoch >= 1 or (again.status == "ERROR" and isinstance(again.error, str)), again
    assert (after.restarts.fillna(0) == 0).sum() >= 1  # finished before the crash: no restart
    if lifecycle["lost"] is not None:   # its checkpoints gone: it started again, from its first epoch
        lost = after.loc[lifecycle["lost"]]
        assert lost.status in ("DONE", "PRUNED") and lost.resumed_at_epoch == 1, lost


def test_a_finished_study_counts_best_and_commands(lifecycle):
    f, study = lifecycle["finished"], lifecycle["study"]
    trials = read_table(study, "trials")
    assert f["state"] == "finished" and f["driver"] is None and f["stale_lock"] is None
    assert f["trials"] == len(trials) == N_TRIALS and list(f["counts"])[:len(STATUSES)] == list(STATUSES)
    assert f["counts"] == {s: int((trials.status == s).sum()) for s in f["counts"]}
    assert f["space_sha256"] and f["grayscale"] == "left out" and Path(f["space_file"]).is_file()
    # The best trial per dataset x output with its gain, as the contract computes it.
    row = trials.set_index("trial_id").loc[f["best"][0]["trial_id"]]
    assert f["best"][0]["gain_db"] == pytest.approx(float(gain(row.to_frame().T).iloc[0]))
    assert f["best"][0]["best_val_psnr"] == pytest.approx(trials.best_val_psnr.max())
    assert f["time"]["source"] in ("status.json", "trials table")
    text = lifecycle["finished_text"]
    assert "state: finished" in text and "best trials" in text and f["best"][0]["trial_id"] in text
    # Every command names the study by its absolute path; the Optuna URL works from any folder.
    cmds = f["commands"]
    url = cmds["optuna_dashboard"].split()[-1]
    assert url == f"sqlite:///{study}/optuna.db"
    # The killed driver may have asked Optuna for a trial Ray never saved; the resume failed it as an orphan.
    optuna_trials = optuna.load_study(study_name="tiny", storage=url).trials
    orphans = [t for t in optuna_trials if "orphaned" in t.user_attrs]
    assert len(optuna_trials) - len(orphans) == N_TRIALS
    assert all(t.state == optuna.trial.TrialState.FAIL for t in orphans)
    for name in ("tensorboard", "analysis", "colorize"):
        assert str(study) in cmds[name], cmds[name]
    assert cmds["colorize"].endswith("photos/ --out colorized/") and "commands:\n  resume:" in text


def test_status_file_is_read_and_survives_damage(lifecycle, tmp_path):
    study = tmp_path / "copy"
    shutil.copytree(lifecycle["study"], study)
    now = time.time()
    status = {"updated": now - 5, "state": "budget", "counts": {"DONE": 3, "STOPPED": 1}, "total": N_TRIALS,
              "best": None, "model_images_per_s": 812.6, "elapsed_s": 3725.0, "budget_s": 7200.0,
              "budget_left_s": 3475.0, "projected_finish": now + 3475}
    (study / "status.json").write_text(json.dumps(status))
    f = facts(study)
    assert f["state"] == "stopped by its time budget" and f["total"] == N_TRIALS
    assert f["time"]["elapsed_s"] == 3725.0 and f["time"]["budget_left_s"] == 3475.0
    text = info(study).stdout
    assert "1h02m of running time; budget 2h00m, 57m55s left" in text and "813 model-images/s" in text
    # Keys missing or of the wrong type, then not JSON at all: still one screen, from what is there.
    (study / "status.json").write_text(json.dumps({"elapsed_s": "soon", "state": 5, "total": "x"}))
    f = facts(study)
    assert f["time"]["elapsed_s"] is None and f["total"] == N_TRIALS and f["state"] == "finished"
    (study / "status.json").write_text("{half")
    assert facts(study)["time"]["source"] == "trials table"


def test_bad_input_is_one_error_line(lifecycle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(lifecycle["study"], broken)
    (broken / "results" / "trials.parquet").write_bytes(b"not parquet")
    bad_json = tmp_path / "badjson"
    bad_json.mkdir()
    (bad_json / "study.json").write_text("{")
    cases = [(tmp_path / "missing", "no such folder"),
             (lifecycle["tmp"] / "studies", "is not a study: it has no study.json; studies in it: tiny"),
             (bad_json, "study.json cannot be read"),
             (broken, "trials.parquet is not a readable Parquet table"),
             ("s3:///nobucket", "no bucket after s3://")]
    for where, message in cases:
        p = info(where, check=False)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and message in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and not p.stdout


def test_a_study_on_s3(lifecycle, s3):  # noqa: F811 - the fixture
    # The finished study's files in a bucket, its Optuna database beside the driver (as study.run keeps
    # an s3 study's): study.info reads it all through the URL.
    fs = pafs.S3FileSystem(endpoint_override=s3["endpoint"].removeprefix("http://"), scheme="http",
                           region="us-east-1")
    local = lifecycle["study"]
    meta = json.loads((local / "study.json").read_text())
    meta["optuna_storage"] = f"sqlite:///{local}/optuna.db"
    for p in local.rglob("*"):
        if p.is_file() and p.name != "study.json" and not p.name.endswith(".db"):
            with fs.open_output_stream(f"{BUCKET}/studies/tiny/{p.relative_to(local)}") as out:
                out.write(p.read_bytes())
    with fs.open_output_stream(f"{BUCKET}/studies/tiny/study.json") as out:
        out.write(json.dumps(meta).encode())
    url = f"s3://{BUCKET}/studies/tiny?{s3['query']}"
    f = facts(url)
    assert f["study"] == url and f["state"] == "finished" and f["counts"] == lifecycle["finished"]["counts"]
    assert f["best"] == lifecycle["finished"]["best"]
    assert f["commands"]["optuna_dashboard"].endswith(f"sqlite:///{local}/optuna.db")
    assert f"--storage 's3://{BUCKET}/studies?" in f["commands"]["resume"]


def test_resume_commands_name_the_studys_copy_of_its_space_and_plan_what_is_left(lifecycle):
    # The space file was given from the test's folder: each study (and the copy resumed elsewhere) names
    # the copy in its own folder, which outlives the file given (a Ray job's working directory).
    for f, study in ((lifecycle["killed"], lifecycle["killed_study"]), (lifecycle["finished"], lifecycle["study"])):
        cmd = shlex.split(f["commands"]["resume"])
        space = Path(cmd[cmd.index("--space") + 1])
        assert space.parent.parent == study / "spaces" and space.name == "tiny.yaml", cmd
        assert space.read_bytes() == (lifecycle["tmp"] / "tiny.yaml").read_bytes()
    # A finished study: --resume runs more only with a larger total, which its command asks for.
    f = lifecycle["finished"]
    cmd = shlex.split(f["commands"]["resume"])
    assert cmd[cmd.index("--num-samples") + 1] == str(2 * N_TRIALS) and "larger --num-samples" in f["resume_note"]
    assert f"note: {f['resume_note']}" in lifecycle["finished_text"]
    # --plan of that command goes through a resume's checks and plans the trials left, nothing else.
    before = fingerprint(lifecycle["study"])
    plan = [PYTHON, "-m", "study.run", *cmd[3:], "--plan", "--num-cpus", "2"]
    p = subprocess.run(plan, cwd="/", env=python_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ended = int(read_table(lifecycle["study"], "trials").status.isin(["DONE", "PRUNED"]).sum())
    assert f"resuming study tiny: {ended} of {2 * N_TRIALS} trials done or pruned, {2 * N_TRIALS - ended} to run" \
        in p.stdout, p.stdout
    assert f"plan of study space tiny: {N_TRIALS} trials" in p.stdout
    without = [a for i, a in enumerate(plan) if a != "--num-samples" and plan[i - 1] != "--num-samples"]
    p = subprocess.run(without, cwd="/", env=python_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and f"nothing to run: the study has done all its {N_TRIALS} trials" in p.stdout, p.stderr
    assert fingerprint(lifecycle["study"]) == before
