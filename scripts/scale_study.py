"""A study of many trials, read back: how long each reader takes, and how soon ``--resume`` starts a new trial.

    python scripts/scale_study.py --trials 10000 --epochs 20 --storage DIR [--json F]

1. A small synthetic study (study.tune.synthetic; 8 trials, concurrency 2) runs through ``python -m
   study.run`` into DIR: a real study folder, with Ray's saved state, study.json and status.json.
2. ``--trials`` ended trials are added to its Optuna study and results tables (study.bench_growth.fill: a
   tenth ran all ``--epochs`` epochs, the rest were pruned after one to five), as if it had run them.
3. Then, each in a process of its own, timed: reading every table with pandas (study.results.read_table),
   ``python -m study.info``, ``python -m analysis``, and ``python -m study.run --resume`` with 4 more trials
   until the first of them is in the trials table (then it runs to its end).

Prints one JSON object of the figures (seconds) and the study's folder. The synthetic study's own run and
the filling are not timed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BASE_TRIALS, MORE = 8, 4
READ = ("import sys, time; from study.results import read_table; t0 = time.perf_counter(); "
        "n = {t: len(read_table(sys.argv[1], t)) for t in ('trials', 'epochs', 'previews')}; "
        "print(round(time.perf_counter() - t0, 3), n)")


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... failed (exit {p.returncode}): {p.stderr[-800:]}")
    return round(time.perf_counter() - t0, 2), p.stdout


def first_new_trial(cmd: list[str], study: Path, known: set[str]) -> tuple[float, float]:
    """Seconds from the command's start until a trial it started is in the trials table; and its whole run."""
    from study.results import read_table

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None and first is None:
        time.sleep(0.25)
        trials = read_table(str(study), "trials")
        if trials is not None and set(trials.trial_id) - known:
            first = time.perf_counter() - t0
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"error: --resume failed (exit {proc.returncode}): {err[-800:]}")
    return round(first if first is not None else float("nan"), 2), round(time.perf_counter() - t0, 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--storage", type=Path, required=True)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    from study.bench_space import space_text
    from study.bench_growth import fill
    from study.results import read_table

    args.storage.mkdir(parents=True, exist_ok=True)
    storage = args.storage.resolve()
    name = f"scale-{args.trials}x{args.epochs}-{time.strftime('%Y%m%d-%H%M%S')}"
    space = storage / f"{name}.yaml"
    space.write_text(space_text(BASE_TRIALS, args.epochs, 2, 0.01))
    run = [sys.executable, "-m", "study.run", "--space", str(space), "--storage", str(storage), "--num-cpus", "2",
           "--cache-dir", str(storage / ".cache")]
    base_s, _ = timed(run)
    study = storage / name
    meta = json.loads((study / "study.json").read_text())
    t0 = time.perf_counter()
    fill(study, f"sqlite:///{study / 'optuna.db'}", args.trials, args.epochs, name=meta["optuna_study_name"])
    fill_s = round(time.perf_counter() - t0, 1)
    known = set(read_table(str(study), "trials").trial_id)
    read_s, counts = timed([sys.executable, "-c", READ, str(study)])
    info_s, _ = timed([sys.executable, "-m", "study.info", str(study)])
    analysis_s, _ = timed([sys.executable, "-m", "analysis", "--study", str(study), "--out", str(storage / f"{name}-report")])
    total = BASE_TRIALS + args.trials + MORE
    first_s, resume_s = first_new_trial(run + ["--resume", "--num-samples", str(total)], study, known)
    out = {"trials": BASE_TRIALS + args.trials, "epochs": args.epochs, "rows": counts.strip(),
           "read_tables_s": float(read_s_inner(counts)), "read_tables_process_s": read_s, "info_s": info_s,
           "analysis_s": analysis_s, "resume_first_trial_s": first_s, "resume_run_s": resume_s,
           "base_study_s": base_s, "fill_s": fill_s, "study": str(study)}
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


def read_s_inner(stdout: str) -> str:
    return stdout.split()[0]


if __name__ == "__main__":
    sys.exit(main())
