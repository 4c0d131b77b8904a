"""The study end to end with real Ray (a local cluster per run), real Optuna SQLite storage and Parquet."""
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from conftest import PYTHON, ROOT, python_env

from study.driver.stopping import OWN_SESSION_ENV
from study.results import read_table

pytestmark = pytest.mark.slow
SMOKE = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())


def space_file(tmp_path, name, **changes) -> str:
    raw = yaml.safe_load(yaml.safe_dump(SMOKE))
    params = changes.pop("params", {})
    raw.update(changes)
    raw["params"].update(params)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def run_study(tmp_path, cache_dir, *args, timeout=400, check=True, storage="studies", env=None):
    cmd = [PYTHON, "-m", "study.run", "--storage", str(tmp_path / storage), "--cache-dir", str(cache_dir), *args]
    p = subprocess.run(cmd, cwd=tmp_path, env=python_env(**(env or {})), capture_output=True, text=True,
                       timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


def kill_driver_when(tmp_path, cache_dir, space: str, study: Path, ready, *args, env=None,
                     poll_s: float = 0.3) -> pd.DataFrame:
    """Start ``study.run --space space`` (2 CPUs, ``args`` added) and kill its driver and local Ray as
    soon as ``ready(trials table)`` holds; returns the trials table as the kill left it."""
    cmd = [PYTHON, "-m", "study.run", "--space", space, "--storage", str(tmp_path / "studies"),
           "--cache-dir", str(cache_dir), "--num-cpus", "2", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=python_env(**(env or {})), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if ready(live_trials(study)):
                    break
            except (FileNotFoundError, OSError, KeyError, AttributeError):   # not written yet, or mid-write
                pass
            assert proc.poll() is None, "study ended before it could be killed"
            time.sleep(poll_s)
        else:
            pytest.fail("study made no progress")
    finally:
        kill_session(proc.pid)  # the driver and the local Ray cluster it started
        proc.wait()
    return live_trials(study)


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process of a session whose leader is ``python -m study.run``, and of the
    study it runs in a session of its own with its private Ray (their environment names the command's pid,
    study.driver.in_own_session); Ray's workers have their own process groups."""
    marker = f"{OWN_SESSION_ENV}={sid}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid or marker in (d / "environ").read_bytes().split(b"\0"):
                    out.append((int(d.name), (d / "cmdline").read_bytes().decode(errors="replace")))
            except (OSError, ProcessLookupError):
                pass
    return out


def kill_session(sid: int) -> None:
    """SIGKILL the driver and every Ray process it started: a crash, as far as the study can tell."""
    for pid, _ in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def tables(study: Path) -> dict[str, pd.DataFrame]:
    """The tables as their files hold them (a study whose driver ended: everything is written)."""
    return {t: pd.read_parquet(study / "results" / f"{t}.parquet") for t in ("trials", "epochs", "previews")}


def live_trials(study: Path) -> pd.DataFrame | None:
    """The trials table as a reader sees a running study's (the file and the changes its driver journaled since
    it wrote it: the tables are written on a cadence); None before its first trial."""
    return read_table(str(study), "trials")


def check_consistent(study: Path, n_trials: int) -> dict[str, pd.DataFrame]:
    t = tables(study)
    trials, epochs, previews = t["trials"], t["epochs"], t["previews"]
    assert len(trials) == n_trials and trials.trial_id.is_unique
    assert set(trials.status) <= {"DONE", "PRUNED", "ERROR"}, trials.status.tolist()
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    for row in trials.itertuples():
        got = sorted(epochs.loc[epochs.trial_id == row.trial_id, "epoch"])
        assert got == list(range(1, row.epochs_run + 1)), (row.trial_id, got)
        if row.status == "DONE":
            assert row.epochs_run == row.epochs
        if row.epochs_run:
            assert (study / row.checkpoint_path / "checkpoint.pt").exists()
            pred = previews[(previews.trial_id == row.trial_id) & (previews.kind == "prediction")]
            # Predictions come with checkpoints: the best epoch's and the last one's at least.
            assert set(pred.epoch.unique()) <= set(got) and row.best_epoch in set(pred.epoch)
            if row.status == "DONE":
                assert row.epochs_run in set(pred.epoch)
            assert pred.png.map(lambda b: b[:8] == b"\x89PNG\r\n\x1a\n").all()
    originals = previews[previews.kind.isin(["original", "grayscale"])]
    assert (originals.kind == "original").any() and (originals.kind == "grayscale").any()
    assert not originals.duplicated(["dataset", "resolution", "image_index", "kind"]).any()  # once per dataset
    # The Optuna study holds every Ray trial once, in the matching state, with the per-epoch truth:
    # each epoch's own val PSNR as the intermediate value, the best epoch's as the trial's value.
    ot = optuna_study(study)
    by_number = {tr.number: tr for tr in ot.get_trials(deepcopy=False)}
    states = {"DONE": "COMPLETE", "PRUNED": "PRUNED", "ERROR": "FAIL"}
    assert trials.optuna_number.is_unique
    for row in trials.itertuples():
        tr = by_number[row.optuna_number]
        assert tr.user_attrs["ray_trial_id"] == row.trial_id.split("_m")[0]
        assert tr.state.name == states[row.status], (row.trial_id, row.status, tr.state)
        own = epochs[epochs.trial_id == row.trial_id].set_index("epoch")
        per_epoch = own.val_psnr
        if len(ot.directions) > 1:   # Optuna takes no intermediate values with several objectives
            assert tr.intermediate_values == {}
        else:
            # Every recorded epoch that trained to a finite loss and PSNR was reported, whatever the
            # trial's end (a pack member that diverged records its last epoch, NaN, but never tells it).
            told = own[own.train_loss.map(math.isfinite) & own.val_psnr.map(math.isfinite)].index
            assert sorted(tr.intermediate_values) == sorted(told), (row.trial_id, row.status, sorted(own.index))
        if not (getattr(row, "restarts", 0) or 0):  # a re-run epoch keeps Optuna's first report
            for e, v in tr.intermediate_values.items():
                assert v == pytest.approx(per_epoch[e], abs=1e-6), (row.trial_id, e)
        if row.status == "DONE" and len(ot.directions) == 1:
            assert tr.value == pytest.approx(row.best_val_psnr, abs=1e-6)
        elif row.status == "DONE":   # a front: every objective at the best epoch (by val PSNR)
            best = epochs[(epochs.trial_id == row.trial_id) & (epochs.epoch == row.best_epoch)].iloc[0]
            assert tr.values == pytest.approx([best.val_psnr - best.val_gray_psnr, best.val_colourfulness],
                                              abs=1e-6)
    owned = [tr for tr in by_number.values() if "orphaned" not in tr.user_attrs]
    assert len(owned) == n_trials
    return t


def optuna_study(study: Path) -> optuna.Study:
    meta = yaml.safe_load((study / "study.json").read_text())
    url = meta["optuna_storage"]
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_absolute():
        url = f"sqlite:///{study / url[len('sqlite:///'):]}"  # stored relative to the study folder
    return optuna.load_study(study_name=meta["optuna_study_name"], storage=url)


@contextlib.contextmanager
def ray_head():
    """A running `ray start --head` (own port and temp dir, one CPU) and its address; ended by its session."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="rh")   # short: Ray's socket paths must stay under ~100 characters
    proc = subprocess.Popen([PYTHON, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             f"--port={port}", "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp}",
                             "--include-dashboard=false", "--node-ip-address=127.0.0.1"],
                            env=python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None and time.time() < deadline, "ray start --head did not come up"
            time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        kill_session(proc.pid)
        proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.e2e
def test_smoke_study_end_to_end(tmp_path, cache_dir):
    # A Ray cluster already runs on this machine (and RAY_ADDRESS points at it): a local study
    # still starts its own Ray (with --num-cpus), never joins that one.
    ray_tmp = tempfile.mkdtemp(prefix="rt")  # the study's own Ray session logs, kept apart (short for sockets)
    try:
        with ray_head() as address:
            p = run_study(tmp_path, cache_dir, "--space", "smoke", "--num-cpus", "2",
                          env={"RAY_ADDRESS": address, "RAY_TMPDIR": ray_tmp})
        # Ray's log prefixes show each trial's actor by its repr; a reused actor (reuse_actors) renames
        # its prefix for each trial it runs.
        names, per_worker = set(), []
        for log in Path(ray_tmp).rglob("worker-*.out"):
            found = set(re.findall(r":actor_name:(ColorizeTrial\([^)]*\))", log.read_text(errors="replace")))
            names |= found
            per_worker.append(len(found))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    # The study's own closing lines: its last progress line (every trial ended, none failed) and the table.
    assert re.search(r"\] trials 6/6 ended: \d+ done, \d+ pruned, 0 errored", p.stdout), p.stdout[-3000:]
    assert "best configuration per dataset x output" in p.stdout
    study = tmp_path / "studies" / "smoke"
    t = check_consistent(study, 6)
    assert (t["trials"].device == "cpu").all() and t["trials"].node_id.str.len().gt(0).all()
    assert (t["trials"].pack_size == 1).all() and (t["trials"].pack_id == t["trials"].optuna_number).all()
    # What the trials computed in, per epoch and per trial, as a local study records it (CPU: fp32).
    assert "precision" in t["epochs"] and set(t["epochs"].precision) == {"fp32"}
    assert set(t["trials"].precision_used) == {"fp32"} and set(t["trials"].precision) == {"auto"}
    # The tables are the results contract's, as the study's reader and pandas alone read them.
    from test_results_shape import check_shape

    from study.results import contract
    from study.results.store import read_table
    for name in contract.TABLES:
        check_shape(name, read_table(study, name))
    assert set(contract.TRIAL_COLUMNS) <= set(t["trials"].columns)
    # optuna-dashboard reads well: a named objective, the space and its file's hash.
    ot = optuna_study(study)
    assert ot.metric_names == ["best_val_psnr"]
    smoke_file = ROOT / "search_spaces" / "smoke.yaml"
    assert ot.user_attrs["space"] == "smoke"
    assert ot.user_attrs["space_sha256"] == hashlib.sha256(smoke_file.read_bytes()).hexdigest()
    # Trials are named by id, dataset and variant (Tune's trial folders, the dashboard's actors).
    for row in t["trials"].itertuples():
        folder = study / row.checkpoint_path.split("/")[0]
        assert folder.name.startswith(row.trial_id) and f"-{row.dataset}-{row.sampling}-{row.output}-" in folder.name
        assert f"ColorizeTrial({folder.name})" in names, names
    assert max(per_worker) >= 2, per_worker   # actors were reused: 6 trials, 2 at a time
    # Same command again refuses to overwrite the study.
    again = run_study(tmp_path, cache_dir, "--space", "smoke", check=False)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_pruning_prunes_and_divergence_is_an_error(tmp_path, cache_dir):
    # lr 1e-7 learns nothing (clearly worse); lr 1e30 diverges to NaN.
    space = space_file(tmp_path, "prune", sampler={"name": "grid"}, num_samples=6, max_concurrent=1,
                       pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
                       params={"lr": {"choice": [3e-3, 1e-7, 1e30]}, "output": {"choice": ["rgb", "uv"]},
                               "depth": 2, "sampling": "maxpool-upsample", "epochs": 4})
    run_study(tmp_path, cache_dir, "--space", space, "--num-cpus", "2")
    t = check_consistent(tmp_path / "studies" / "prune", 6)
    trials = t["trials"]
    pruned = trials[trials.status == "PRUNED"]
    assert len(pruned) >= 1 and (pruned.epochs_run < pruned.epochs).all()
    errors = trials[trials.status == "ERROR"]
    assert set(errors.lr) == {1e30} and len(errors) == 2
    assert errors.error.str.contains("NonFiniteLossError").all()
    # What was pruned was worse than the best finished trial; the best one ran to the end.
    best = trials.loc[trials.best_val_psnr.idxmax()]
    assert best.status == "DONE" and (pruned.best_val_psnr < best.best_val_psnr).all()


@pytest.mark.e2e
def test_fractional_gpus_share_one_gpu(tmp_path, cache_dir):
    # Also a two-objective study (NSGA-II, a Pareto front) whose first trials are enqueued ones.
    first = [{"depth": 2, "sampling": "strided-transposed", "output": "rgb", "lr": 1e-3},
             {"depth": 3, "sampling": "maxpool-upsample", "output": "uv", "lr": 2e-3}]
    space = space_file(tmp_path, "frac", pruner={"name": "none"}, num_samples=4, max_concurrent=4,
                       params={"epochs": 4}, sampler={"name": "nsga2", "population_size": 4},
                       objectives=["val_psnr_gain", "val_colourfulness"], enqueue=first)
    run_study(tmp_path, cache_dir, "--space", space, "--num-cpus", "4", "--num-gpus", "1",
              "--gpus-per-trial", "0.25", "--cpus-per-trial", "1")
    study = tmp_path / "studies" / "frac"
    trials = check_consistent(study, 4)["trials"]
    assert json.loads((study / "study.json").read_text())["metric"] == ["val_psnr_gain", "val_colourfulness"]
    ot = optuna_study(study)
    assert ot.metric_names == ["val_psnr_gain", "val_colourfulness"]
    assert [ot.trials[i].params for i in (0, 1)] == first
    for number, want in enumerate(first):
        row = trials[trials.optuna_number == number].iloc[0]
        assert {k: row[k] for k in want} == want
    assert (trials.gpu_ids == "0").all()  # every trial was handed the (pretend) GPU
    spans = list(zip(trials.started_at, trials.finished_at))
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert overlap == 4, spans


def fingerprint(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_resume_without_a_study_is_a_clear_error(tmp_path, cache_dir):
    p = run_study(tmp_path, cache_dir, "--space", "smoke", "--resume", check=False)
    assert p.returncode == 2 and "no study at" in p.stderr


def test_trial_cli_smoke(tmp_path, cache_dir):
    p = subprocess.run([PYTHON, "-m", "study.trial", "--dataset", "samples", "--depth", "2", "--sampling",
                        "pixel-shuffle", "--output", "uv", "--epochs", "1", "--train-limit", "64",
                        "--eval-limit", "16", "--base-filters", "8", "--cache-dir", str(cache_dir),
                        "--out", str(tmp_path / "t")], env=python_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert "epoch 1/1" in p.stdout and "val PSNR" in p.stdout
    assert (tmp_path / "t" / "checkpoint" / "checkpoint.pt").exists()
    bad = subprocess.run([PYTHON, "-m", "study.trial", "--dataset", "samples", "--depth", "9"],
                         env=python_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "depth=9 is too deep" in bad.stderr


def _trial_workers(sid: int) -> list[int]:
    """PIDs of Ray worker processes running a trial in the study's session."""
    return [pid for pid, cmd in session_processes(sid) if cmd.startswith("ray::ColorizeTrial")]


def trial_worker(study: Path, sid: int, trial_id: str) -> int | None:
    """The PID of the worker running Tune trial ``trial_id`` (Tune records it in each result)."""
    for result in study.glob(f"{trial_id}-*/result.json"):
        lines = result.read_text().strip().splitlines()
        if lines:
            pid = json.loads(lines[-1]).get("pid")
            if pid in _trial_workers(sid):
                return pid
    return None


def kill_a_worker_mid_run(tmp_path, cache_dir, space: str, study: Path, *args) -> tuple:
    """Run ``study.run --space space`` (2 CPUs, ``args`` added) to its end, SIGKILLing the Ray worker of
    the first trial (or pack) seen RUNNING past epoch 2 (it has a checkpoint by then). Returns that
    trials-table row as the kill saw it (None if none was found), the driver's exit status and output."""
    cmd = [PYTHON, "-m", "study.run", "--space", space, "--storage", str(tmp_path / "studies"),
           "--cache-dir", str(cache_dir), "--num-cpus", "2", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=python_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = None
    try:
        deadline = time.time() + 300
        while killed is None and time.time() < deadline and proc.poll() is None:
            try:
                trials = live_trials(study)
                running = trials[(trials.status == "RUNNING") & (trials.epochs_run.fillna(0) >= 2)]
            except (FileNotFoundError, OSError, KeyError, AttributeError):   # not written yet, or mid-write
                running = None
            for row in ([] if running is None else running.itertuples()):
                # A pack member's row is <Tune trial id>_m<k>: the worker is the pack's.
                pid = trial_worker(study, proc.pid, row.trial_id.rsplit("_m", 1)[0])
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed = row
                    break
            time.sleep(0.3)
        out, _ = proc.communicate(timeout=400)
    finally:
        kill_session(proc.pid)
    return killed, proc.returncode, out


def test_dead_trial_worker_restarts_from_checkpoint(tmp_path, cache_dir):
    space = space_file(tmp_path, "crash", num_samples=2, max_concurrent=2, pruner={"name": "none"},
                       params={"epochs": 6, "train_limit": 512})
    study = tmp_path / "studies" / "crash"
    killed, rc, out = kill_a_worker_mid_run(tmp_path, cache_dir, space, study)
    assert killed is not None, "no trial worker was found to kill"
    assert rc == 0, out[-3000:]
    trials = check_consistent(study, 2)["trials"]
    restarted = trials[trials.restarts >= 1]
    assert len(restarted) == 1, trials[["trial_id", "status", "restarts", "epochs_run"]]
    row = restarted.iloc[0]
    assert row.trial_id == killed.trial_id and row.status == "DONE" and row.epochs_run == 6
    assert row.resumed_at_epoch > 1  # continued from its checkpoint, not from scratch
