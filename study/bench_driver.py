"""The driver's own cost per result, beside bare Ray Tune's throughput, in one run.

``python -m study.bench --parts driver --trials N --epochs E --concurrency C --storage DIR [--json [F]]``

1. A synthetic study (study.tune.synthetic: trials report generated epoch curves every
   ``--epoch-seconds``, nothing trains) runs through the real command, ``python -m study.run``, into
   DIR (left there): Ray Tune's controller, the Optuna searcher and pruner, the results callback and
   writer, progress and status.json, checkpoints. Its driver writes ``<study>/driver_timings.json`` as
   the study ends (study.tune.timings.DriverTimings).
2. Bare Ray Tune (``tune.Tuner`` with a function trainable that sleeps and reports synthetic rows and the
   same tiny checkpoint folders, Ray's default loggers, no project callbacks, the same concurrency and
   number of trials, actors reused as the study's are, each trial's rows given in its config: a grid of
   N) runs in a temporary folder,
   removed after. It prunes nothing: every trial reports all its epochs.

Prints one JSON object: ``driver_results_per_s`` and ``ray_results_per_s`` (results over the span from the
first trial's start to the last report, from the rows' own report times), ``driver_p50_ms`` and
``driver_p99_ms`` (the driver's time per result: from the pruning scheduler getting it, through the
searcher, to the end of the results callback; ``callback_p50_ms``/``callback_p99_ms``: the callback's part),
``latency_p50_ms``/``latency_p99_ms``
(report to row written, Ray's transport included), ``wall_s`` (the study command),
``ray_wall_s`` (the bare Tuner's fit) and ``study`` (its folder).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from study.bench_space import PARAMS_CONSTANT, space_text
from study.cli import ArgumentParser, UsageError, check_writable

TIMINGS_FILE = "driver_timings.json"   # study.tune.timings.DriverTimings.FILE (no Ray imported here)


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m study.bench --parts driver", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", choices=["driver"], default="driver", help="driver (this benchmark)")
    p.add_argument("--trials", type=_count, default=20, help="trials of each study (default: 20)")
    p.add_argument("--epochs", type=_count, default=5, help="epochs of each trial (default: 5)")
    p.add_argument("--concurrency", type=_count, default=4, help="trials at once (default: 4)")
    p.add_argument("--epoch-seconds", type=float, default=0.01, help="a synthetic epoch's time (default: 0.01)")
    p.add_argument("--storage", type=Path, default=Path("studies"), help="where the study is left (default: studies)")
    p.add_argument("--json", nargs="?", const="-", help="also write the JSON object to this file")
    p.add_argument("--no-pruning", action="store_true",
                   help="the study prunes nothing, so that it runs exactly the bare run's trials and epochs and "
                        "the two wall times compare")
    p.add_argument("--growth", type=_sizes, help="instead: the driver's own parts per result in studies already "
                   "holding each of these numbers of trials, e.g. 100,1000,10000 (study.bench_growth)")
    p.add_argument("--new", type=_count, default=200, help="with --growth: trials timed at each size (default: 200)")
    return p


def _sizes(text: str) -> list[int]:
    return [_count(part) for part in text.split(",")]


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return n


def run_study(args, name: str) -> tuple[Path, float]:
    """The synthetic study through ``python -m study.run``: its folder and the command's wall time."""
    space = args.storage / f"{name}.yaml"
    space.write_text(space_text(args.trials, args.epochs, args.concurrency, args.epoch_seconds, not args.no_pruning))
    cmd = [sys.executable, "-m", "study.run", "--space", str(space), "--storage", str(args.storage),
           "--num-cpus", str(args.concurrency), "--cache-dir", str(args.storage / ".cache")]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise UsageError(f"the synthetic study failed (exit {p.returncode}): {(p.stderr or p.stdout)[-1500:]}")
    return args.storage / name, wall


def _bare_trial(config: dict) -> None:
    """A bare Ray Tune trial: the synthetic trial's sleeps, rows and checkpoint folders, given its rows (so
    that the worker imports nothing of the project's Ray layer, nor torch)."""
    from ray import tune
    from ray.tune import Checkpoint

    due = time.monotonic()
    for row in config["rows"]:
        due += config["epoch_seconds"]
        time.sleep(max(due - time.monotonic(), 0.0))
        folder = Path.cwd() / f"synthetic-checkpoint-{row['epoch']:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            (folder / "synthetic.json").write_text(json.dumps({"epoch": row["epoch"]}))
            tune.report({**row, "reported_at": time.time()}, checkpoint=Checkpoint.from_directory(str(folder)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def bare_trials(args) -> list[list[dict]]:
    """The bare run's trials: each one's rows, from the synthetic curve of a configuration drawn from the
    study's space (uniformly; the study's own draws are TPE's)."""
    import random

    from study.config import TrialConfig

    # The project's Ray layer (and torch): imported here, in the driver only.
    from study.tune import synthetic_rows

    rng = random.Random(0)
    out = []
    for _ in range(args.trials):
        cfg = TrialConfig(**PARAMS_CONSTANT, epochs=args.epochs, depth=rng.choice([2, 3]),
                          sampling=rng.choice(["maxpool-upsample", "strided-transposed"]),
                          output=rng.choice(["rgb", "uv"]), lr=10 ** rng.uniform(math.log10(3e-4), math.log10(3e-3)))
        out.append(synthetic_rows(cfg))
    return out


def run_bare_ray(args) -> tuple[list[float], float]:
    """Bare Ray Tune on the same number of trials: every result's report time, and the fit's wall time."""
    import ray
    from ray import tune

    trials = bare_trials(args)
    folder = Path(tempfile.mkdtemp(prefix="bare-ray-", dir=args.storage))
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # As the study's driver does (study.tune.backend): a checkpoint per epoch is the point, Ray's warning noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    try:
        ray.init(address="local", num_cpus=args.concurrency, include_dashboard=False, log_to_driver=False)
        tuner = tune.Tuner(_bare_trial,
                           param_space={"epoch_seconds": args.epoch_seconds, "rows": tune.grid_search(trials)},
                           # Actors reused, as the study's Tuner (study.tune.backend): what differs is the driver.
                           tune_config=tune.TuneConfig(max_concurrent_trials=args.concurrency, reuse_actors=True),
                           run_config=tune.RunConfig(storage_path=str(folder), name="bare", verbose=0,
                                                     checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        t0 = time.perf_counter()
        grid = tuner.fit()
        wall = time.perf_counter() - t0
        stamps = [float(t) for r in grid for t in r.metrics_dataframe["reported_at"]]
        return stamps, wall
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


def per_second(stamps: list[float], epoch_seconds: float) -> float:
    """Results per second from the first trial's start (its first report less an epoch) to the last report."""
    return len(stamps) / max(max(stamps) - min(stamps) + epoch_seconds, 1e-9) if stamps else 0.0


def figures(args, study: Path, wall: float, ray_stamps: list[float], ray_wall: float) -> dict:
    import numpy as np

    t = json.loads((study / TIMINGS_FILE).read_text())
    ms, cb, lat = (np.asarray(t[k]) for k in ("driver_ms", "callback_ms", "latency_ms"))
    driver = per_second(t["reported_at"], args.epoch_seconds)
    ray_rate = per_second(ray_stamps, args.epoch_seconds)
    return {"trials": args.trials, "epochs": args.epochs, "concurrency": args.concurrency,
            "epoch_seconds": args.epoch_seconds, "results": len(ms), "ray_results": len(ray_stamps),
            "driver_results_per_s": round(driver, 2), "ray_results_per_s": round(ray_rate, 2),
            "ratio": round(driver / ray_rate, 3) if ray_rate else None,
            "driver_p50_ms": round(float(np.percentile(ms, 50)), 3), "driver_p99_ms": round(float(np.percentile(ms, 99)), 3),
            "driver_max_ms": round(float(ms.max()), 3),
            "callback_p50_ms": round(float(np.percentile(cb, 50)), 3),
            "callback_p99_ms": round(float(np.percentile(cb, 99)), 3),
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 3),
            "latency_p99_ms": round(float(np.percentile(lat, 99)), 3),
            "wall_s": round(wall, 2), "ray_wall_s": round(ray_wall, 2), "study": str(study)}


def prepared(argv) -> argparse.Namespace:
    """The command line, checked, with ``--storage`` made and absolute (this benchmark's and the growth one's)."""
    args = parser().parse_args(argv)
    if not 0 <= args.epoch_seconds <= 3600:
        raise UsageError(f"--epoch-seconds {args.epoch_seconds}: give 0 to 3600 seconds")
    check_writable("--storage", args.storage, "the study")
    args.storage.mkdir(parents=True, exist_ok=True)
    args.storage = args.storage.resolve()
    return args


def emit(out: dict, args: argparse.Namespace) -> int:
    """Print the figures as one JSON object, and write them to ``--json F`` too."""
    print(json.dumps(out))
    if args.json and args.json != "-":
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


def main(argv=None) -> int:
    args = prepared(argv)
    if args.growth:   # python -m study.bench sends --growth to study.bench_growth
        raise UsageError("--growth: run it as python -m study.bench --parts driver --growth ...")
    name = f"driver-{args.trials}x{args.epochs}-c{args.concurrency}-{time.strftime('%Y%m%d-%H%M%S')}"
    study, wall = run_study(args, name)
    ray_stamps, ray_wall = run_bare_ray(args)
    return emit(figures(args, study, wall, ray_stamps, ray_wall), args)


if __name__ == "__main__":
    from study import cli
    sys.exit(cli.run(main))
