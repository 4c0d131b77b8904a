"""The results contract on real Parquet files: layout, types, the best-epoch rule, and real write faults."""
from __future__ import annotations

import math
import os
import stat
import subprocess
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from conftest import PYTHON, python_env

from study.results.contract import best_row, best_trials, coerce
from study.results.store import (
    ResultsReadError,
    ResultsWriteError,
    ResultsWriter,
    epoch_row,
    read_table,
    trial_row,
    write_json,
)

METRICS = dict(train_loss=0.1, val_loss=0.1, test_loss=0.1, val_ssim=0.9, val_colourfulness=0.5,
               val_gray_psnr=25.0, test_psnr=25.5, test_ssim=0.9, test_colourfulness=0.5, test_gray_psnr=25.0)
CONFIG = {"dataset": "samples", "resolution": 32, "sampling": "maxpool-upsample", "output": "uv", "lr": 1e-3}


def row(epoch: int, val_psnr: float) -> dict:
    return {"epoch": epoch, "val_psnr": val_psnr, **METRICS, "seconds": 1.0}


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------ the best-epoch rule


def test_best_row_is_highest_val_psnr_earliest_on_ties_and_never_nan():
    history = [row(1, 20.0), row(2, 21.0), row(3, 21.0), row(4, float("nan"))]
    assert best_row(history)["epoch"] == 2
    assert best_row([row(1, float("nan")), row(2, 5.0)])["epoch"] == 2
    with pytest.raises(ValueError):
        best_row([])


def test_best_trials_per_group_ties_to_smaller_trial_id():
    df = pd.DataFrame({"trial_id": ["b", "a", "c", "d"], "dataset": ["x", "x", "y", "y"],
                       "best_val_psnr": [22.0, 22.0, float("nan"), 19.0]})
    best = best_trials(df, "dataset")
    assert list(best.trial_id) == ["a", "d"]
    assert list(best_trials(df).trial_id) == ["a"]


# ------------------------------------------------------------------ layout and types


def test_epochs_are_parts_that_read_as_one_table_with_one_row_per_trial_and_epoch(tmp_path):
    w = ResultsWriter(str(tmp_path))
    for e, v in ((1, 20.0), (2, 22.0), (3, 21.0)):
        w.add_epochs("t1", [epoch_row("t1", row(e, v))])
    w.add_epochs("t2", [epoch_row("t2", row(1, 19.0))])
    w.add_epochs("t1", [epoch_row("t1", row(3, 23.0))])  # a restored trial re-reports epoch 3: replaced
    w.flush()
    folder = tmp_path / "results/epochs.parquet"
    # The first change wrote the table at once (epoch 1), the flush the rest: two parts, not a file per epoch.
    assert files(folder) == ["part-000001-000001.parquet", "part-000002-000002.parquet"]
    df = pd.read_parquet(folder)  # a plain pandas reader gets one table
    assert len(df) == 4 and df.loc[(df.trial_id == "t1") & (df.epoch == 3), "val_psnr"].item() == 23.0
    assert [r["epoch"] for r in w.history("t1")] == [1, 2, 3]
    w.drop_epochs_after("t1", 1)
    w.close()
    assert sorted(map(tuple, pd.read_parquet(folder)[["trial_id", "epoch"]].values.tolist())) == [("t1", 1), ("t2", 1)]
    assert sorted(map(tuple, read_table(str(tmp_path), "epochs")[["trial_id", "epoch"]].values.tolist())) == \
        [("t1", 1), ("t2", 1)]
    assert [r["epoch"] for r in ResultsWriter(str(tmp_path)).history("t1")] == [1]  # a new writer reads it back


def test_a_study_with_the_old_single_file_epochs_table_still_reads_and_converts(tmp_path):
    old = pd.DataFrame([epoch_row("t1", row(e, 20.0 + e)) for e in (1, 2, 3)])
    (tmp_path / "results").mkdir()
    old.to_parquet(tmp_path / "results/epochs.parquet", index=False)
    assert len(read_table(str(tmp_path), "epochs")) == 3
    w = ResultsWriter(str(tmp_path))
    assert (tmp_path / "results/epochs.parquet").is_dir()
    w.drop_epochs_after("t1", 2)
    w.add_epochs("t1", [epoch_row("t1", row(3, 30.0))])
    w.close()
    df = pd.read_parquet(tmp_path / "results/epochs.parquet")
    assert sorted(df.epoch) == [1, 2, 3] and df.val_psnr.max() == 30.0
    assert not [p for p in (tmp_path / "results").iterdir() if p.name.startswith(".")]
    # A conversion cut short after the old file was removed: the next writer finishes it.
    (tmp_path / "results/epochs.parquet").rename(tmp_path / "results/.epochs-converting")
    assert sorted(r["epoch"] for r in ResultsWriter(str(tmp_path)).history("t1")) == [1, 2, 3]
    assert len(pd.read_parquet(tmp_path / "results/epochs.parquet")) == 3


def test_trials_are_written_on_a_cadence_with_pandas_types(tmp_path):
    w = ResultsWriter(str(tmp_path), interval_s=3600)
    path = tmp_path / "results/trials.parquet"
    history = [{**row(e, v), "precision": "bf16"} for e, v in ((1, 20.0), (2, 22.0), (3, 22.0))]
    w.stage("trials", [trial_row("t1", CONFIG, "RUNNING", history[:1], started_at=1.7e9)])
    first = path.stat().st_ino   # the first change after opening is written at once
    w.stage("trials", [trial_row("t1", CONFIG, "DONE", history, started_at=1.7e9, finished_at=1.7e9 + 60)])
    w.stage("trials", [trial_row("t2", CONFIG, "RUNNING", [], started_at=1.7e9 + 5)])
    assert path.stat().st_ino == first and len(pd.read_parquet(path)) == 1   # not per change
    assert list(read_table(str(tmp_path), "trials").trial_id) == ["t1", "t2"]   # the journal has the rest
    w.flush()
    second = path.stat().st_ino
    assert second != first
    w.flush()  # nothing changed: nothing written
    assert path.stat().st_ino == second
    df = pd.read_parquet(path).set_index("trial_id")
    assert df.loc["t1", "status"] == "DONE" and df.loc["t1", "best_epoch"] == 2   # earliest of the tie
    assert str(df["best_epoch"].dtype) == "Int64" and pd.isna(df.loc["t2", "best_epoch"])
    assert isinstance(df["started_at"].dtype, pd.DatetimeTZDtype) and str(df["started_at"].dt.tz) == "UTC"
    assert df.loc["t1", "finished_at"] - df.loc["t1", "started_at"] == pd.Timedelta(seconds=60)
    assert pd.isna(df.loc["t2", "finished_at"])
    # What the trial computed in (its epoch rows' precision) is bookkeeping beside the config's own.
    assert df.loc["t1", "precision_used"] == "bf16" and pd.isna(df.loc["t2", "precision_used"])
    with pytest.raises(ValueError, match="status"):
        trial_row("t3", CONFIG, "FINISHED", [])


def test_a_real_study_records_what_each_trial_computed_in(tmp_path, cache_dir):
    """Real trials (study.local, tiny data): each epoch row carries the precision the engine resolved,
    and each trial's precision_used is it, while its ``precision`` keeps what the config asked for."""
    from study.config.trial import TrialConfig
    from study.local import run_local_study
    tiny = dict(dataset="samples", epochs=2, train_limit=32, eval_limit=16, base_filters=4, batch_size=16,
                preview_count=1)
    # On a CPU "auto" resolves to fp32; bf16 is taken as asked (CPU autocast).
    run_local_study(tmp_path, [TrialConfig(precision="bf16", **tiny), TrialConfig(precision="auto", **tiny)],
                    cache_dir=cache_dir, device="cpu", log=lambda line: None)
    epochs = read_table(str(tmp_path), "epochs").sort_values(["trial_id", "epoch"])
    assert epochs.groupby("trial_id").precision.agg(list).to_dict() == \
        {"local_00000": ["bf16", "bf16"], "local_00001": ["fp32", "fp32"]}
    trials = read_table(str(tmp_path), "trials").set_index("trial_id")
    assert trials.status.tolist() == ["DONE", "DONE"]
    assert trials.precision_used.to_dict() == {"local_00000": "bf16", "local_00001": "fp32"}
    assert trials.precision.to_dict() == {"local_00000": "bf16", "local_00001": "auto"}


def test_trial_row_takes_few_parameters_and_writes_what_it_always_wrote():
    import inspect
    assert len(inspect.signature(trial_row).parameters) <= 8
    history = [{**row(1, 20.0), "precision": "fp32"}, {**row(2, 21.0), "precision": "bf16"}]
    got = trial_row("t1", {"lr": 0.1}, "DONE", history, error=None, wall_time_s=3, device="cpu", node_id="n",
                    checkpoint_path="c", optuna_number=4, restarts=1)
    assert list(got)[:11] == ["trial_id", "lr", "status", "error", "epochs_run", "wall_time_s", "device", "node_id",
                              "checkpoint_path", "optuna_number", "restarts"]
    assert {k: got[k] for k in list(got)[:11]} == {
        "trial_id": "t1", "lr": 0.1, "status": "DONE", "error": None, "epochs_run": 2, "wall_time_s": 3.0,
        "device": "cpu", "node_id": "n", "checkpoint_path": "c", "optuna_number": 4, "restarts": 1}
    assert got["best_epoch"] == 2 and got["final_val_psnr"] == 21.0 and got["precision_used"] == "bf16"
    bare = trial_row("t2", {}, "RUNNING", [])
    assert {k: bare[k] for k in ("error", "device", "node_id", "checkpoint_path", "optuna_number")} == {
        "error": None, "device": "", "node_id": "", "checkpoint_path": "", "optuna_number": -1}
    assert math.isnan(bare["wall_time_s"]) and "best_epoch" not in bare


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        w = ResultsWriter(str(tmp_path))
        w.upsert("trials", [trial_row("t1", CONFIG, "DONE", [row(1, 20.0)])])
        w.add_epochs("t1", [epoch_row("t1", row(1, 20.0))])
        w.add_previews([{"trial_id": "t1", "dataset": "samples", "resolution": 32, "epoch": 1, "image_index": 0,
                         "kind": "prediction", "png": b"png"}])
        journal = {p: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "results/_journal").iterdir()}
        w.close()
        write_json(str(tmp_path), "study.json", {"name": "x"})
    finally:
        os.umask(old)
    assert len(journal) == 1 and set(journal.values()) == {0o666 & ~umask}
    assert not list((tmp_path / "results/_journal").iterdir())   # emptied by the write
    written = [tmp_path / "study.json", *(p for p in (tmp_path / "results").rglob("*") if p.is_file())]
    assert len(written) == 6   # study.json, trials, two parts of epochs and of previews
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


# ------------------------------------------------------------------ faults


def _limited(script: str, folder) -> subprocess.CompletedProcess:
    """Run ``script`` (with ``w``, a writer of ``folder``) in a process whose files may not pass 2 kB after
    ``limit()``: the kernel refuses bytes past RLIMIT_FSIZE (EFBIG), as a full disk refuses them."""
    head = textwrap.dedent(f"""
        import resource, signal, sys
        from study.results import ResultsWriteError, ResultsWriter, trial_row
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG from write() rather than a signal
        config = {CONFIG!r}
        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))
        w = ResultsWriter(sys.argv[1], interval_s=3600)
        w.upsert("trials", [trial_row("t1", config, "DONE", [])])
    """)
    return subprocess.run([PYTHON, "-c", head + textwrap.dedent(script), str(folder)], capture_output=True, text=True,
                          env=python_env(), timeout=120)


def test_disk_full_keeps_the_last_good_table_leaves_no_temporary_and_resumes(tmp_path):
    p = _limited("""
        w.stage("trials", [trial_row(f"t{i}", {**config, "note": "x" * 500}, "DONE", []) for i in range(2, 40)])
        limit()   # the journal holds the rows; the table of them is past the limit
        try:
            w.flush()
        except ResultsWriteError as e:
            print("ERROR", e)
            sys.exit(3)
    """, tmp_path)
    assert p.returncode == 3, p.stdout + p.stderr
    assert "cannot write" in p.stdout and str(tmp_path / "results/trials.parquet") in p.stdout
    assert "File too large" in p.stdout and "--resume" in p.stdout
    assert not list((tmp_path / "results").rglob(".tmp-*"))  # no temporary left behind
    assert len(pd.read_parquet(tmp_path / "results/trials.parquet")) == 1  # the last good version
    # The cause fixed (no limit), the study continues where it was: the journal's rows are written.
    w = ResultsWriter(str(tmp_path))
    assert len(pd.read_parquet(tmp_path / "results/trials.parquet")) == 39
    w.upsert("trials", [trial_row("t40", CONFIG, "DONE", [])])
    w.close()
    assert len(read_table(str(tmp_path), "trials")) == 40


def test_a_full_disk_refusing_a_change_keeps_the_changes_before_it(tmp_path):
    p = _limited("""
        limit()
        for i in range(2, 40):
            try:
                w.stage("trials", [trial_row(f"t{i}", {**config, "note": "x" * 300}, "DONE", [])])
            except ResultsWriteError as e:
                print("ERROR", i, e)
                sys.exit(3)
    """, tmp_path)
    assert p.returncode == 3, p.stdout + p.stderr
    refused = int(p.stdout.split()[1])
    assert "cannot write" in p.stdout and str(tmp_path / "results/_journal") in p.stdout
    assert "File too large" in p.stdout and "the changes before this one are kept" in p.stdout
    want = [f"t{i}" for i in range(1, refused)]
    assert sorted(read_table(str(tmp_path), "trials").trial_id) == sorted(want)   # no half line read
    w = ResultsWriter(str(tmp_path))   # --resume: the journal's whole lines are written, the rest goes on
    w.upsert("trials", [trial_row(f"t{refused}", CONFIG, "DONE", [])])
    w.close()
    assert sorted(pd.read_parquet(tmp_path / "results/trials.parquet").trial_id) == sorted([*want, f"t{refused}"])


def test_an_unwritable_results_folder_is_a_clear_error(tmp_path):
    w = ResultsWriter(str(tmp_path))
    w.add_epochs("t1", [epoch_row("t1", row(1, 20.0))])   # written at once: the first change
    journal = tmp_path / "results/_journal"
    if os.geteuid() == 0:
        # Root writes through a read-only mode; a file where the journal's folder should be fails for anyone.
        journal.rmdir()
        journal.write_bytes(b"not a folder")
        with pytest.raises(ResultsWriteError, match="_journal") as e:
            w.add_epochs("t1", [epoch_row("t1", row(2, 21.0))])
    else:
        journal.chmod(0o555)
        try:
            with pytest.raises(ResultsWriteError, match="Permission denied") as e:
                w.add_epochs("t1", [epoch_row("t1", row(2, 21.0))])
        finally:
            journal.chmod(0o755)
    assert str(journal) in str(e.value) and "--resume" in str(e.value)
    assert [r["epoch"] for r in w.history("t1")] == [1]   # a change the journal could not keep is not made
    assert pd.read_parquet(tmp_path / "results/epochs.parquet").epoch.tolist() == [1]


def test_a_corrupt_trials_table_names_the_file(tmp_path):
    (tmp_path / "results").mkdir()
    path = tmp_path / "results/trials.parquet"
    path.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(ResultsReadError) as e:
        ResultsWriter(str(tmp_path))   # what --resume does first
    assert str(path) in str(e.value) and "<Buffer>" not in str(e.value)
    assert e.value.exit_status == 2


def test_coerce_reads_unix_seconds_and_timestamps_alike():
    df = coerce("trials", pd.DataFrame({"trial_id": ["a", "b", "c"], "started_at": [0.0, pd.Timestamp(0, tz="UTC"),
                                                                                   float("nan")],
                                        "best_epoch": [1.0, math.nan, 3.0]}))
    assert df.started_at[0] == df.started_at[1] == pd.Timestamp(0, tz="UTC") and pd.isna(df.started_at[2])
    assert df.best_epoch.tolist()[0] == 1 and str(df.best_epoch.dtype) == "Int64"


def test_a_local_study_stops_on_a_results_fault_keeping_what_was_written(tmp_path, cache_dir):
    """The epochs folder becomes a file while the second epoch trains: the study stops with the error;
    the trial is not recorded as a failed trial, and the first epoch's results stay."""
    from study.config.trial import TrialConfig
    from study.local import run_local_study
    folder = tmp_path / "study"
    epochs_dir = folder / "results/epochs.parquet"

    def log(line: str) -> None:
        if line.startswith("epoch 2/"):   # the engine logs an epoch before reporting it
            epochs_dir.rename(folder / "results/moved")
            epochs_dir.write_bytes(b"in the way")
    cfg = TrialConfig(dataset="samples", epochs=2, train_limit=32, eval_limit=16, base_filters=8, batch_size=16,
                      preview_count=2)
    with pytest.raises(ResultsWriteError, match="epochs.parquet"):
        run_local_study(folder, [cfg], cache_dir=cache_dir, log=log)
    # Epoch 2's rows are in the journal (the table's write failed): kept, and written by the next writer.
    trials = read_table(str(folder), "trials")
    assert list(trials.status) == ["RUNNING"] and trials.epochs_run.tolist() == [2]
    assert pd.read_parquet(folder / "results/moved").epoch.tolist() == [1]   # what the table held before
    assert not [p for p in (folder / "results").rglob(".tmp-*")]
    assert not list(folder.glob(".ckpt-*"))   # the engine's temporary checkpoints, removed on error too
