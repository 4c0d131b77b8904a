"""How Tune's saved state reaches the study folder (study.tune.upload): only files changed since they were sent,
each whole, Tune's experiment state last; and a driver killed while it copies leaves no file cut short, where
Ray's own copy does."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.fs as pafs

from study.tune.upload import ChangedFiles
from test_cluster import BUCKET, s3  # noqa: F401 - the moto S3 fixture


def staging(root: Path) -> Path:
    """A driver staging folder as Tune 2.60 leaves it: its state files and two trials' log files."""
    for rel, body in {"experiment_state-2026.json": "{}", "search_gen_state-2026.json": "g",
                      "searcher-state-2026.pkl": "s", "tuner.pkl": "t",
                      "t1/result.json": "r1\n", "t1/params.json": "{}", "t2/result.json": "r2\n",
                      ".tmp_search_generator_ckpt": "Tune's temporary"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(body)
    return root


def tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def send(up: ChangedFiles, local: Path, fs, dest) -> int:
    return up.prepare(str(local))(fs, str(dest))


def test_only_changed_trial_files_are_sent_again(tmp_path):
    local, dest = staging(tmp_path / "staging"), tmp_path / "study"
    up = ChangedFiles()
    fs = pafs.LocalFileSystem()
    assert send(up, local, fs, dest) == 7
    expected = {k: v for k, v in tree(local).items() if not k.startswith(".tmp")}
    assert tree(dest) == expected
    # The study's own state (the top level) is sent each time, a trial's files only when they changed.
    assert send(up, local, fs, dest) == 4
    with open(local / "t1" / "result.json", "a") as f:
        f.write("r1 again\n")
    (local / "t3").mkdir()
    (local / "t3" / "result.json").write_text("r3\n")
    (local / "searcher-state-2026.pkl").write_text("s2")
    assert send(up, local, fs, dest) == 6
    assert tree(dest) == {k: v for k, v in tree(local).items() if not k.startswith(".tmp")}
    # A trial file replaced by another of the same size within the clock's tick: a new inode, sent again.
    os.replace(_write(tmp_path / "other", "r2\n"), local / "t2" / "result.json")
    assert send(up, local, fs, dest) == 5
    assert send(ChangedFiles(), local, fs, dest) == 8   # a new run sends everything once


def test_an_ended_trials_files_are_sent_once_more_then_never_looked_at(tmp_path):
    local, dest = staging(tmp_path / "staging"), tmp_path / "study"
    up, fs = ChangedFiles(), pafs.LocalFileSystem()
    assert send(up, local, fs, dest) == 7
    up.ended("t1")
    with open(local / "t1" / "result.json", "a") as f:   # its last result, written as it ended
        f.write("r1 last\n")
    assert send(up, local, fs, dest) == 5 and (dest / "t1" / "result.json").read_text() == "r1\nr1 last\n"
    for trial in ("t1", "t2"):
        with open(local / trial / "result.json", "a") as f:
            f.write("more\n")
    assert send(up, local, fs, dest) == 5   # t2's, and the state files
    assert (dest / "t1" / "result.json").read_text() == "r1\nr1 last\n"
    assert (dest / "t2" / "result.json").read_text() == "r2\nmore\n"


def test_an_earlier_runs_state_files_are_sent_once(tmp_path):
    local, dest = staging(tmp_path / "staging"), tmp_path / "study"
    old = local / "experiment_state-2025.json"   # a resumed study's staging folder holds every run's
    old.write_text('{"earlier": 1}')
    hours_ago = time.time() - 7200
    os.utime(old, (hours_ago, hours_ago))
    up, fs = ChangedFiles(), pafs.LocalFileSystem()
    assert send(up, local, fs, dest) == 8
    assert send(up, local, fs, dest) == 4   # this run's four, not the earlier one
    assert (dest / "experiment_state-2025.json").read_text() == '{"earlier": 1}'


def test_state_files_are_sent_as_the_save_left_them(tmp_path):
    # Tune writes its experiment state in place, and its copy of one save runs beside the next save: what is
    # sent is what the save had written when the copy was asked for, not what the next is writing.
    local, dest = staging(tmp_path / "staging"), tmp_path / "study"
    (local / "experiment_state-2026.json").write_text('{"trial_data": [1, 2]}')
    send_later = ChangedFiles().prepare(str(local))
    (local / "experiment_state-2026.json").write_text('{"trial_data": [1, 2, 3], "runner_da')   # half written
    send_later(pafs.LocalFileSystem(), str(dest))
    assert (dest / "experiment_state-2026.json").read_text() == '{"trial_data": [1, 2]}'


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_tunes_experiment_state_goes_after_the_searchers_files():
    names = ["experiment_state-2026.json", "searcher-state-2026.pkl", "search_gen_state-2026.json", "tuner.pkl"]
    assert sorted(names, key=ChangedFiles(last="experiment_state-*.json").goes_last) == [
        "search_gen_state-2026.json", "searcher-state-2026.pkl", "tuner.pkl", "experiment_state-2026.json"]


def test_on_an_object_store_too(s3):  # noqa: F811 - the fixture
    local = staging(Path(os.environ.get("TMPDIR", "/tmp")) / f"upload-{os.getpid()}-{time.monotonic_ns()}")
    fs = pafs.S3FileSystem(endpoint_override=s3["endpoint"].split("//")[1], scheme="http", region="us-east-1",
                           access_key="testing", secret_key="testing")
    up = ChangedFiles()
    assert up.prepare(str(local))(fs, f"{BUCKET}/up/exp") == 7
    listed = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="up/exp/")["Contents"]
    assert sorted(o["Key"][len("up/exp/"):] for o in listed) == sorted(k for k in tree(local) if not k.startswith("."))
    assert up.prepare(str(local))(fs, f"{BUCKET}/up/exp") == 4


# A copier, killed at some point of its copy of files of two versions A and B, in a process of its own.
COPIER = textwrap.dedent("""
    import sys
    import pyarrow.fs as pafs
    how, local, dest = sys.argv[1:]
    if how == "ours":
        from study.tune.upload import ChangedFiles
        copy = lambda: ChangedFiles(last="experiment_state-*.json").prepare(local)(pafs.LocalFileSystem(), dest)
    else:   # Ray 2.60's own copy of the staging folder (ray.train._internal.storage._upload_to_fs_path)
        copy = lambda: pafs.copy_files(local, dest, destination_filesystem=pafs.LocalFileSystem(),
                                       chunk_size=64 * 1024 * 1024)
    print("ready", flush=True)
    while True:
        copy()
""")


def cut_files_after_kills(how: str, tmp_path: Path, kills: int) -> int:
    """Kill a copier of two versions of 8 MB files ``kills`` times mid-copy; how many files were left cut."""
    versions = [staging(tmp_path / f"v{i}") for i in range(2)]
    for i, v in enumerate(versions):
        for name in ("experiment_state-2026.json", "search_gen_state-2026.json", "t1/result.json"):
            (v / name).write_bytes(bytes([65 + i]) * (8 << 20))
    dest = tmp_path / "study"
    cut = 0
    for k in range(kills):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        p = subprocess.Popen([sys.executable, "-c", COPIER, how, str(versions[k % 2]), str(dest)],
                             stdout=subprocess.PIPE, text=True, env=env)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.029 * k)   # somewhere in a copy of ~24 MB
        p.send_signal(signal.SIGKILL)
        p.wait()
        for name in ("experiment_state-2026.json", "search_gen_state-2026.json", "t1/result.json"):
            path = dest / name
            if path.exists():
                cut += path.stat().st_size != 8 << 20
    return cut


def test_a_copier_killed_mid_copy_leaves_each_file_whole(tmp_path):
    assert cut_files_after_kills("ours", tmp_path / "ours", 6) == 0
    # The same kills in Ray's own copy leave files cut short (what made a resume fail before).
    assert cut_files_after_kills("ray", tmp_path / "ray", 6) > 0


def test_the_state_copy_benchmark_smoke(tmp_path):
    out_file = tmp_path / "copy.json"
    p = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "scripts" / "bench_state_copy.py"),
                        "--trials", "20", "--running", "3", "--json", str(out_file)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert out == json.loads(out_file.read_text())
    assert out["files"] == 20 * 5 + 4 and out["study_files_sent"] == 3 + 4   # the running trials' logs, the state
    assert out["ray_copy_s"] > 0 and out["study_copy_s"] > 0
    bad = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "scripts" / "bench_state_copy.py"),
                          "--trials", "5", "--running", "9"], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("bench_state_copy.py: error:")
