"""A study of many trials, read back: how long each reader takes, and how soon ``--resume`` starts a new trial.

    python scripts/scale_study.py --trials 10000 --epochs 20 --storage DIR [--json F]
    python scripts/scale_study.py --study DIR/NAME [--json F]

1. A small synthetic study (study.tune.synthetic; 8 trials, concurrency 2) runs through ``python -m
   study.run`` into DIR: a real study folder, with Ray's saved state, study.json and status.json.
2. ``--trials`` ended trials are added to its Optuna study and results tables (study.bench_growth.fill: a
   tenth ran all ``--epochs`` epochs, the rest were pruned after one to five), as if it had run them.
3. Then, each in a process of its own, timed: reading every table with pandas (study.results.read_table),
   ``python -m study.info``, ``python -m analysis``, and ``python -m study.run --resume`` with 4 more trials
   until its first trial starts (``resume_first_trial_s``: one the study left unfinished, restarted, or a new
   one) and until the first new one is in the trials table (``resume_first_new_trial_s``: later when the
   restarted ones hold every slot), and until that new trial was asked of Optuna (``resume_first_asked_s``:
   Tune scheduled it, its configuration drawn; its worker then starts); then it is stopped with SIGTERM
   (as a user would stop it), and how long it took to stop is timed too.

``--study DIR`` times steps 3 on a study made before (by this script, or any study). Prints one JSON object
of the figures (seconds) and the study's folder. The synthetic study's own run and the filling are not timed.
"""
from __future__ import annotations

import argparse
import json
import signal
import sqlite3
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


def started(trials, before) -> tuple[bool, bool]:
    """(a trial started since ``before``: restored (its restarts went up) or new; a new one did)."""
    new = bool(set(trials.trial_id) - set(before.trial_id))
    restarts = before.set_index("trial_id").restarts.fillna(0)
    now = trials.set_index("trial_id").restarts.fillna(0).reindex(restarts.index).fillna(0)
    return new or bool((now > restarts).any()), new


def optuna_trials(study: Path) -> int | None:
    """How many trials the study's own SQLite Optuna study holds (None: it has none here, or it is busy)."""
    try:
        con = sqlite3.connect(f"file:{study / 'optuna.db'}?mode=ro", uri=True, timeout=0.05)
        try:
            return con.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return None


def first_new_trial(cmd: list[str], study: Path, before) -> tuple[float, float, float, float]:
    """Seconds from the command's start until its first new trial was asked of Optuna (Tune scheduled it: its
    configuration drawn), until a trial (restored or new) started, and until a trial it made is in the trials
    table; and from the SIGTERM then sent to its exit."""
    from study.results import read_table

    asked_before = optuna_trials(study)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = new = asked = None
    while proc.poll() is None and new is None:
        time.sleep(0.25)
        if asked is None and asked_before is not None and (optuna_trials(study) or 0) > asked_before:
            asked = time.perf_counter() - t0
        trials = read_table(str(study), "trials")
        if trials is not None:
            any_started, new_started = started(trials, before)
            first = first if first is not None or not any_started else time.perf_counter() - t0
            new = time.perf_counter() - t0 if new_started else None
    t1 = time.perf_counter()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    if proc.returncode not in (0, 128 + signal.SIGTERM):
        raise SystemExit(f"error: --resume failed (exit {proc.returncode}): {err[-800:]}")
    return (*(round(t if t is not None else float("nan"), 2) for t in (asked, first, new)),
            round(time.perf_counter() - t1, 2))


def make_study(storage: Path, trials: int, epochs: int) -> tuple[Path, Path, dict]:
    """Steps 1 and 2: the small study run, then filled to ``trials`` more; (study, space file, untimed figures)."""
    from study.bench_growth import fill
    from study.bench_space import space_text

    name = f"scale-{trials}x{epochs}-{time.strftime('%Y%m%d-%H%M%S')}"
    space = storage / f"{name}.yaml"
    space.write_text(space_text(BASE_TRIALS, epochs, 2, 0.01))
    base_s, _ = timed(run_command(space, storage))
    study = storage / name
    meta = json.loads((study / "study.json").read_text())
    t0 = time.perf_counter()
    fill(study, f"sqlite:///{study / 'optuna.db'}", trials, epochs, name=meta["optuna_study_name"])
    return study, space, {"base_study_s": base_s, "fill_s": round(time.perf_counter() - t0, 1)}


def run_command(space: Path, storage: Path) -> list[str]:
    return [sys.executable, "-m", "study.run", "--space", str(space), "--storage", str(storage), "--num-cpus", "2",
            "--cache-dir", str(storage / ".cache")]


def time_readers(study: Path, space: Path) -> dict:
    """Step 3, on ``study`` as it is."""
    from study.results import read_table

    trials = read_table(str(study), "trials")
    read_s, counts = timed([sys.executable, "-c", READ, str(study)])
    info_s, _ = timed([sys.executable, "-m", "study.info", str(study)])
    report = study.parent / f"{study.name}-report"
    analysis_s, _ = timed([sys.executable, "-m", "analysis", "--study", str(study), "--out", str(report)])
    # MORE trials beyond the study's total, or beyond the trials it ended if it ran more than its total
    ended = int(trials.status.isin(["DONE", "PRUNED"]).sum())
    total = max(json.loads((study / "study.json").read_text())["num_samples"], ended) + MORE
    resume = run_command(space, study.parent) + ["--name", study.name, "--resume", "--num-samples", str(total)]
    asked_s, first_s, new_s, stop_s = first_new_trial(resume, study, trials)
    return {"trials": len(trials), "rows": counts.strip(), "read_tables_s": float(counts.split()[0]),
            "read_tables_process_s": read_s, "info_s": info_s, "analysis_s": analysis_s,
            "resume_first_asked_s": asked_s, "resume_first_trial_s": first_s, "resume_first_new_trial_s": new_s,
            "resume_stop_s": stop_s, "study": str(study)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--storage", type=Path, help="where the new study is made")
    p.add_argument("--study", type=Path, help="time this study instead of making one")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if (args.storage is None) == (args.study is None):
        p.error("give --storage (a new study) or --study (one made before)")
    if args.study is not None:
        study = args.study.resolve()
        space, made = Path(json.loads((study / "study.json").read_text())["space_file"]), {}
    else:
        args.storage.mkdir(parents=True, exist_ok=True)
        study, space, made = make_study(args.storage.resolve(), args.trials, args.epochs)
    out = {**time_readers(study, space), **made}
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
