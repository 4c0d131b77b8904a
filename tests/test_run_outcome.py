"""study.run tells every outcome truly, through the real command line: storage URLs checked before any
folder is made, the exit status is the study's outcome, Ctrl-C and SIGTERM stop at a safe point with the
exact --resume command, a resume uses the space file as it is now, and a resume without the study's own
Optuna database, or with a search state this version cannot read, is refused."""
import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from conftest import PYTHON, python_env
from test_study import (fingerprint, kill_session, live_trials, run_study, session_processes,
                        space_file)


def cli(tmp_path, *args, env=None):
    p = subprocess.run([PYTHON, "-m", "study.run", *args], cwd=tmp_path, env=python_env(**(env or {})),
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("storage, says", [
    ("s3://", "no bucket after s3://"),
    ("s3:///x", "no bucket after s3://"),
    ("gs://", "no bucket after gs://"),
    ("foo://bar", "foo:// is not a storage"),
    ("s3:bucket/studies", "without '//'"),
    ("file:///tmp/x", "plain path"),
])
def test_storage_urls_are_checked_before_any_folder_is_made(tmp_path, storage, says):
    rc, out, err = cli(tmp_path, "--space", "smoke", "--storage", storage)
    assert rc == 2 and err.startswith("error: --storage") and says in err, err
    assert "Traceback" not in err + out
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())   # no local "s3:" folder, nothing at all


def test_a_trial_no_node_can_hold_is_refused_and_leaves_the_name_free(tmp_path, cache_dir):
    space = space_file(tmp_path, "huge", resources={"cpu": 64, "gpu": 0})
    p = run_study(tmp_path, cache_dir, "--space", space, "--num-cpus", "2", check=False)
    assert p.returncode == 2 and "64 CPU" in p.stderr and "--num-cpus" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "studies" / "huge" / "study.json").exists()


@pytest.mark.slow
def test_every_trial_failing_is_a_failed_run(tmp_path, cache_dir):
    # Every trial ends as ERROR (an unknown compile mode is each trial's ConfigError): the run exits 3.
    space = space_file(tmp_path, "fails", num_samples=2, pruner={"name": "none"}, params={"epochs": 1})
    p = run_study(tmp_path, cache_dir, "--space", space, "--num-cpus", "2", check=False,
                  env={"COLORIZE_COMPILE": "sideways"})
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-3000:]
    assert "error: no trial of the study finished (2 ERROR" in p.stderr and "COLORIZE_COMPILE" in p.stderr
    assert "best configuration" not in p.stdout and "Traceback" not in p.stderr


def _driver_handles_sigterm(command_pid: int) -> bool:
    """Whether the study's driver (the ``study.run`` the command started in a session of its own) has its
    SIGTERM handler in place (Linux: the caught-signals mask in /proc/PID/status)."""
    for pid, cmd in session_processes(command_pid):
        if pid == command_pid or "study.run" not in cmd:
            continue
        try:
            caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if line.startswith("SigCgt:"))
        except (OSError, StopIteration):
            continue
        if int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
            return True
    return False


def _start(tmp_path, cache_dir, space, *args):
    cmd = [PYTHON, "-m", "study.run", "--space", space, "--storage", str(tmp_path / "studies"),
           "--cache-dir", str(cache_dir), "--num-cpus", "2", *args]
    return subprocess.Popen(cmd, cwd=tmp_path, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _stop_when(proc, study: Path, ready, signum: int, group: bool = False) -> tuple[int, str, str]:
    """Send ``signum`` to the driver once ``ready(trials table)`` holds (with ``group``, as ``timeout`` does: to
    the driver and then to its whole process group); (exit status, stdout, stderr), and no Ray process of the
    driver's may be left."""
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            try:
                if ready(live_trials(study)):
                    break
            except (FileNotFoundError, OSError, KeyError, AttributeError):
                pass
            time.sleep(0.3)
        else:
            pytest.fail("the study made no progress")
        os.kill(proc.pid, signum)
        if group:
            os.killpg(proc.pid, signum)   # the driver is its group's leader (start_new_session)
        out, err = proc.communicate(timeout=180)
        time.sleep(2)
        left = [p for p in session_processes(proc.pid) if p[0] != proc.pid]
        assert not left, left   # no Ray process outlives the driver
        return proc.returncode, out, err
    finally:
        kill_session(proc.pid)


STOPS_TRIALS = 4


@pytest.fixture(scope="module")
def stops(tmp_path_factory, cache_dir) -> dict:
    """One study stopped by SIGINT, its space edited, resumed and stopped by SIGTERM, then resumed to its end."""
    tmp_path = tmp_path_factory.mktemp("stops")
    study = tmp_path / "studies" / "stops"
    # Four trials one at a time: the first is stopped by SIGINT, a second (drawn from the edited space) by
    # SIGTERM, and the resume still draws new trials from the edited file.
    space = space_file(tmp_path, "stops", num_samples=STOPS_TRIALS, max_concurrent=1, pruner={"name": "none"},
                       sampler={"name": "random"}, params={"epochs": 4})
    seen = {"study": study, "space": space}
    seen["sigint"] = _stop_when(_start(tmp_path, cache_dir, space), study,
                                lambda t: (t.epochs_run.fillna(0) >= 1).any(), signal.SIGINT)
    seen["before"] = pd.read_parquet(study / "results" / "trials.parquet")
    before = seen["before"]
    seen["command"] = command = seen["sigint"][2].strip().splitlines()[-1].strip()

    # Edit the space: a narrower lr range and 2 epochs. New trials are drawn from it, as the note says. The
    # printed command names the study's copy of the file it ran: the edited file is given instead.
    seen["started_with"] = Path(space).read_text()
    raw = yaml.safe_load(Path(space).read_text())
    raw["params"].update(lr={"loguniform": [1.0e-4, 2.0e-4]}, epochs=2)
    Path(space).write_text(yaml.safe_dump(raw))
    argv = shlex.split(command)[3:]
    argv[argv.index("--space") + 1] = space
    argv += ["--cache-dir", str(cache_dir), "--num-cpus", "2"]
    proc = subprocess.Popen(
        [PYTHON, "-m", "study.run", *argv], cwd=tmp_path, env=python_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    # Once a trial the first run did not start has an epoch: SIGTERM as `timeout` sends it, to the driver and to
    # its whole process group (Ray's processes too, were they in it).
    seen["sigterm"] = _stop_when(proc, study, lambda t: (t[~t.trial_id.isin(before.trial_id)].epochs_run.fillna(0)
                                                         >= 1).any(), signal.SIGTERM, group=True)
    seen["meta"] = json.loads((study / "study.json").read_text())
    seen["resumed"] = subprocess.run([PYTHON, "-m", "study.run", *argv], cwd=tmp_path, env=python_env(),
                                     capture_output=True, text=True, timeout=400)
    return seen


@pytest.mark.slow
def test_ctrl_c_and_sigterm_stop_cleanly_and_resume_uses_the_edited_space(stops):
    study = stops["study"]
    rc, out, err = stops["sigint"]
    assert rc == 130, err[-3000:]
    assert "stopped by SIGINT" in err and "Tuner.restore" not in out + err and "Traceback" not in err
    assert "best configuration" not in out
    command = stops["command"]
    assert command.startswith("python -m study.run") and command.endswith("--resume"), command
    before = stops["before"]
    assert len(before) < STOPS_TRIALS
    # It names the study's own copy of the space file as the study started, which outlives the file given.
    copy = Path(shlex.split(command)[shlex.split(command).index("--space") + 1])
    assert copy.parent.parent == study / "spaces" and copy.read_text() == stops["started_with"]

    rc, out, err = stops["sigterm"]
    assert rc == 143, err[-3000:]
    assert "changed since the study started" in err and "new trials are drawn from the file as it is now" in err
    # The signal twice and to the whole group is one request: a stop at a safe point, not at once.
    assert "stopped by SIGTERM; its state is saved" in err and "Traceback" not in err, err[-3000:]
    assert "core dumped" not in err.lower()
    assert len(stops["meta"]["space_changes"]) == 1
    # The command now names the copy of the edited file, which the study ran last.
    edited = stops["meta"]["space_changes"][0]["sha256"]
    assert f"/spaces/{edited[:12]}/stops.yaml --name stops" in err.strip().splitlines()[-1], err[-1000:]

    p = stops["resumed"]
    assert p.returncode == 0, p.stderr[-3000:]
    after = pd.read_parquet(study / "results" / "trials.parquet")
    assert len(after) == STOPS_TRIALS and set(after.status) == {"DONE"}, after[["trial_id", "status"]]
    new = after[~after.trial_id.isin(before.trial_id)]
    started_after_edit = new[new.epochs == 2]
    assert len(started_after_edit) >= 1
    assert started_after_edit.lr.between(1.0e-4, 2.0e-4).all(), started_after_edit.lr
    # Optuna agrees: those trials were drawn from the new range.
    url = f"sqlite:///{study / 'optuna.db'}"
    ot = {t.number: t for t in optuna.load_study(study_name="stops", storage=url).get_trials()}
    for row in started_after_edit.itertuples():
        assert 1.0e-4 <= ot[row.optuna_number].params["lr"] <= 2.0e-4


@pytest.mark.parametrize("when", ["reading its options", "starting Ray"])
def test_a_signal_to_the_whole_group_before_the_study_starts_starts_nothing(tmp_path, cache_dir, when):
    proc = _start(tmp_path, cache_dir, "smoke")
    deadline = time.time() + 120
    if when == "reading its options":   # once its driver handles SIGTERM (before that, Python's default ends it)
        while not _driver_handles_sigterm(proc.pid) and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
    else:   # Ray's GCS is the first process Ray starts: its driver is inside ray.init
        while not any("gcs_server" in cmd for _, cmd in session_processes(proc.pid)) and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    time.sleep(2)
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "stopped by SIGTERM before the study started: nothing was started", err
    assert not (tmp_path / "studies" / "smoke").exists()   # not even the folder the lock made
    assert not session_processes(proc.pid), session_processes(proc.pid)   # no Ray process of its left


@pytest.mark.slow
def test_resume_needs_the_studys_own_optuna_database(stops, tmp_path, cache_dir):
    # A copy of the finished study above (its default Optuna database is the one in its folder).
    shutil.copytree(stops["study"], tmp_path / "studies" / "stops")
    space = stops["space"]
    db = tmp_path / "studies" / "stops" / "optuna.db"
    db.rename(db.with_suffix(".bak"))
    p = run_study(tmp_path, cache_dir, "--space", space, "--resume", check=False)
    assert p.returncode == 2 and "optuna.db is missing" in p.stderr and "Traceback" not in p.stderr, p.stderr
    optuna.create_study(study_name="someone-else", storage=f"sqlite:///{db}")
    files = fingerprint(tmp_path / "studies" / "stops")
    p = run_study(tmp_path, cache_dir, "--space", space, "--resume", check=False)
    assert p.returncode == 2 and "holds no study 'stops'" in p.stderr and "someone-else" in p.stderr, p.stderr
    assert fingerprint(tmp_path / "studies" / "stops") == files   # refused before anything was written


@pytest.mark.slow
def test_a_saved_state_the_restore_cannot_read_is_refused(stops, tmp_path, cache_dir):
    # Tune would log the searcher's failed restore and start the study afresh, or stop with a traceback on its
    # own files: the driver refuses first, naming the file, and nothing is changed.
    folder = tmp_path / "studies" / "stops"
    shutil.copytree(stops["study"], folder)
    # An older version's searcher pickled its own class, which this version no longer has.
    old = b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x12study.tune_backend\x8c\x13PruningOptunaSearch\x93)\x81."
    # The study ran twice: each kind has an earlier run's file, which the restore reads without the newest.
    cases = [("searcher-state-*.pkl", old, "cannot be resumed by this version", "AttributeError"),
             ("searcher-state-*.pkl", pickle.dumps({"_ot_study": None}), "by this version", "another version's searcher"),
             ("searcher-state-*.pkl", 20, "its search state searcher-state-", "cut short"),
             ("search_gen_state-*.json", 30, "Tune's search state search_gen_state-", "cut short"),
             ("search_gen_state-*.json", b"\xffnot a pickle", "Tune's search state search_gen_state-", "it is damaged"),
             ("experiment_state-*.json", 100, "Tune's experiment state experiment_state-", "cut short")]
    for pattern, blob, says, also in cases:
        *earlier, state = sorted(folder.glob(pattern))
        whole = state.read_bytes()
        state.write_bytes(whole[:blob] if isinstance(blob, int) else blob)
        files = fingerprint(folder)
        p = run_study(tmp_path, cache_dir, "--space", stops["space"], "--resume", check=False)
        assert p.returncode == 2 and says in p.stderr and also in p.stderr and state.name in p.stderr, p.stderr
        fix = (f"move it out of the study folder to resume from the state an earlier run saved ({earlier[-1].name})"
               if "by this version" not in says else "start a new study with --name")
        assert fix in p.stderr.lower() and "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr
        assert fingerprint(folder) == files
        state.write_bytes(whole)
    # Without an earlier run's file, only a new study is left.
    *earlier, state = sorted(folder.glob("search_gen_state-*.json"))
    for path in earlier:
        path.unlink()
    state.write_bytes(state.read_bytes()[:30])
    p = run_study(tmp_path, cache_dir, "--space", stops["space"], "--resume", check=False)
    assert p.returncode == 2 and "No earlier state is left, so start a new study with --name" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr
