"""A shared Optuna database for real: the study on a PostgreSQL server.

The server is a real PostgreSQL started by the test from a pip wheel (``pgserver``, in
the ``test`` extra), listening on a Unix socket only (no TCP port). The study's role
has a password that libpq takes from ``PGPASSWORD``, as the cluster guide says: it is
never in the storage URL, so it cannot end up in ``study.json`` or a log line.

One smoke study is compared with its Parquet tables; a cheap second study in the
same database is killed mid-run and resumed, and the two are checked to stay apart.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import PYTHON, python_env

pytestmark = pytest.mark.slow
ROLE, DB = "colorize", "colorize_studies"
STATES = {"DONE": "COMPLETE", "PRUNED": "PRUNED", "ERROR": "FAIL"}


@pytest.fixture(scope="module")
def pg():
    """A PostgreSQL server, a role with a password and a database; the URL carries no password."""
    import pgserver
    import psycopg

    pgdata = Path(tempfile.mkdtemp(prefix="colorize-pg-"))
    srv = pgserver.get_server(pgdata / "data", cleanup_mode="delete")
    try:
        password = secrets.token_hex(16)
        srv.psql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'; CREATE DATABASE {DB} OWNER {ROLE};")
        # pgserver trusts every local connection; make the study's role prove its password,
        # so the tests show the password really comes from the environment.
        hba = srv.pgdata / "pg_hba.conf"
        hba.write_text(f"local all {ROLE} scram-sha-256\n" + hba.read_text())
        srv.psql("SELECT pg_reload_conf();")
        socket_dir = psycopg.conninfo.conninfo_to_dict(srv.get_uri())["host"]
        url = f"postgresql+psycopg://{ROLE}@/{DB}?host={socket_dir}"
        env = {"PGPASSWORD": password}
        conninfo = f"host={socket_dir} user={ROLE} dbname={DB}"
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(conninfo, password="wrong").close()
        psycopg.connect(conninfo, password=password).close()
        yield {"url": url, "env": env, "password": password}
    finally:
        srv.cleanup()
        shutil.rmtree(pgdata, ignore_errors=True)


def study_cmd(storage: Path, cache_dir, url, *args) -> list[str]:
    return [PYTHON, "-m", "study.run", "--space", "smoke", "--storage", str(storage), "--cache-dir", str(cache_dir),
            "--optuna-storage", url, "--num-cpus", "2", *args]


def run(cmd, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=python_env(**env), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


@pytest.fixture(scope="module")
def smoke(pg, cache_dir, tmp_path_factory):
    """The smoke study, once, with its Optuna study in PostgreSQL (both tests look at it)."""
    tmp = tmp_path_factory.mktemp("pgsmoke")
    p = run(study_cmd(tmp / "studies", cache_dir, pg["url"]), tmp, pg["env"])
    os.environ["PGPASSWORD"] = pg["password"]  # this process reads the Optuna study through libpq too
    try:
        yield {"tmp": tmp, "study": tmp / "studies" / "smoke", "output": p.stdout + p.stderr,
               "optuna": {tid: (t.state, t.intermediate_values) for tid, t in optuna_trials(pg["url"], "smoke").items()}}
    finally:
        os.environ.pop("PGPASSWORD", None)


def tables(study: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (pd.read_parquet(study / "results" / "trials.parquet"),
            pd.read_parquet(study / "results" / "epochs.parquet"))


def optuna_trials(url: str, name: str) -> dict[str, optuna.trial.FrozenTrial]:
    """The study's Optuna trials by Ray trial id (orphans of a killed driver left out)."""
    ot = optuna.load_study(study_name=name, storage=url)
    return {t.user_attrs["ray_trial_id"]: t for t in ot.get_trials(deepcopy=False)
            if "ray_trial_id" in t.user_attrs and "orphaned" not in t.user_attrs}


def check_intermediate_values(trials_by_id, epochs) -> None:
    """Optuna's intermediate value at step N is epoch N's own val_psnr (what the pruner compares)."""
    for tid, tr in trials_by_id.items():
        e = epochs[epochs.trial_id == tid]
        assert tr.intermediate_values == dict(zip(e.epoch, e.val_psnr)), (tid, tr.intermediate_values)


def kill_session(sid: int) -> None:
    """SIGKILL the driver and every Ray process it started (Ray workers have their own process groups)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    os.kill(int(d.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def test_smoke_study_on_postgres(pg, smoke):
    """The smoke study with its Optuna study in PostgreSQL: states and intermediate values equal the Parquet."""
    study = smoke["study"]
    assert pg["password"] not in smoke["output"] + (study / "study.json").read_text()
    trials, epochs = tables(study)
    assert len(trials) == 6 and set(trials.status) <= set(STATES), trials[["trial_id", "status", "error"]]
    by_id = optuna_trials(pg["url"], "smoke")
    assert set(by_id) == set(trials.trial_id)
    for row in trials.itertuples():
        tr = by_id[row.trial_id]
        assert tr.number == row.optuna_number
        assert tr.state.name == STATES[row.status], (row.trial_id, row.status, tr.state)
        assert sorted(tr.intermediate_values) == list(range(1, row.epochs_run + 1))
        if row.status == "DONE":
            assert tr.value == pytest.approx(row.best_val_psnr)
        for k, v in tr.params.items():  # the sampled values are the trial's config
            assert getattr(row, k) == v, (row.trial_id, k)
    check_intermediate_values(by_id, epochs)


def test_resume_and_two_studies_in_one_database(pg, smoke, cache_dir):
    """A second study in the same database: killed mid-run, resumed with --resume, kept apart from the first."""
    tmp, storage = smoke["tmp"], smoke["study"].parent
    # One trial at a time, so the kill lands with a trial done and another still to come.
    cmd = study_cmd(storage, cache_dir, pg["url"], "--name", "second", "--num-samples", "2", "--max-concurrent", "1")
    study = storage / "second"
    log = tmp / "second.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, env=python_env(**pg["env"]), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if tables(study)[0].status.isin(["DONE", "PRUNED"]).sum() >= 1:
                    break
            except (FileNotFoundError, OSError):
                pass
            assert proc.poll() is None, "the study ended before it could be killed:\n" + log.read_text()[-3000:]
            time.sleep(0.25)
        else:
            pytest.fail("the study made no progress")
    finally:
        kill_session(proc.pid)
        proc.wait()
    killed = tables(study)[0]
    assert len(killed) < 2 or (killed.status == "RUNNING").any(), "killed too late to test resuming"

    run(cmd + ["--resume"], tmp, pg["env"])
    trials, epochs = tables(study)
    assert len(trials) == 2 and trials.trial_id.is_unique and set(trials.status) <= set(STATES), trials
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    by_id = optuna_trials(pg["url"], "second")
    assert set(by_id) == set(trials.trial_id)
    for row in trials.itertuples():
        assert by_id[row.trial_id].state.name == STATES[row.status], (row.trial_id, row.status)
        assert sorted(by_id[row.trial_id].intermediate_values) == list(range(1, row.epochs_run + 1))
    check_intermediate_values(by_id, epochs)

    # Kept apart: each Optuna study holds its own trials only, and the second left the first untouched.
    assert {"smoke", "second"} <= set(optuna.get_all_study_names(pg["url"]))
    first = {tid: (t.state, t.intermediate_values) for tid, t in optuna_trials(pg["url"], "smoke").items()}
    assert first == smoke["optuna"] and not set(first) & set(by_id)


def test_no_password_in_the_environment_is_a_clear_error(pg, tmp_path, cache_dir):
    """Without PGPASSWORD the study stops before Ray starts: exit 2, one line naming the fix, nothing written."""
    env = python_env(PGPASSFILE=str(tmp_path / "no-pgpass"))
    env.pop("PGPASSWORD", None)
    p = subprocess.run(study_cmd(tmp_path / "studies", cache_dir, pg["url"]), cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "error: --optuna-storage" in p.stderr and "PGPASSWORD" in p.stderr
    assert not (tmp_path / "studies" / "smoke" / "study.json").exists()


@pytest.mark.parametrize("where", ["query", "user-info", "user-info with @"])
def test_a_password_anywhere_in_the_url_is_never_shown(pg, where, tmp_path, cache_dir, monkeypatch):
    """The real server takes a password from the URL's query or user-info; a wrong one is refused in one line
    that shows neither it nor the right one, and what study.json would keep holds no password."""
    from study.cli import UsageError
    from study.driver.checks import check_optuna_url, without_password

    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
    base, right, wrong = pg["url"], pg["password"], "Wr0ng@PW" if where == "user-info with @" else "Wr0ngPW"

    def url(password: str) -> str:
        if where == "query":
            return f"{base}&password={password}"
        return base.replace(f"{ROLE}@", f"{ROLE}:{password}@")

    if where != "user-info with @":
        check_optuna_url(url(right))   # the server takes it
        assert right not in without_password(url(right))
    with pytest.raises(UsageError) as e:
        check_optuna_url(url(wrong))
    assert wrong not in str(e.value) and right not in str(e.value) and "\n" not in str(e.value)
    assert ("unencoded '@'" if "@" in wrong else "password authentication failed") in str(e.value)
    # Through the command line: exit 2, the same one line, nothing written.
    env = python_env(PGPASSFILE=str(tmp_path / "no-pgpass"))
    env.pop("PGPASSWORD", None)
    p = subprocess.run(study_cmd(tmp_path / "studies", cache_dir, url(wrong)), cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and wrong not in p.stderr + p.stdout and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "studies").exists()
