"""What one save of Tune's state costs the study folder as the study grows: Ray 2.60's own copy of its staging
folder against the study's (``study.tune.upload.ChangedFiles``), side by side, on the same folder.

    python scripts/bench_state_copy.py --trials 10000 [--running 4] [--json F]

A staging folder as Tune leaves it (its state files, and five log files per trial, as its default loggers
write) holds ``--trials`` trials, ``--running`` of them still running. Timed, each three times, the median
printed: Ray's copy of the whole folder into a study folder (``pyarrow.fs.copy_files``, what
``ray.train._internal.storage._upload_to_fs_path`` runs), and the study's copy at a save after the ended
trials were sent (the running trials' files have grown since the last save). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LOGS = ("result.json", "progress.csv", "params.json", "params.pkl", "events.out.tfevents")
STATE = {"experiment_state-2026.json": 30_000, "search_gen_state-2026.json": 1_500, "searcher-state-2026.pkl": 9_000,
         "tuner.pkl": 2_000}


def make_staging(root: Path, trials: int) -> list[Path]:
    """The staging folder; returns the trials' folders."""
    root.mkdir(parents=True)
    for name, size in STATE.items():
        (root / name).write_bytes(b"s" * size)
    folders = []
    for i in range(trials):
        folder = root / f"trial_{i:05d}"
        folder.mkdir()
        for name in LOGS:
            (folder / name).write_bytes(b"l" * 600)
        folders.append(folder)
    return folders


def grow(folders: list[Path]) -> None:
    for folder in folders:
        with open(folder / "result.json", "ab") as f:
            f.write(b"{}\n")


def median_s(runs) -> float:
    return round(statistics.median(runs), 4)


def measure(trials: int, running: int) -> dict:
    from study.tune.upload import ChangedFiles
    scratch = Path(tempfile.mkdtemp(prefix="state-copy-"))
    try:
        local = scratch / "staging"
        folders = make_staging(local, trials)
        fs = pafs.LocalFileSystem()
        ray_s = []
        for k in range(3):
            t0 = time.perf_counter()
            pafs.copy_files(str(local), str(scratch / f"ray-{k}"), destination_filesystem=fs,
                            chunk_size=64 * 1024 * 1024)
            ray_s.append(time.perf_counter() - t0)
        ours = ChangedFiles(last="experiment_state-*.json")
        first = time.perf_counter()
        ours.prepare(str(local))(fs, str(scratch / "ours"))   # the study's first save sends everything
        first = time.perf_counter() - first
        for folder in folders[running:]:
            ours.ended(folder.name)
        ours.prepare(str(local))(fs, str(scratch / "ours"))   # their last send
        ours_s = []
        for _ in range(3):
            grow(folders[:running])
            t0 = time.perf_counter()
            sent = ours.prepare(str(local))(fs, str(scratch / "ours"))
            ours_s.append(time.perf_counter() - t0)
        return {"trials": trials, "running": running, "files": trials * len(LOGS) + len(STATE),
                "ray_copy_s": median_s(ray_s), "study_copy_s": median_s(ours_s), "study_first_copy_s": round(first, 4),
                "study_files_sent": sent, "ratio_ray_over_study": round(median_s(ray_s) / max(median_s(ours_s), 1e-6), 1)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10000)
    p.add_argument("--running", type=int, default=4)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.trials < 1 or not 0 <= args.running <= args.trials:
        p.error("--trials must be at least 1 and --running between 0 and --trials")
    out = measure(args.trials, args.running)
    text = json.dumps(out)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
