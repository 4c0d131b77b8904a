"""The driver's guards: one driver per study (study.driver.lock, local and s3://), Ray pickles on --resume,
Optuna URLs (relative SQLite, passwords), and a study that never started not using its name up."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest
import yaml
from conftest import PYTHON, python_env

from study.cli import UsageError
from study.driver import lock
from study.driver.checks import check_pickles, masked, runtime_url, without_password


def _record(**changes) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": "other", "started_at": "earlier",
            "heartbeat": time.time(), "heartbeat_s": 15, **changes}


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------ the lock


def test_second_driver_is_refused_and_the_lock_goes_with_the_first(tmp_path):
    root = str(tmp_path / "study")
    notes = []
    first = lock.StudyLock(root, heartbeat_s=0.25, log=notes.append).acquire()
    path = tmp_path / "study" / lock.LOCK_FILE
    written = json.loads(path.read_text())
    assert written["pid"] == os.getpid() and written["token"] == first.token
    with pytest.raises(lock.LockError, match=r"being run by another driver pid \d+ on .*wait for it to end"):
        lock.StudyLock(root).acquire()
    assert lock.holder(root)["token"] == first.token
    time.sleep(0.7)   # the heartbeat thread keeps the record fresh
    assert json.loads(path.read_text())["heartbeat"] > written["heartbeat"]
    first.release()
    assert not path.exists() and lock.holder(root) is None and not notes
    with lock.StudyLock(root):   # free again
        assert path.exists()
    assert not path.exists()


@pytest.mark.parametrize("record,reason", [
    (lambda: _record(host="another-host", heartbeat=time.time() - 3600), r"last heartbeat is \d+ s old"),
    (lambda: _record(pid=_dead_pid()), r"process \d+ on this host is gone"),
    (lambda: None, r"unreadable"),
])
def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, record, reason):
    root = tmp_path / "study"
    root.mkdir()
    rec = record()
    (root / lock.LOCK_FILE).write_text("{half a rec" if rec is None else json.dumps(rec))
    notes = []
    with lock.StudyLock(str(root), log=notes.append) as mine:
        assert json.loads((root / lock.LOCK_FILE).read_text())["token"] == mine.token
    assert len(notes) == 1 and "taking over a stale lock" in notes[0]
    assert __import__("re").search(reason, notes[0]), notes


def test_a_live_lock_on_another_host_is_respected(tmp_path):
    root = tmp_path / "study"
    root.mkdir()
    (root / lock.LOCK_FILE).write_text(json.dumps(_record(host="another-host", pid=1)))
    with pytest.raises(lock.LockError, match="pid 1 on another-host"):
        lock.StudyLock(str(root)).acquire()


def test_lock_on_s3(monkeypatch):
    server = pytest.importorskip("moto.server").ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        import pyarrow.fs as pafs
        host, port = server.get_host_and_port()
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(k, v)
        query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        s3 = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                               allow_bucket_creation=True)
        s3.create_dir("bucket")
        monkeypatch.setattr(lock, "SETTLE_S", 0.05)
        root = f"s3://bucket/studies/a?{query}"
        with lock.StudyLock(root, heartbeat_s=2) as first:
            assert s3.get_file_info(f"bucket/studies/a/{lock.LOCK_FILE}").type == pafs.FileType.File
            with pytest.raises(lock.LockError, match="being run by another driver"):
                lock.StudyLock(root).acquire()
            assert lock.holder(root)["token"] == first.token
        assert s3.get_file_info(f"bucket/studies/a/{lock.LOCK_FILE}").type == pafs.FileType.NotFound
    finally:
        server.stop()


# ------------------------------------------------------------------ Ray's pickles on --resume


def test_resume_refuses_pickles_others_could_change(tmp_path):
    study = tmp_path / "study"
    (study / "trial-1").mkdir(parents=True)
    pkl = study / "tuner.pkl"
    pkl.write_bytes(b"x")
    nested = study / "trial-1" / "params.pkl"
    nested.write_bytes(b"x")
    for p in (pkl, nested):
        p.chmod(0o644)
    check_pickles(str(study))   # the user's own, not writable by others: fine
    nested.chmod(0o646)
    with pytest.raises(UsageError, match=r"params\.pkl is writable by others.*chmod -R go-w"):
        check_pickles(str(study))
    nested.chmod(0o664)   # group-writable by the user's own group (umask 002): fine
    check_pickles(str(study))
    nested.chmod(0o644)
    if os.geteuid() == 0:   # only root can give a file away
        study.chmod(0o775)
        os.chown(study, -1, 4243)   # a shared group could tamper
        with pytest.raises(UsageError, match=r"study is writable by group \(gid 4243\)"):
            check_pickles(str(study))
        os.chown(study, -1, os.getegid())
        study.chmod(0o755)
        os.chown(pkl, 4242, -1)
        with pytest.raises(UsageError, match=r"tuner\.pkl is owned by uid 4242, not you"):
            check_pickles(str(study))
        os.chown(pkl, 0, -1)
    pkl.unlink()
    pkl.symlink_to(nested)
    with pytest.raises(UsageError, match=r"tuner\.pkl is a symbolic link"):
        check_pickles(str(study))


# ------------------------------------------------------------------ Optuna URLs


def test_passwords_are_masked_for_output_and_dropped_for_files():
    url = "postgresql://user:S3cret@db.example:5432/studies?sslmode=require"
    assert masked(url) == "postgresql://user:***@db.example:5432/studies?sslmode=require"
    assert without_password(url) == "postgresql://user@db.example:5432/studies?sslmode=require"
    assert "S3cret" not in masked("postgresql://user:S3cret@host:99x/db")   # even when it does not parse
    # On --resume the URL given again supplies the password (in memory only); another database is refused.
    assert runtime_url(without_password(url), "/s/a", url) == url
    with pytest.raises(UsageError, match=r"is not the study's \(postgresql://user@db.example"):
        runtime_url(without_password(url), "/s/a", "postgresql://user:S3cret@elsewhere/studies")
    assert runtime_url(without_password(url), "/s/a", None) == without_password(url)  # libpq: $PGPASSWORD


def test_default_sqlite_is_resolved_in_the_study_folder_where_it_is_now(tmp_path):
    assert runtime_url("sqlite:///optuna.db", str(tmp_path / "copy" / "a"), None) == \
        f"sqlite:///{tmp_path / 'copy' / 'a' / 'optuna.db'}"
    assert runtime_url("sqlite:////abs/elsewhere.db", str(tmp_path / "a"), None) == "sqlite:////abs/elsewhere.db"


# ------------------------------------------------------------------ a real study


def test_a_study_that_never_started_can_start_and_its_record_keeps_no_machine_path(tmp_path, cache_dir):
    """A driver that died before its first trial left study.json, optuna.db and its lock: the name is not
    used up, and the study starts without --resume."""
    space = {"sampler": {"name": "random"}, "num_samples": 2, "max_concurrent": 2,
             "resources": {"cpu": 1, "gpu": 0},
             "params": {"dataset": "samples", "depth": 2, "base_filters": 4, "epochs": 1, "train_limit": 64,
                        "eval_limit": 32, "preview_count": 1, "lr": {"loguniform": [3.0e-4, 3.0e-3]}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(space))
    root = tmp_path / "st" / "tiny"
    root.mkdir(parents=True)
    (root / "optuna.db").write_bytes(b"")
    (root / "study.json").write_text(json.dumps({"name": "tiny", "space": "tiny", "num_samples": 99}))
    (root / lock.LOCK_FILE).write_text(json.dumps(_record(pid=_dead_pid(), heartbeat=time.time())))
    p = subprocess.run([PYTHON, "-m", "study.run", "--space", "tiny.yaml", "--storage", "st", "--cache-dir",
                        str(cache_dir), "--num-cpus", "2"], cwd=tmp_path, env=python_env(), capture_output=True,
                       text=True, timeout=400)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert "taking over a stale lock" in p.stdout and "is gone" in p.stdout
    assert "never started a trial; starting it afresh" in p.stdout
    meta = json.loads((root / "study.json").read_text())
    assert meta["optuna_storage"] == "sqlite:///optuna.db" and meta["pack"] == 1 and meta["num_samples"] == 2
    assert not (root / lock.LOCK_FILE).exists()
    again = subprocess.run([PYTHON, "-m", "study.run", "--space", "tiny.yaml", "--storage", "st"], cwd=tmp_path,
                           env=python_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr
