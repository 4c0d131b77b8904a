"""The results writer's costs and crashes, shown by counting, not timing: the trials file is written on a
cadence (not per change), readers open a few parts (not a file per epoch), a writer killed mid-burst
loses nothing and duplicates nothing on a local disk, an object store loses at most the stated window,
and studies of earlier layouts still read and resume."""
from __future__ import annotations

import collections
import io
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import PYTHON, python_env
from test_cluster import BUCKET, s3  # noqa: F401 - the moto S3 fixture

from study.results.contract import EPOCH_METRICS
from study.results.files import schema
from study.results.parts import FANOUT
from study.results.store import ResultsWriteError, ResultsWriter, epoch_row, read_table, trial_row

TESTS = Path(__file__).resolve().parent
CONFIG = {"dataset": "samples", "resolution": 32, "sampling": "maxpool-upsample", "output": "uv", "lr": 1e-3}


def metrics(epoch: int, value: float) -> dict:
    return {"epoch": epoch, **{m: value for m in EPOCH_METRICS}, "seconds": 1.0, "precision": "fp32"}


class Counting(pafs.FileSystemHandler):
    """A local disk that counts the files opened for reading and for writing, by path."""

    def __init__(self):
        self.fs = pafs.LocalFileSystem()
        self.reads: collections.Counter = collections.Counter()
        self.writes: collections.Counter = collections.Counter()

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("not here")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        self.reads[path] += 1
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        self.reads[path] += 1
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        self.writes[path] += 1
        return self.fs.open_output_stream(path)

    def open_append_stream(self, path, metadata):
        self.writes[path] += 1
        return self.fs.open_append_stream(path)


def report(writer: ResultsWriter, n: int, epochs: int = 5) -> None:
    """A trial's life as the driver reports it: each epoch's row and trials row, then its end."""
    tid, history = f"t{n:04d}", []
    for e in range(1, epochs + 1):
        history.append(epoch_row(tid, metrics(e, 20.0 + e)))
        writer.add_epochs(tid, history[-1:])
        writer.stage("trials", [trial_row(tid, CONFIG, "RUNNING", history)])
    writer.stage("trials", [trial_row(tid, CONFIG, "DONE", history)])


def test_the_trials_file_is_written_on_a_cadence_not_per_change(tmp_path):
    counting = Counting()
    fs = pafs.PyFileSystem(counting)
    trials = f"{tmp_path}/results/trials.parquet"
    w = ResultsWriter(str(tmp_path), filesystem=fs, interval_s=3600)
    for n in range(50):   # 550 changes
        report(w, n)
    # The first change (an epoch) was written at once, with no trials row yet; the rest waits for the cadence.
    # (Not being a local disk, this filesystem gets the journal as a segment per trial end.)
    tables = [p for p in counting.writes if "/_journal/" not in p]
    assert counting.writes[trials] == 0 and len(tables) == 2   # epochs' and previews' first part
    assert len(counting.writes) - len(tables) == 50
    assert len(read_table(str(tmp_path), "trials", filesystem=fs)) == 50   # the journal has them meanwhile
    w.flush()
    assert counting.writes[trials] == 1
    w.flush()   # nothing new: nothing written
    assert counting.writes[trials] == 1
    # With a cadence of 0 s the writer still spaces its writes by ~20x what one took: far fewer than changes.
    w = ResultsWriter(str(tmp_path), filesystem=fs, interval_s=0)
    before = sum(counting.writes.values())
    for n in range(50, 100):
        report(w, n)
    w.close()
    assert sum(counting.writes.values()) - before < 550 / 2
    assert pd.read_parquet(trials).status.eq("DONE").sum() == 100


def test_readers_open_a_few_parts_however_many_epochs(tmp_path):
    counting = Counting()
    fs = pafs.PyFileSystem(counting)
    w = ResultsWriter(str(tmp_path), filesystem=fs)
    for n in range(80):
        for e in range(1, 6):   # the worst case: the table written after every epoch (400 writes)
            w.add_epochs(f"t{n:03d}", [epoch_row(f"t{n:03d}", metrics(e, 20.0))])
            w.flush()
    w.close()
    parts = sorted(os.listdir(tmp_path / "results/epochs.parquet"))
    levels = 3   # 8**3 > 401 writes
    assert len(parts) <= (FANOUT - 1) * levels + 1, parts
    counting.reads.clear()
    epochs = read_table(str(tmp_path), "epochs", filesystem=fs)
    assert len(epochs) == 400 and not epochs.duplicated(["trial_id", "epoch"]).any()
    opened = [p for p in counting.reads if "/epochs.parquet/" in p]
    assert sorted(Path(p).name for p in opened) == parts and max(counting.reads.values()) == 1
    counting.reads.clear()
    w = ResultsWriter(str(tmp_path), filesystem=fs)   # what --resume opens: the parts, not 400 files
    assert len([p for p in counting.reads if "/epochs.parquet/" in p]) == len(parts)
    assert [r["epoch"] for r in w.history("t079")] == [1, 2, 3, 4, 5]


def _model(ops: list[tuple]) -> tuple[dict, dict, set]:
    """What the tables hold after ``ops``: epochs {(trial, epoch): value}, trials {trial: (status, epochs_run)},
    previews {(trial, epoch)}."""
    epochs: dict = {}
    trials: dict = {}
    previews: set = set()
    for op in ops:
        if op[0] == "epoch":
            epochs[op[1], op[2]] = op[3]
        elif op[0] == "preview":
            previews.add((op[1], op[2]))
        elif op[0] == "drop":
            epochs = {k: v for k, v in epochs.items() if not (k[0] == op[1] and k[1] > op[2])}
            previews = {k for k in previews if not (k[0] == op[1] and k[1] > op[2])}
        else:
            trials[op[1]] = (op[2], op[3])
    return epochs, trials, previews


def burst_ops(trials: int, seed: int = 0) -> list[tuple]:
    """A study's changes: epochs, trials rows, previews at some epochs, and restored trials that drop
    their last epochs and run them again (with other values)."""
    rng = random.Random(seed)
    ops: list[tuple] = []
    for n in range(trials):
        tid = f"t{n:03d}"
        for e in range(1, 6):
            ops += [("epoch", tid, e, 20.0 + e), ("trial", tid, "RUNNING", e)]
            if e % 2:
                ops.append(("preview", tid, e))
        if rng.random() < 0.3:
            back = rng.randint(1, 4)
            ops += [("drop", tid, back), ("trial", tid, "RUNNING", back)]
            for e in range(back + 1, 6):
                ops += [("epoch", tid, e, 30.0 + e), ("trial", tid, "RUNNING", e)]
                if e % 2:
                    ops.append(("preview", tid, e))
        ops.append(("trial", tid, "DONE", 5))
    return ops


def apply(writer: ResultsWriter, op: tuple) -> None:
    if op[0] == "epoch":
        writer.add_epochs(op[1], [epoch_row(op[1], metrics(op[2], op[3]))])
    elif op[0] == "preview":
        writer.add_previews([{"trial_id": op[1], "dataset": "samples", "resolution": 32, "epoch": op[2],
                              "image_index": 0, "kind": "prediction", "png": f"png {op}".encode()}])
    elif op[0] == "drop":
        writer.drop_epochs_after(op[1], op[2])
    else:
        epochs_run = op[3]
        writer.stage("trials", [trial_row(op[1], CONFIG, op[2], [metrics(e, 20.0) for e in range(1, epochs_run + 1)])])


def run_burst(study: str, trials: int, mode: str) -> None:
    """The child of the crash test: apply the burst, printing each change's number once it is made.
    ``mode``: "flush" writes the tables after every change, "journal" never (the first change aside),
    "thread" as often as the writing thread can."""
    w = ResultsWriter(study, interval_s={"flush": 5, "journal": 3600, "thread": 0}[mode])
    for i, op in enumerate(burst_ops(trials)):
        apply(w, op)
        if mode == "flush":
            w.flush()
        else:   # slow enough to be killed mid-burst, and for the writing thread to write many times
            time.sleep(0.002 if mode == "journal" else 0.01)
        print(i, flush=True)
    w.close()
    print("end", flush=True)


def state(study: Path, plain: bool = False) -> tuple[dict, dict, set]:
    """The tables' contents (``plain``: as pandas alone reads the files), checking one row per key."""
    def table(name):
        return pd.read_parquet(study / f"results/{name}.parquet") if plain else read_table(str(study), name)
    epochs, trials, previews = table("epochs"), table("trials"), table("previews")
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert not trials.trial_id.duplicated().any()
    assert not previews.duplicated(["trial_id", "epoch", "image_index"]).any()
    return ({(r.trial_id, r.epoch): r.val_psnr for r in epochs.itertuples()},
            {r.trial_id: (r.status, r.epochs_run) for r in trials.itertuples()},
            {(r.trial_id, r.epoch) for r in previews.itertuples()})


@pytest.mark.parametrize(("mode", "kill_after"), [("flush", 3), ("flush", 40), ("flush", 150), ("journal", 120),
                                                 ("thread", 60), ("thread", 200)])
def test_a_writer_killed_mid_burst_loses_and_duplicates_nothing(tmp_path, mode, kill_after):
    """SIGKILL while it writes (the tables written after every change, or by the writing thread, so the kill
    lands mid-write) or while changes wait in the journal: every change it reported made is there, once;
    reopening writes them, and carrying on (a restored trial reporting again) ends with the whole study, one
    row per key."""
    trials = 20
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); from test_results_store import run_burst; "
            f"run_burst({str(tmp_path)!r}, {trials}, {mode!r})")
    child = subprocess.Popen([PYTHON, "-c", code], stdout=subprocess.PIPE, text=True, env=python_env())
    done = -1
    for line in child.stdout:
        if line.strip() != "end":
            done = int(line)
        if done >= kill_after:
            break
    child.send_signal(signal.SIGKILL)
    rest = child.stdout.read().split()
    child.wait(timeout=60)
    done = max([done, *(int(x) for x in rest if x != "end")])
    assert "end" not in rest, "the burst ended before the kill: kill earlier"
    ops = burst_ops(trials)
    # Everything up to the last change it reported, and maybe the one it made but had not reported yet.
    assert state(tmp_path) in (_model(ops[:done + 1]), _model(ops[:done + 2]))
    kept = state(tmp_path)
    w = ResultsWriter(str(tmp_path))   # --resume: the journal is replayed and written
    assert state(tmp_path, plain=True) == kept
    # The driver carries on: the change after the last reported one is made again (made twice: no matter).
    for op in ops[done + 1:]:
        apply(w, op)
    w.close()
    assert state(tmp_path, plain=True) == state(tmp_path) == _model(ops)
    assert not list((tmp_path / "results").rglob(".tmp-*"))


def test_random_changes_read_back_as_a_model_says_through_writes_merges_and_reopening(tmp_path):
    """A table of changes nobody picked: adds, replacements, drops and writes at random, checked after every
    write against a model, by a new writer too."""
    rng = random.Random(7)
    w = ResultsWriter(str(tmp_path), interval_s=3600)
    ops: list[tuple] = [("trial", "t00", "RUNNING", 0)]
    apply(w, ops[0])
    for step in range(400):
        tid = f"t{rng.randrange(12):02d}"
        roll = rng.random()
        op = (("drop", tid, rng.randrange(0, 6)) if roll < 0.1 else ("preview", tid, rng.randrange(1, 8))
              if roll < 0.25 else ("epoch", tid, rng.randrange(1, 8), round(rng.uniform(10, 40), 3)))
        ops.append(op)
        apply(w, op)
        if rng.random() < 0.3:
            w.flush()
            epochs, _, previews = _model(ops)
            assert state(tmp_path, plain=True)[0::2] == (epochs, previews), step
        if rng.random() < 0.05:
            w.close()
            w = ResultsWriter(str(tmp_path), interval_s=3600)
            assert {(k[0], k[1]) for k in _model(ops)[0]} == {(t, r["epoch"]) for t in {o[1] for o in ops}
                                                               for r in w.history(t)}
    w.close()
    epochs, _, previews = _model(ops)
    assert state(tmp_path)[0::2] == state(tmp_path, plain=True)[0::2] == (epochs, previews)


def test_on_an_object_store_a_crash_loses_at_most_what_the_window_says(s3):  # noqa: F811 - the fixture
    study = f"s3://{BUCKET}/studies/window?{s3['query']}"
    w = ResultsWriter(study, interval_s=3600)
    report(w, 1)   # a whole trial: its end puts the journal at once
    tid, history = "t0002", []
    for e in (1, 2):   # a running trial's epochs: held in memory until the next write or trial end
        history.append(epoch_row(tid, metrics(e, 20.0)))
        w.add_epochs(tid, history[-1:])
        w.stage("trials", [trial_row(tid, CONFIG, "RUNNING", history)])
    seen = read_table(study, "epochs")
    assert set(seen.trial_id) == {"t0001"} and len(seen) == 5
    del w   # killed: what it held is gone
    w = ResultsWriter(study, interval_s=3600)
    assert read_table(study, "trials").set_index("trial_id").status.to_dict() == {"t0001": "DONE"}
    assert w.history("t0002") == []   # the window: re-reported by the restored trial, which runs them again
    report(w, 2)
    w.close()
    keys = {o["Key"] for o in s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="studies/window/")["Contents"]}
    assert not [k for k in keys if "/_journal/" in k and k.endswith(".jsonl")]   # written: the journal is empty
    parts = [k for k in keys if "/epochs.parquet/" in k]
    assert parts and all(Path(k).name.startswith("part-") for k in parts if not k.endswith("/"))
    fs, root = pafs.FileSystem.from_uri(study)
    plain = pq.read_table(f"{root}/results/epochs.parquet", filesystem=fs).to_pandas()
    assert sorted(zip(plain.trial_id, plain.epoch)) == [(f"t000{n}", e) for n in (1, 2) for e in range(1, 6)]


def _legacy_epoch_file(folder: Path, tid: str, epoch: int, value: float, columns: int | None = None) -> None:
    """A (trial, epoch) file as earlier versions wrote it (``columns``: the schema of a version before the
    last columns were added)."""
    s = schema("epochs")
    s = pa.schema(list(s)[:columns]) if columns else s
    row = {**epoch_row(tid, metrics(epoch, value)), "trial_id": tid}
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{f.name: row.get(f.name) for f in s}], schema=s), buf)
    (folder / f"t-{tid}-e{epoch:04d}.parquet").write_bytes(buf.getvalue())


def test_a_study_with_a_file_per_trial_and_epoch_reads_and_resumes(tmp_path):
    epochs_dir = tmp_path / "results/epochs.parquet"
    previews_dir = tmp_path / "results/previews.parquet"
    epochs_dir.mkdir(parents=True)
    previews_dir.mkdir()
    for tid in ("a", "b"):
        for e in (1, 2, 3):
            _legacy_epoch_file(epochs_dir, tid, e, 20.0 + e, columns=len(schema("epochs")) - 1 if e == 1 else None)
            pd.DataFrame([{"trial_id": tid, "dataset": "samples", "resolution": 32, "epoch": e, "image_index": 0,
                           "kind": "prediction", "png": b"old"}]).to_parquet(previews_dir / f"t-{tid}-e{e:04d}.parquet")
    pd.DataFrame([{"trial_id": "", "dataset": "samples", "resolution": 32, "epoch": 0, "image_index": 0,
                   "kind": "original", "png": b"o"}]).to_parquet(previews_dir / "o-samples-32.parquet")
    pd.DataFrame([trial_row(t, CONFIG, "RUNNING", [metrics(1, 20.0)]) for t in ("a", "b")]).to_parquet(
        tmp_path / "results/trials.parquet")
    assert len(read_table(str(tmp_path), "epochs")) == 6 and len(read_table(str(tmp_path), "previews")) == 7
    w = ResultsWriter(str(tmp_path))   # --resume: its epochs become a part
    assert [p.name for p in epochs_dir.iterdir()] == ["part-000001-000001.parquet"]
    assert w.has_originals("samples", 32) and [r["epoch"] for r in w.history("a")] == [1, 2, 3]
    assert pd.isna(w.history("a")[0]["precision"])   # a column its version did not have: missing
    w.drop_epochs_after("a", 1)   # restored from epoch 1: its previews' files of epochs 2 and 3 go
    w.add_epochs("a", [epoch_row("a", metrics(2, 99.0))])
    w.add_previews([{"trial_id": "a", "dataset": "samples", "resolution": 32, "epoch": 2, "image_index": 0,
                     "kind": "prediction", "png": b"new"}])
    w.close()
    assert not (previews_dir / "t-a-e0002.parquet").exists() and (previews_dir / "t-b-e0002.parquet").exists()
    epochs = pd.read_parquet(epochs_dir)
    assert sorted(zip(epochs.trial_id, epochs.epoch)) == [("a", 1), ("a", 2), ("b", 1), ("b", 2), ("b", 3)]
    assert epochs.set_index(["trial_id", "epoch"]).val_psnr[("a", 2)] == 99.0
    previews = read_table(str(tmp_path), "previews")
    assert previews.set_index(["trial_id", "epoch"]).png.to_dict() == {
        ("", 0): b"o", ("a", 1): b"old", ("a", 2): b"new", ("b", 1): b"old", ("b", 2): b"old", ("b", 3): b"old"}


def test_a_writer_cut_short_mid_merge_leaves_nothing_twice(tmp_path):
    """A merge writes the merged part, then deletes what it covers: killed between, readers and the next
    writer use the merged part alone."""
    w = ResultsWriter(str(tmp_path))
    for n in range(FANOUT - 1):
        w.add_epochs("t", [epoch_row("t", metrics(n + 1, 20.0))])
        w.flush()
    folder = tmp_path / "results/epochs.parquet"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    w.add_epochs("t", [epoch_row("t", metrics(FANOUT, 20.0))])
    w.close()
    assert [p.name for p in folder.iterdir()] == [f"part-000001-{FANOUT:06d}.parquet"]
    for name, data in before.items():   # the parts it covers, back as a killed writer would leave them
        (folder / name).write_bytes(data)
    assert len(read_table(str(tmp_path), "epochs")) == FANOUT
    ResultsWriter(str(tmp_path))
    assert [p.name for p in folder.iterdir()] == [f"part-000001-{FANOUT:06d}.parquet"]



def test_a_write_that_fails_in_the_writing_thread_stops_the_writer_and_the_journal_keeps_everything(tmp_path):
    w = ResultsWriter(str(tmp_path), interval_s=0)
    report(w, 1)   # the first change is written at once
    epochs_dir = tmp_path / "results/epochs.parquet"
    epochs_dir.rename(tmp_path / "results/moved")
    epochs_dir.write_bytes(b"in the way")   # the next part cannot be written (root too)
    with pytest.raises(ResultsWriteError, match="epochs.parquet") as first:
        for n in range(2, 2000):   # the write is the thread's: a later call raises its failure
            report(w, n)
            time.sleep(0.01)
    with pytest.raises(ResultsWriteError) as again:
        w.stage("trials", [trial_row("t9999", CONFIG, "RUNNING", [])])
    assert again.value is first.value
    with pytest.raises(ResultsWriteError):
        w.flush()
    epochs_dir.unlink()
    (tmp_path / "results/moved").rename(epochs_dir)
    w = ResultsWriter(str(tmp_path))   # --resume: the journal writes what the failed write did not
    w.close()
    trials = pd.read_parquet(tmp_path / "results/trials.parquet")
    done = set(trials.trial_id[trials.status == "DONE"])
    assert trials.trial_id.is_unique and len(done) >= 2   # every trial that ended before the failure was seen
    epochs = pd.read_parquet(epochs_dir)
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert epochs[epochs.trial_id.isin(done)].groupby("trial_id").epoch.agg(list).map(list).to_dict() == \
        {t: [1, 2, 3, 4, 5] for t in done}


def test_a_conversion_of_a_file_per_epoch_folder_cut_short_is_finished_or_redone(tmp_path):
    results = tmp_path / "results"
    epochs_dir = results / "epochs.parquet"
    epochs_dir.mkdir(parents=True)
    for e in (1, 2, 3):
        _legacy_epoch_file(epochs_dir, "a", e, 20.0 + e)
    (results / ".epochs-converting").mkdir()   # killed before the swap: redone
    (results / ".epochs-converting" / "part-000001-000001.parquet").write_bytes(b"half written")
    ResultsWriter(str(tmp_path)).close()
    assert [p.name for p in epochs_dir.iterdir()] == ["part-000001-000001.parquet"]
    assert not (results / ".epochs-converting").exists()
    # Killed between the swap's two renames: the converted folder is put in place, the old one removed.
    epochs_dir.rename(results / ".epochs-converting")
    (results / ".epochs-retired").mkdir()
    _legacy_epoch_file(results / ".epochs-retired", "a", 1, 20.0)
    w = ResultsWriter(str(tmp_path))
    assert [r["epoch"] for r in w.history("a")] == [1, 2, 3]
    for _ in range(100):   # removed by a thread of its own
        if not (results / ".epochs-retired").exists():
            break
        time.sleep(0.05)
    assert sorted(p.name for p in results.iterdir() if p.name.startswith(".")) == []
    assert len(pd.read_parquet(epochs_dir)) == 3
