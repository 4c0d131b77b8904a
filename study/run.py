"""Run a hyperparameter study: ``python -m study.run --space full``.

Ray Tune schedules the trials on this machine's (or a cluster's) GPUs or CPUs,
Optuna chooses configurations and prunes bad trials early, and the results land
as Parquet in ``<storage>/<name>/results/``.

Every option, the space file and the storage are checked before anything is
written and before Ray starts; a bad one ends the command with ``error: ...``
and exit status 2 (``study.cli``). ``study.json`` is written only when the study
really starts, so a run that fails before its first trial leaves the name free.
One driver per study (``study.driver.lock``). The default Optuna SQLite database is
recorded relative to the study folder, so a copied or moved study resumes in
its new place. A password in ``--optuna-storage`` is never printed or stored:
``study.json`` keeps the URL without it; on ``--resume`` pass the URL again or
let the database client find the secret (PostgreSQL: ``$PGPASSWORD`` or
``~/.pgpass``).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

from study import cli
from study.cli import UsageError

# torch (via the space and config), pandas and Ray are imported where needed: a bad option is
# reported without loading any of them.
from study.driver import (
    DEFAULT_SQLITE,
    check_options,
    check_optuna_url,
    check_pickles,
    check_resume_database,
    check_storage,
    check_storage_url,
    in_ray_job,
    masked,
    missing_epochs,
    read_study_json,
    runtime_url,
    space_change_problems,
    stopping,
    without_password,
)


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m study.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="full", help="space name in search_spaces/ or a path to a .yaml file")
    p.add_argument("--name", help="study name (default: the space's name)")
    p.add_argument("--storage", default="studies",
                   help="where studies live: a local folder or a URL s3://<bucket>/<prefix>, gs://, hdfs://, "
                        "abfs:// (default: studies)")
    p.add_argument("--data-root", help="folder holding <dataset>/<split>/<class>/*.jpg "
                                       "(default: $COLORIZE_DATA_ROOT, else the datasets are downloaded)")
    p.add_argument("--cache-dir", help="decoded-image cache on each node (default: $COLORIZE_CACHE_DIR, else ./.cache)")
    p.add_argument("--num-samples", type=int,
                   help="trials to run, >= 1 (default: the space's); with --resume, the study's new total "
                        "(more trials for a finished study)")
    p.add_argument("--time-budget",
                   help="the study's running time: 90m, 2h, 1d, 1h30m or seconds, or none; counted across "
                        "interruptions and resumes; with --resume, a new budget from now (default: the space's "
                        "time_budget, else none)")
    p.add_argument("--plan", action="store_true",
                   help="print the study's plan and an estimate of its time from a short calibration on this "
                        "machine, then stop: nothing is written and no study starts")
    p.add_argument("--verbose", action="store_true", help="also show Ray Tune's own progress tables and messages")
    p.add_argument("--max-concurrent", type=int, help="trials at once, >= 1 (default: the space's)")
    p.add_argument("--gpus-per-trial", type=float,
                   help="GPUs per trial, >= 0, fractions allowed (default: the space's)")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial, > 0 (default: the space's)")
    p.add_argument("--pack", type=int,
                   help="trials trained together as one fused model, >= 1 (default: the space's `pack`)")
    p.add_argument("--address", help="connect to an existing Ray cluster (e.g. auto, or ray://host:10001) "
                                     "(default: inside a Ray job the job's cluster, else a private local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (no --address) (default: all)")
    p.add_argument("--num-gpus", type=int,
                   help="GPUs the local Ray instance advertises (no --address) (default: all)")
    p.add_argument("--optuna-storage",
                   help="Optuna RDB URL (default: optuna.db in the study folder); a password in it is never "
                        "printed or stored: on --resume pass the URL again, or use $PGPASSWORD / ~/.pgpass")
    p.add_argument("--resume", action="store_true",
                   help="continue the study after an interruption, a time budget or its end (default: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of Optuna's sampler (default: 0)")
    cli.add_debug(p)
    return p


# ------------------------------------------------------------------ the study

def space_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def study_root(storage: str, name: str) -> str:
    return under(storage, name) if "://" in storage else str(Path(storage).resolve() / name)


def under(root: str, sub: str) -> str:
    """``root/sub`` for a folder or a URI whose query string must stay at the end."""
    base, q, query = root.partition("?")
    return f"{base.rstrip('/')}/{sub}" + (f"?{query}" if q else "")


def default_optuna_storage(root: str, name: str) -> str:
    if "://" not in root:
        return DEFAULT_SQLITE   # resolved in the study folder at run time (runtime_url)
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
    from study.config import DEFAULT_RESOLUTION
    from study.engine import load_splits

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
    from study.results import best_trials, gain, read_table

    best = best_trials(read_table(root, "trials"), by=["dataset", "output"])
    if best.empty:
        return "no trial finished an epoch"
    best = best.assign(vs_gray=gain(best))
    cols = ["dataset", "output", "trial_id", "status", "best_val_psnr", "val_gray_psnr", "vs_gray",
            "best_test_psnr", "best_test_ssim", "sampling", "depth", "base_filters", "lr", "batch_size",
            "loss", "epochs_run"]
    return best[[c for c in cols if c in best]].to_string(index=False, float_format=lambda v: f"{v:.4g}")


STATUS_FILE = "status.json"   # study.driver.progress writes it beside study.json


def time_budget(args, meta: dict | None, space, clock, parse_duration) -> dict:
    """The study's time budget as study.json records it: ``{"seconds": B or None, "granted_at_s": S}``, a
    budget of B seconds of running time from the study's running time S. ``--time-budget`` on a resume
    grants a new one from now; without it a resumed study keeps its own, and one already spent is refused."""
    recorded = (meta or {}).get("time_budget") or {"seconds": None, "granted_at_s": 0.0}
    if args.time_budget is not None:
        return {"seconds": parse_duration(args.time_budget), "granted_at_s": clock.spent_before_s}
    if meta is None or not args.resume:
        return {"seconds": space.time_budget_s, "granted_at_s": 0.0}
    clock.budget_s, clock.granted_at_s = recorded.get("seconds"), float(recorded.get("granted_at_s") or 0.0)
    if clock.expired(clock.started):
        raise UsageError(f"--resume: the study's time budget ({recorded['seconds']:g} s of running time) is spent; "
                         f"give it more with --time-budget (e.g. --time-budget 1h, counted from now) or run it "
                         f"to the end with --time-budget none (nothing was changed)")
    return recorded


def more_trials(root: str, meta: dict, wanted: int, saved: tuple[int, int] | None) -> int:
    """``--resume --num-samples N``: the study's new total of trials (models); lowering it below what
    already started is refused."""
    pack = int(meta.get("pack", 1))
    started = (saved[0] if saved else 0) * pack
    if wanted < started:
        raise UsageError(f"--num-samples {wanted}: the study at {root} already started {started} trials; give "
                         f"at least {started} (its total is {meta.get('num_samples')}), or leave it out")
    if wanted != meta.get("num_samples"):
        print(f"note: the study's total goes from {meta.get('num_samples')} to {wanted} trials; the sampler "
              f"goes on from everything the study already knows")
    return wanted


def print_plan(args, space, meta: dict | None) -> int:
    """``--plan``: the study's plan and an estimate of its time, from a short calibration here; nothing is
    written and no Ray starts."""
    from study import plan

    cluster = plan.local_resources(args.num_cpus, args.num_gpus)
    resources = dict(space.resources)
    if args.gpus_per_trial is not None:
        resources["gpu"] = args.gpus_per_trial
    if args.cpus_per_trial is not None:
        resources["cpu"] = args.cpus_per_trial
    if resources.get("gpu", 0) and not cluster["GPU"]:
        resources["gpu"] = 0
    data_root = str(Path(args.data_root).resolve()) if args.data_root else os.environ.get("COLORIZE_DATA_ROOT")
    estimate = plan.estimate(
        space, num_samples=args.num_samples or (meta or {}).get("num_samples") or space.num_samples,
        max_concurrent=args.max_concurrent or space.max_concurrent, resources=resources,
        pack=args.pack or (meta or {}).get("pack") or space.pack_for(gpu=resources.get("gpu", 0) > 0),
        cluster_resources=cluster, data_root=data_root, time_budget_s=parse_budget_arg(args.time_budget, space))
    print(plan.format_plan(estimate))
    return 0


def parse_budget_arg(text, space) -> float | None:
    from study.durations import parse_duration
    return parse_duration(text) if text is not None else space.time_budget_s


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    check_options(args)
    from study.space import load_space

    check_storage_url(args.storage)   # before any path is made from it: never a local folder named "s3:"
    space = load_space(args.space)
    if args.plan:   # before any study folder, lock or record is looked at: --plan writes and starts nothing
        return print_plan(args, space, None)
    name = args.name or space.name
    root = study_root(args.storage, name)
    check_storage(args.storage, root)
    given_url = args.optuna_storage
    meta = read_study_json(root, resume=args.resume)
    if args.resume and meta is None:
        raise UsageError(f"--resume: no study at {root}; run without --resume to start it")
    from study.driver import lock
    held = lock.holder(root)
    if held is not None:
        raise lock.LockError(lock.refusal(root, held))
    if meta is not None and not args.resume:
        from study.tune import backend as tb
        if tb.can_resume(root):
            raise UsageError(f"a study already exists at {root}; pass --resume to continue it, or --name for a "
                             f"new one (nothing was changed)")
        # Its driver died before Ray saved any state: no trial ran, so the name is not used up.
        print(f"note: the study at {root} never started a trial; starting it afresh")
        meta = None
    if meta is not None and meta.get("space") != space.name:
        raise UsageError(f"--resume with space {space.name!r}, but the study at {root} was started with "
                         f"{meta.get('space')!r} ({meta.get('space_file')}); give --space {meta.get('space')} "
                         f"(nothing was changed)")
    if meta is not None:
        from study.engine import ALLOW_GRAYSCALE_ENV, grayscale_rule
        # Studies from before the rule was recorded kept their grayscale images.
        recorded, now = meta.get("grayscale", "kept"), grayscale_rule()
        if recorded != now:
            fix = (f"set {ALLOW_GRAYSCALE_ENV}=1 to resume it as it was" if recorded == "kept"
                   else f"unset {ALLOW_GRAYSCALE_ENV} to resume it")
            raise UsageError(f"--resume: the study at {root} was started with grayscale images {recorded} of its "
                             f"data splits, and they would now be {now}; PSNR from the two rules cannot be "
                             f"compared (grayscale images score ~110 dB as their own input). {fix[0].upper()}"
                             f"{fix[1:]}, or start a new study with --name (nothing was changed)")
    if given_url:
        check_optuna_url(runtime_url(meta["optuna_storage"], root, given_url) if meta else given_url)
    space_changed = meta is not None and meta.get("space_sha256") not in (None, space_hash(space.path))
    if args.pack is not None and args.pack > 1 and space.enqueue:
        raise UsageError(f"--pack {args.pack}: {space.path} has an `enqueue` list, which needs pack 1 (a pack's "
                         f"members share one structure); leave --pack out")
    if args.resume:
        check_pickles(root)
        from study.results import read_table
        # A corrupt table is named now, not when the driver first writes.
        tables = {table: read_table(root, table) for table in ("trials", "epochs")}
        for trial_id, gone in missing_epochs(tables["trials"], tables["epochs"]).items():
            print(f"warning: the epochs table lacks epoch(s) {', '.join(map(str, gone))} of trial {trial_id} (their "
                  f"files under results/epochs.parquet are gone); its other epochs are kept, and its trials row "
                  f"counts only the epochs that are there", file=sys.stderr)
        from study.tune import backend as tb
        if not tb.can_resume(root):
            raise UsageError(f"--resume: the study at {root} never started a trial (Ray Tune saved no state); "
                             f"run it again without --resume")
        problem = tb.searcher_state_problem(root)
        if problem:
            raise UsageError(f"--resume: the study at {root} cannot be resumed by this version of the project: "
                             f"{problem}. It was most likely started by an older version; resume it with that "
                             f"version, or start a new study with --name (nothing was changed: its results stay in "
                             f"{root}/results)")
        if args.pack is not None and args.pack != meta.get("pack", 1):
            raise UsageError(f"--pack {args.pack}: the study was started with pack {meta.get('pack', 1)}; "
                             f"a resumed study keeps its pack size (leave --pack out)")
        url = runtime_url(meta["optuna_storage"], root, given_url)
        check_resume_database(url, meta["optuna_study_name"])
        if args.num_samples is not None:
            meta["num_samples"] = more_trials(root, meta, args.num_samples, tb.saved_total_trials(root))
        if space_changed:
            problems = space_change_problems(space, url, meta["optuna_study_name"])
            if problems:
                raise UsageError(f"--resume: {space.path} changed since the study started, and Optuna cannot draw "
                                 f"new trials from it: {'; '.join(problems)}. Put those back as they were, or "
                                 f"start a new study with --name (nothing was changed)")
            print(f"note: {space.path} changed since the study started: trials already started keep their "
                  f"configuration, and new trials are drawn from the file as it is now (recorded in study.json "
                  f"under space_changes)", file=sys.stderr)
    from study.driver import StudyClock
    from study.durations import parse_duration
    from study.results import read_json as _read

    status = (_read(root, STATUS_FILE) or {}) if meta is not None else {}
    clock = StudyClock(spent_before_s=float(status.get("elapsed_s") or 0.0))
    budget = time_budget(args, meta, space, clock, parse_duration)
    data_root = str(Path(args.data_root).resolve()) if args.data_root else os.environ.get("COLORIZE_DATA_ROOT")
    if data_root and not Path(data_root).is_dir() and "://" not in data_root:
        raise UsageError(f"--data-root {data_root} is not a folder; give the folder holding cifar10/ and "
                         f"flowers102/ (or leave it out to download them)")
    cache_dir = str(Path(args.cache_dir or os.environ.get("COLORIZE_CACHE_DIR") or ".cache").resolve())
    cli.check_writable(f"--cache-dir {args.cache_dir or cache_dir}", Path(cache_dir), "the decoded-image cache")

    # Inside a Ray job (`ray job submit`) the study joins the job's cluster: a private Ray there could not
    # fetch the job's working directory, and every trial would fail.
    address = args.address or ("auto" if in_ray_job() else None)
    if address and (args.num_cpus is not None or args.num_gpus is not None):
        raise UsageError("--num-cpus/--num-gpus size a local Ray instance; this study joins a Ray cluster "
                         f"({'a Ray job' if not args.address else '--address'}), which has its own resources: "
                         f"leave them out")
    if not address:  # on a cluster each node decodes into its own cache
        prepare_data(space, data_root, cache_dir)

    # Ray is imported only here: the trial engine does not need it.
    from study.tune import backend as tb

    resources = dict(space.resources)
    if args.gpus_per_trial is not None:
        resources["gpu"] = args.gpus_per_trial
    if args.cpus_per_trial is not None:
        resources["cpu"] = args.cpus_per_trial
    made = [] if "://" in root else [p for p in (Path(root), Path(root).parent) if not p.exists()]
    try:
        return _run_study(args, space, name, root, meta, given_url, space_changed, resources, data_root,
                          cache_dir, address, clock, budget, lock)
    except UsageError:
        # Refused before the study started (e.g. resources no node has): leave no folder the lock made.
        for folder in made:
            try:
                folder.rmdir()   # only if empty
            except OSError:
                pass
        raise


def _run_study(args, space, name, root, meta, given_url, space_changed, resources, data_root, cache_dir,
               address, clock, budget, lock) -> int:
    from study.results import write_json
    from study.tune import METRIC
    from study.tune import backend as tb

    with lock.StudyLock(root), stopping.Signals() as signals:
        cluster = tb.init_ray(address, args.num_cpus, args.num_gpus)
        signals.install()   # after Ray's own driver handlers: ours decide how the study stops
        if resources.get("gpu", 0) and not cluster.get("GPU"):
            print("note: the Ray cluster has no GPU; trials run on CPUs only")
            resources["gpu"] = 0
        stopping.check_capacity(resources, tb.node_resources(), fixed=not address)
        if meta is None:
            from study.engine import grayscale_rule
            # Packs pay where one device has parallel work to spare: the space says how many per device kind.
            pack = args.pack or space.pack_for(gpu=resources.get("gpu", 0) > 0)
            recorded = without_password(given_url) if given_url else default_optuna_storage(root, name)
            meta = {"name": name, "space": space.name, "space_file": str(space.path.resolve()),
                    "space_sha256": space_hash(space.path), "seed": args.seed,
                    "optuna_storage": recorded, "optuna_study_name": name,
                    # several objectives: a Pareto front over them, in this order
                    "metric": list(space.objectives) if space.objectives else METRIC,
                    "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "num_samples": args.num_samples or space.num_samples,
                    "max_concurrent": args.max_concurrent or space.max_concurrent, "pack": pack,
                    "resources": resources, "data_root": data_root,
                    "grayscale": grayscale_rule(),   # left out of the splits, or kept: see study.engine.data
                    "command": " ".join(masked(a) if "://" in a else a for a in sys.argv)}
        meta["time_budget"] = budget
        clock.budget_s, clock.granted_at_s = budget["seconds"], budget["granted_at_s"]
        clock.started = time.time()
        storage_url = runtime_url(meta["optuna_storage"], root, given_url)
        packs = f" in packs of {meta['pack']}" if meta.get("pack", 1) > 1 else ""
        print(f"study {name}: space {space.name}, {meta['num_samples']} trials{packs}, {resources} per trial, "
              f"results in {under(root, 'results')}, Optuna {masked(storage_url)}")
        tuner = tb.build_tuner(tb.StudySettings(
            study_root=root, space=space, seed=meta.get("seed", args.seed), storage_url=storage_url,
            optuna_study_name=meta["optuna_study_name"], num_samples=meta["num_samples"],
            max_concurrent=args.max_concurrent or meta.get("max_concurrent") or space.max_concurrent,
            resources=resources, data_root=data_root, cache_dir=cache_dir, resume=args.resume,
            pack=meta.get("pack", 1), cluster=bool(address), objectives=space.objectives,
            grayscale=meta.get("grayscale", "kept"), clock=clock, verbose=args.verbose))
        if space_changed:
            meta.setdefault("space_changes", []).append(
                {"sha256": space_hash(space.path), "resumed": time.strftime("%Y-%m-%d %H:%M:%S")})
        # Only now: a run that failed before this point has not used the study's name up.
        write_json(root, "study.json", meta)
        cli.work_started()
        tuner.fit()
        budget_stopped = tuner.budget_stopped
        tuner.final_status("stopped" if signals.received else "budget" if budget_stopped else "finished")
        tb.shutdown()   # no Ray process of ours outlives the study, however it ended
    resume_cmd = stopping.resume_command(root, args.storage, name, space, given_url)
    if signals.received:   # not the "best" table of a study that did not finish
        stopped = stopping.Stopped(signals.received, resume_cmd)
        print(f"\n{stopped}", file=sys.stderr)
        return stopped.exit_status
    if budget_stopped:
        print(f"\n{stopping.budget_summary(root, clock)}\n  {resume_cmd} --time-budget 1h   "
              f"(or another budget, or --time-budget none)")
        return 0
    try:
        stopping.check_outcome(root)
    except stopping.NoTrialFinished as e:   # a Ray job shows FAILED
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    print("\nbest configuration per dataset x output (ranked by val PSNR in RGB; losses are not comparable):")
    print(best_table(root))
    print(f"\nresults: {under(root, 'results/trials.parquet')} (and epochs, previews);  "
          f"analysis: python -m analysis --study {root} --out report/;  "
          f"curves: tensorboard --logdir {root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
