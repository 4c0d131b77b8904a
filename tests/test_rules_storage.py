"""The storage rule and the address rule: every --storage (and study.info/colorize location) is parsed once
into a local folder or a URL pyarrow opens, and probed in a child process with a timeout; every --address is
reached with a timeout. Over tables of values, with real pyarrow, a real S3 server (moto) and real sockets."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest
from conftest import PYTHON, python_env, shell_signals

from study.cli import UsageError
from study.driver.checks import check_address, check_storage, check_storage_url, probe_storage

SECRET = "Zq7xW"

KINDS = [("studies", "local"), ("/abs/studies", "local"), ("./s3:bucket", "local"), ("C:studies", "local"),
         ("s3://bucket/prefix", "s3"), ("S3://bucket", "s3"), ("gs://bucket/p", "gs"), ("hdfs://host:8020/p", "hdfs"),
         ("abfs://container@account.dfs.core.windows.net/p", "abfs"),
         ("s3://bucket/p?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1", "s3")]

REFUSED = [("", r"'': empty"), ("   ", r"empty"), ("st\tx", r"control character"),
           ("file:///tmp/x", r"plain path"), ("s3:bucket", r"without '//'"), ("s3://", r"no bucket after s3://"),
           ("s3:///x", r"no bucket"), ("ftp://h/x", r"ftp:// is not a storage"), ("http://h/x", r"not a storage"),
           ("s3://b[/x", r"cannot be read as a URL"),
           (f"s3://AKIAX:{SECRET}@bucket/x", r"holds credentials"), (f"s3://b/x?secret_key={SECRET}", r"holds credentials"),
           (f"s3://b/x?session_token={SECRET}", r"holds credentials"), (f"gs://b/x?access_token={SECRET}", r"credentials")]


@pytest.mark.parametrize("value, kind", KINDS)
def test_each_storage_is_parsed_into_one_kind(value, kind):
    assert check_storage_url(value) == kind


@pytest.mark.parametrize("value, match", REFUSED)
def test_anything_else_is_one_message_without_its_secret(value, match):
    with pytest.raises(UsageError, match=match) as e:
        check_storage_url(value)
    assert SECRET not in str(e.value) and "\n" not in str(e.value)


def test_a_local_storage_must_be_writable_and_a_study_name_an_argument(tmp_path):
    check_storage(str(tmp_path / "studies"), str(tmp_path / "studies" / "a"))   # made later: fine
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_storage(str(tmp_path / "afile" / "s"), str(tmp_path / "afile" / "s" / "a"))
    with pytest.raises(UsageError, match="cannot start with '-'"):
        check_storage(str(tmp_path), str(tmp_path / "-x"))   # a default name from a space called -x
    check_storage(str(tmp_path / "afile"), str(tmp_path / "afile"), write=False)   # read-only: no write probe


# ------------------------------------------------------------------ probes on real stores


@pytest.fixture(scope="module")
def s3_servers():
    """Two moto S3 servers in processes of their own: one open (with a bucket), one refusing every key."""
    pytest.importorskip("moto")
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    code = ("import sys, time; from moto.server import ThreadedMotoServer; "
            "s = ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False); s.start(); "
            "time.sleep(3600)")
    procs = [subprocess.Popen([PYTHON, "-c", code, str(port)], env=python_env(**env), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
             for port, env in zip(ports, ({}, {"INITIAL_NO_AUTH_ACTION_COUNT": "0"}))]
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for port in ports:
            deadline = time.monotonic() + 60
            while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
                assert time.monotonic() < deadline, "moto did not start"
                time.sleep(0.2)
        import pyarrow.fs as pafs
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{ports[0]}", scheme="http", region="us-east-1",
                          allow_bucket_creation=True).create_dir("bucket")
        yield [f"endpoint_override=127.0.0.1:{p}&scheme=http&region=us-east-1" for p in ports]
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_s3_probes_tell_an_open_bucket_from_a_missing_or_forbidden_one(s3_servers):
    open_q, forbidden_q = s3_servers
    check_storage(f"s3://bucket/studies?{open_q}", f"s3://bucket/studies/a?{open_q}")   # fine, and writes nothing
    import pyarrow.fs as pafs
    fs = pafs.S3FileSystem(endpoint_override=open_q.split("&")[0].split("=")[1], scheme="http", region="us-east-1")
    assert fs.get_file_info(pafs.FileSelector("bucket", recursive=True)) == []
    cases = [(f"s3://nobucket/studies?{open_q}", r"the bucket 'nobucket' does not exist"),
             (f"s3://bucket/studies?{forbidden_q}", r"ACCESS_DENIED|InvalidAccessKeyId|Forbidden"),
             (f"s3://bucket/studies?{open_q}&bogus=1", r"query parameter")]
    for storage, match in cases:
        with pytest.raises(UsageError, match=match):
            check_storage(storage, storage.replace("studies", "studies/a"))


def test_unusable_schemes_and_hung_stores_are_one_message_within_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(UsageError, match=r"hdfs://nohost:1/x: (cannot be opened|no answer within)"):
        check_storage("hdfs://nohost:1/x", "hdfs://nohost:1/x/a")
    # gs:// without credentials waits for a cloud metadata server: the child is killed at the timeout.
    with pytest.raises(UsageError, match=r"gs://colorize-none/x: (no answer within 3 s|cannot be opened)"):
        probe_storage("gs://colorize-none/x", "gs://colorize-none/x/a", timeout_s=3)
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("sig, status, line", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, "terminated")])
def test_a_signal_stops_a_probe_at_once(sig, status, line, tmp_path):
    """study.info on a gs:// study waits on the probe; Ctrl-C or SIGTERM ends it at once, with one line."""
    p = subprocess.Popen([PYTHON, "-m", "study.info", "gs://colorize-none/x"], cwd=tmp_path, env=python_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=shell_signals)
    time.sleep(4)   # imports done, the probe under way
    assert p.poll() is None, p.communicate()
    t0 = time.monotonic()
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    assert time.monotonic() - t0 < 10
    assert p.returncode == status and err.strip().splitlines() == [err.strip()] and line in err, err


# ------------------------------------------------------------------ --address


def test_addresses_nothing_answers_at_are_refused_quickly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]   # closed again: nothing listens there
    cases = [(f"ray://127.0.0.1:{free}", r"nothing answers at 127\.0\.0\.1:\d+ \(Connection refused\)"),
             (f"127.0.0.1:{free}", r"nothing answers"), (f"ray://[::1]:{free}", r"nothing answers at ::1"),
             ("http://127.0.0.1:8265", r"Jobs API that python -m study.submit takes"),
             ("localhost", r"no port"), ("ray://h:99999", r"no port|not a Ray cluster address"),
             (f"ray://u:{SECRET}@127.0.0.1:1", r"not a Ray cluster address"), ("a b", r"not a Ray cluster address")]
    for address, match in cases:
        t0 = time.monotonic()
        with pytest.raises(UsageError, match=match) as e:
            check_address(address)
        assert time.monotonic() - t0 < 10 and SECRET not in str(e.value)


def test_an_address_something_listens_at_passes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        check_address(f"ray://127.0.0.1:{port}")
        check_address(f"127.0.0.1:{port}")
    for left_to_ray in (None, "auto", "local"):
        check_address(left_to_ray)


def test_study_info_reads_a_study_url_under_the_same_rule(tmp_path):
    done = subprocess.run([PYTHON, "-m", "study.info", f"s3://AKIAX:{SECRET}@b/x"], cwd=tmp_path, env=python_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "holds credentials" in done.stderr and SECRET not in done.stderr
