"""Run a hyperparameter study: ``python -m study.run --space full``.

Ray Tune schedules the trials on this machine's (or a cluster's) GPUs or CPUs,
Optuna chooses configurations and prunes bad trials early, and the results land
as Parquet in ``<storage>/<name>/results/``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

from study.config import DEFAULT_RESOLUTION
from study.data import DataError
from study.results import read_json, read_table, resolve, write_json
from study.space import SpaceError, load_space


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m study.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="full", help="space name in search_spaces/ or a path to a .yaml file")
    p.add_argument("--name", help="study name (default: the space's name)")
    p.add_argument("--storage", default="studies",
                   help="where studies live: a local folder or a pyarrow URI such as s3://bucket/prefix")
    p.add_argument("--data-root", help="folder holding <dataset>/<split>/<class>/*.jpg (or $COLORIZE_DATA_ROOT)")
    p.add_argument("--cache-dir", help="decoded-image cache on each node (default ./.cache)")
    p.add_argument("--num-samples", type=int, help="trials to run (default: the space's)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: the space's)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractions allowed (default: the space's)")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default: the space's)")
    p.add_argument("--address", help="connect to an existing Ray cluster (e.g. auto, or ray://host:10001)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (no --address)")
    p.add_argument("--num-gpus", type=int, help="GPUs the local Ray instance advertises (no --address)")
    p.add_argument("--optuna-storage", help="Optuna RDB URL (default: sqlite file in the study folder)")
    p.add_argument("--resume", action="store_true", help="continue the study after an interruption")
    p.add_argument("--seed", type=int, default=0, help="seed of Optuna's sampler")
    return p


def study_root(storage: str, name: str) -> str:
    return under(storage, name) if "://" in storage else str(Path(storage).resolve() / name)


def under(root: str, sub: str) -> str:
    """``root/sub`` for a folder or a URI whose query string must stay at the end."""
    base, q, query = root.partition("?")
    return f"{base.rstrip('/')}/{sub}" + (f"?{query}" if q else "")


def default_optuna_storage(root: str, name: str) -> str:
    fs, path = resolve(root)
    if "://" not in root:
        return f"sqlite:///{Path(path) / 'optuna.db'}"
    # SQLite cannot live on an object store: keep it beside the driver, outside the job's
    # working directory (on a cluster that is a temporary copy that disappears).
    local = Path(os.environ.get("COLORIZE_OPTUNA_DIR") or Path.home() / ".cache" / "unet-colorize" / "optuna")
    local.mkdir(parents=True, exist_ok=True)
    # Keyed by the study's location too: two studies named alike must not share an Optuna study.
    db = local / f"{name}-{hashlib.sha1(root.encode()).hexdigest()[:8]}.db"
    print(f"note: the Optuna study is kept in {db} (pass --optuna-storage to share it)")
    return f"sqlite:///{db}"


def prepare_data(space, data_root: str | None, cache_dir: str) -> None:
    """Decode each dataset of the space once, here, before trials start.

    Otherwise the first trials would all decode the same images at once; and a
    missing or corrupt dataset is reported before any trial is scheduled.
    """
    from study.data import load_splits

    single = {n: space.possible(n) for n in ("resolution", "train_limit", "eval_limit")}
    if any(len(v) != 1 for v in single.values()):
        return  # varied by the space: each trial decodes (and caches) its own
    for ds in space.possible("dataset"):
        res = single["resolution"][0] or DEFAULT_RESOLUTION.get(ds, 64)
        t0 = time.time()
        s = load_splits(ds, res, data_root, cache_dir, single["train_limit"][0], single["eval_limit"][0])
        print(f"data {ds} at {res}px: {len(s.train)}/{len(s.val)}/{len(s.test)} train/val/test images "
              f"from {s.source} ({time.time() - t0:.1f}s)")


def best_table(root: str) -> str:
    df = read_table(root, "trials")
    if df is None or "best_val_psnr" not in df or df.best_val_psnr.isna().all():
        return "no trial finished an epoch"
    df = df[df.best_val_psnr.notna()]
    best = df.loc[df.groupby(["dataset", "output"]).best_val_psnr.idxmax()]
    best = best.assign(vs_gray=best.best_val_psnr - best.val_gray_psnr)
    cols = ["dataset", "output", "trial_id", "status", "best_val_psnr", "val_gray_psnr", "vs_gray",
            "best_test_psnr", "best_test_ssim", "sampling", "depth", "base_filters", "lr", "batch_size",
            "loss", "epochs_run"]
    return best[[c for c in cols if c in best]].to_string(index=False, float_format=lambda v: f"{v:.4g}")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        space = load_space(args.space)
    except SpaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.name or space.name
    root = study_root(args.storage, name)
    meta = read_json(root, "study.json")
    if args.resume and meta is None:
        print(f"error: --resume: no study at {root}; run without --resume to start it", file=sys.stderr)
        return 2
    if not args.resume and meta is not None:
        print(f"error: a study already exists at {root}; pass --resume to continue it, or --name for a new one "
              f"(nothing was changed)", file=sys.stderr)
        return 2
    data_root = str(Path(args.data_root).resolve()) if args.data_root else os.environ.get("COLORIZE_DATA_ROOT")
    cache_dir = str(Path(args.cache_dir or os.environ.get("COLORIZE_CACHE_DIR") or ".cache").resolve())

    if not args.address:  # on a cluster each node decodes into its own cache
        try:
            prepare_data(space, data_root, cache_dir)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    # Ray is imported only here: the trial engine does not need it.
    from study import tune_backend as tb

    resources = dict(space.resources)
    if args.gpus_per_trial is not None:
        resources["gpu"] = args.gpus_per_trial
    if args.cpus_per_trial is not None:
        resources["cpu"] = args.cpus_per_trial
    cluster = tb.init_ray(args.address, args.num_cpus, args.num_gpus)
    if resources.get("gpu", 0) and not cluster.get("GPU"):
        print("note: the Ray cluster has no GPU; trials run on CPUs only")
        resources["gpu"] = 0
    if meta is None:
        meta = {"name": name, "space": space.name, "space_file": str(space.path), "seed": args.seed,
                "optuna_storage": args.optuna_storage or default_optuna_storage(root, name),
                "optuna_study_name": name, "metric": tb.METRIC, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "num_samples": args.num_samples or space.num_samples, "resources": resources,
                "data_root": data_root, "command": " ".join(sys.argv)}
        write_json(root, "study.json", meta)
    elif meta.get("space") != space.name:
        print(f"error: --resume with space {space.name!r}, but the study was started with {meta.get('space')!r}",
              file=sys.stderr)
        return 2
    print(f"study {name}: space {space.name}, {meta['num_samples']} trials, {resources} per trial, "
          f"results in {under(root, 'results')}, Optuna {meta['optuna_storage']}")
    if args.resume and not tb.can_resume(root):
        print(f"error: --resume: Ray Tune has no saved state at {root} yet; start it again without --resume "
              f"after removing {root}/study.json", file=sys.stderr)
        return 2
    tuner = tb.build_tuner(
        study_root=root, space=space, sampler=space.make_sampler(args.seed), storage_url=meta["optuna_storage"],
        optuna_study_name=meta["optuna_study_name"], num_samples=meta["num_samples"],
        max_concurrent=args.max_concurrent or space.max_concurrent, resources=resources, data_root=data_root,
        cache_dir=cache_dir, resume=args.resume)
    tuner.fit()
    print("\nbest configuration per dataset x output (ranked by val PSNR in RGB; losses are not comparable):")
    print(best_table(root))
    print(f"\nresults: {under(root, 'results/trials.parquet')} (and epochs, previews);  "
          f"analysis: python -m analysis --study {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
