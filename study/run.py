"""Run a hyperparameter study: ``python -m study.run --space full``; the checks, then the study under Ray.

What it does for its user (the text of ``--help``) and its options are in study.run_args. Every option, the
space file and the storage are checked before anything is written and before Ray starts; ``study.json`` is
written only when the study really starts.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study import cli
from study.cli import Terminated, UsageError

# torch (via the space and config), pandas and Ray are imported where needed: a bad option is
# reported without loading any of them.
from study.driver import (DEFAULT_SQLITE, NoTrialFinished, Signals, Stopped, StudyClock, StudyLock, best_table,
                          budget_summary, check_address, check_capacity, check_options, check_optuna_url,
                          check_outcome, check_pickles, check_resume_database, check_storage, check_storage_url,
                          check_unlocked, driver_pid, in_own_session, in_ray_job, masked, missing_epochs,
                          more_trials, nothing_started, own_session_wanted, read_study_json, resume_command,
                          runtime_url, space_change_problems, spent_before, time_budget, without_password)
from study.durations import duration
from study.info import current_space_sha, keep_space_copy, local_space_file, space_argument, under
from study.run_args import parser


# ------------------------------------------------------------------ the study

def space_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def study_root(storage: str, name: str) -> str:
    return under(storage, name) if "://" in storage else str(Path(storage).resolve() / name)


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


# ------------------------------------------------------------------ the command's steps

@dataclass(frozen=True)
class Study:
    """A study as the checks leave it: what was asked, what is known of it, and where it runs; nothing written."""
    args: argparse.Namespace
    space: Any                  # study.space.Space
    name: str
    root: str
    meta: dict | None           # the study.json of a study that started before; None: a new study
    space_changed: bool         # its space file changed since it started
    clock: Any                  # study.driver.StudyClock
    budget: dict                # the time budget as study.json records it (time_budget)
    data_root: str | None
    cache_dir: str
    address: str | None         # the Ray cluster it joins; None: a private local Ray
    resources: dict             # each trial's
    optuna_read: Any = None     # a resumed study's Optuna study being read meanwhile (study.tune.preread)


def plan_request(study: Study):
    """(study.plan's Request for what is left of ``study``, its total, trials done): a new study's every trial;
    a resumed one's not done or pruned (a stopped or errored one counted whole) and the budget it has left."""
    from study.plan import Request, local_resources
    args, space, meta = study.args, study.space, study.meta or {}
    cluster = local_resources(args.num_cpus, args.num_gpus)
    resources = {**study.resources, "gpu": study.resources.get("gpu", 0) if cluster["GPU"] else 0}
    total, ended = trials_ended(study)
    seconds = study.budget["seconds"]
    left = None if seconds is None else seconds - (study.clock.spent_before_s - study.budget["granted_at_s"])
    return Request(num_samples=max(total - ended, 0), resources=resources, cluster_resources=cluster,
                   max_concurrent=args.max_concurrent or meta.get("max_concurrent") or space.max_concurrent,
                   pack=meta.get("pack") or args.pack or space.pack_for(gpu=resources["gpu"] > 0),
                   data_root=study.data_root, time_budget_s=left), total, ended


def trials_ended(study: Study) -> tuple[int, int]:
    """(the study's total of trials, how many of them a run would not run again: done or pruned; a stopped or
    errored trial runs again on --resume). A new study has ended none."""
    meta = study.meta or {}
    total = meta.get("num_samples") or study.args.num_samples or study.space.num_samples
    if study.meta is None:
        return total, 0
    from study.results import read_table
    trials = read_table(study.root, "trials")
    return total, 0 if trials is None else int(trials.status.isin(["DONE", "PRUNED"]).sum())


def nothing_to_run(study: Study, total: int, ended: int) -> str:
    """The one line that says a resumed study has run all its trials, and the command that gives it more."""
    more = resume_command(study.root, study.args.storage, study.name, space_argument(study.root, study.meta or {}),
                          study.args.optuna_storage, 2 * total)
    return (f"nothing to run: the study has done all its {total} trials ({ended} of {total} done or pruned); "
            f"to add trials, resume it with a larger total, --num-samples M with M > {total}: {more}")


def check_feasible(study: Study) -> None:
    """Refuse a study that cannot end within a century on this machine, from a bound that times nothing
    (study.plan.lower_bound_s); a cluster's resources are known only once Ray joins it."""
    from study.plan import check_feasible as refuse_beyond_a_century
    request = plan_request(study)[0]
    if request.num_samples and not study.address:
        refuse_beyond_a_century(study.space, request)


def print_plan(study: Study) -> int:
    """``--plan``: the plan of what is left of the study, after the checks a run makes (its refusals too)."""
    from study import plan
    r, total, ended = plan_request(study)
    if study.meta is not None:
        budget = "" if r.time_budget_s is None else f"; {duration(max(r.time_budget_s, 0))} of its budget left"
        print(f"resuming study {study.name}: {ended} of {total} trials done or pruned, {r.num_samples} to run (a "
              f"stopped trial counted whole); {duration(study.clock.spent_before_s)} of running time so far{budget}")
    if not r.num_samples:
        print(nothing_to_run(study, total, ended))
        return 0
    print(plan.format_plan(plan.estimate(study.space, r)))
    check_feasible(study)
    return 0


@dataclass(frozen=True)
class Ending:
    """How a run of the study ended: stopped by a signal (its number), by its time budget, or it ran out."""
    signal: int | None
    budget_stopped: bool = False
    at_once: bool = False   # the signal stopped it before a safe point (a second one, or before Tune ran)
    started: bool = True    # it got as far as starting the study (study.json written)


def _main(argv: list[str], own_session: bool = False) -> int:
    try:   # a signal while the options are read is the same as one later, before the study starts
        args = parse(argv)
        if own_session and not args.plan and not (args.address or in_ray_job()) and own_session_wanted():
            # A private Ray: the study and its Ray run in a session of their own (see in_own_session).
            return in_own_session([sys.executable, "-m", "study.run", *argv])
        space = checked_space(args)
        study = open_study(args, space)   # the same checks for --plan as for a run: nothing written, no Ray
        if args.plan:
            return print_plan(study)
        total, ended = trials_ended(study)
        if ended >= total:   # a resumed study with nothing left: no Ray, nothing written
            print(nothing_to_run(study, total, ended))
            return 0
        check_feasible(study)
        if not study.address:  # on a cluster each node decodes into its own cache
            prepare_data(space, study.data_root, study.cache_dir)
    except (KeyboardInterrupt, Terminated) as e:
        stopped = nothing_started(e)
        print(f"\n{stopped}", file=sys.stderr)
        return stopped.exit_status
    return summarise(study, run(study))


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line, each option checked on its own (study.driver.checks)."""
    args = parser().parse_args(argv)
    check_options(args)
    return args


def checked_space(args: argparse.Namespace):
    """The space file, read after the storage URL is known to be one (never a local folder named "s3:")."""
    from study.space import load_space

    check_storage_url(args.storage)
    return load_space(local_space_file(args.space))   # a study's copy on an object store too


def open_study(args: argparse.Namespace, space) -> Study:
    """The study to run, new or the one ``--resume`` continues; everything is checked, nothing written."""
    name = args.name or space.name
    root = study_root(args.storage, name)
    check_storage(args.storage, root)
    check_address(args.address)
    meta = existing_study(args, space, root)
    space_changed = meta is not None and meta.get("space_sha256") not in (None, space_hash(space.path))
    if args.pack is not None and args.pack > 1 and space.enqueue:
        raise UsageError(f"--pack {args.pack}: {space.path} has an `enqueue` list, which needs pack 1 (a pack's "
                         f"members share one structure); leave --pack out")
    read = None
    if args.resume:
        total, read = check_resume(args, space, root, meta, space_changed)
        meta = {**meta, "num_samples": total}
    clock = StudyClock(spent_before_s=spent_before(root) if meta is not None else 0.0)
    budget = time_budget(args, meta, space, clock)
    data_root, cache_dir = data_places(args)
    address = ray_address(args)
    return Study(args, space, name, root, meta, space_changed, clock, budget, data_root, cache_dir, address,
                 trial_resources(args, space), read)


def existing_study(args: argparse.Namespace, space, root: str) -> dict | None:
    """The study.json of the study at ``root`` when there is one to continue (None: start it); refuses a
    study another driver runs, one that exists without ``--resume``, and one ``--resume`` cannot continue
    as it was started."""
    meta = read_study_json(root, resume=args.resume)
    if args.resume and meta is None:
        raise UsageError(f"--resume: no study at {root}; run without --resume to start it")
    check_unlocked(root)
    if meta is not None and not args.resume:
        from study.tune import can_resume
        if can_resume(root):
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
        check_grayscale_rule(meta, root)
    if args.optuna_storage:
        check_optuna_url(runtime_url(meta["optuna_storage"], root, args.optuna_storage) if meta
                         else args.optuna_storage)
    return meta


def check_grayscale_rule(meta: dict, root: str) -> None:
    """A resumed study keeps the grayscale rule it started with (study.engine.grayscale.grayscale_rule)."""
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


def check_resume(args: argparse.Namespace, space, root: str, meta: dict, space_changed: bool) -> tuple[int, Any]:
    """What ``--resume`` needs besides study.json: Ray's saved state, a search state this version reads, the
    study's pack, its own Optuna database and a space file Optuna can still draw from. Returns the study's
    total of trials (``--num-samples`` may raise it) and its Optuna study as a process of its own reads it
    from then on (study.tune.preread: seconds' worth in a study of 10,000 trials; None for ``--plan``)."""
    from study.tune import OptunaRead, saved_total_trials
    check_saved_state(root)
    if args.pack is not None and args.pack != meta.get("pack", 1):
        raise UsageError(f"--pack {args.pack}: the study was started with pack {meta.get('pack', 1)}; "
                         f"a resumed study keeps its pack size (leave --pack out)")
    url = runtime_url(meta["optuna_storage"], root, args.optuna_storage)
    check_resume_database(url, meta["optuna_study_name"])
    read = None if args.plan else OptunaRead(url, meta["optuna_study_name"])
    total = meta.get("num_samples")
    if args.num_samples is not None:
        total = more_trials(root, meta, args.num_samples, saved_total_trials(root))
    if space_changed:
        problems = space_change_problems(space, url, meta["optuna_study_name"])
        if problems:
            raise UsageError(f"--resume: {space.path} changed since the study started, and Optuna cannot draw "
                             f"new trials from it: {'; '.join(problems)}. Put those back as they were, or "
                             f"start a new study with --name (nothing was changed)")
        print(f"note: {space.path} changed since the study started: trials already started keep their "
              f"configuration, and new trials are drawn from the file as it is now (recorded in study.json "
              f"under space_changes)", file=sys.stderr)
    return total, read


def check_saved_state(root: str) -> None:
    """The files a resume reads: the pickles it unpickles, the results tables, Ray's saved state."""
    from study.results import read_table
    from study.tune import can_resume, saved_state_refusal

    check_pickles(root)
    # A corrupt table is named now, not when the driver first writes.
    tables = {table: read_table(root, table) for table in ("trials", "epochs")}
    for trial_id, gone in missing_epochs(tables["trials"], tables["epochs"]).items():
        print(f"warning: the epochs table lacks epoch(s) {', '.join(map(str, gone))} of trial {trial_id} (their "
              f"files under results/epochs.parquet are gone); its other epochs are kept, and its trials row "
              f"counts only the epochs that are there", file=sys.stderr)
    if not can_resume(root):
        raise UsageError(f"--resume: the study at {root} never started a trial (Ray Tune saved no state); "
                         f"run it again without --resume")
    refusal = saved_state_refusal(root)
    if refusal:
        raise UsageError(f"--resume: the study at {root} {refusal}")


def data_places(args: argparse.Namespace) -> tuple[str | None, str]:
    """(data root, decoded-image cache) of the study, checked."""
    data_root = str(Path(args.data_root).resolve()) if args.data_root else os.environ.get("COLORIZE_DATA_ROOT")
    if data_root and not Path(data_root).is_dir() and "://" not in data_root:
        raise UsageError(f"--data-root {data_root} is not a folder; give the folder holding cifar10/ and "
                         f"flowers102/ (or leave it out to download them)")
    cache_dir = str(Path(args.cache_dir or os.environ.get("COLORIZE_CACHE_DIR") or ".cache").resolve())
    cli.check_writable(f"--cache-dir {args.cache_dir or cache_dir}", Path(cache_dir), "the decoded-image cache")
    return data_root, cache_dir


def ray_address(args: argparse.Namespace) -> str | None:
    """The Ray cluster the study joins (None: a private local Ray)."""
    # Inside a Ray job (`ray job submit`) the study joins the job's cluster: a private Ray there could not
    # fetch the job's working directory, and every trial would fail.
    address = args.address or ("auto" if in_ray_job() else None)
    if address and (args.num_cpus is not None or args.num_gpus is not None):
        raise UsageError("--num-cpus/--num-gpus size a local Ray instance; this study joins a Ray cluster "
                         f"({'a Ray job' if not args.address else '--address'}), which has its own resources: "
                         f"leave them out")
    return address


def trial_resources(args: argparse.Namespace, space) -> dict:
    resources = dict(space.resources)
    if args.gpus_per_trial is not None:
        resources["gpu"] = args.gpus_per_trial
    if args.cpus_per_trial is not None:
        resources["cpu"] = args.cpus_per_trial
    return resources


def run(study: Study) -> Ending:
    """Run the study under its lock; a refusal or a signal before it started leaves no folder the lock made."""
    made = [] if "://" in study.root else [p for p in (Path(study.root), Path(study.root).parent) if not p.exists()]
    signals = Signals()
    try:
        with signals:
            signals.install()   # from here a signal stops the run (before Tune runs: before anything is started)
            return run_with_ray(study, signals)
    except KeyboardInterrupt:
        if signals.received is None:
            raise
        if not signals.started:
            remove_empty(made)
        return Ending(signals.received, at_once=True, started=signals.started)
    except UsageError:
        # Refused before the study started (e.g. resources no node has): leave no folder the lock made.
        remove_empty(made)
        raise


def remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()   # only if empty


def run_with_ray(study: Study, signals: Signals) -> Ending:
    """Start Ray, build (or restore) the study's Tuner, record the study and run it to its end."""
    # Ray is imported only here (and by the checks of a study that exists): the trial engine does not need it.
    from study.tune import init_ray, node_resources, shutdown

    args = study.args
    with StudyLock(study.root, pid=driver_pid()):
        prepared = prepared_while_ray_starts(study)
        cluster = init_ray(study.address, args.num_cpus, args.num_gpus)   # it keeps our handlers
        from study.tune import StudySettings, build_tuner   # waits for the thread's import of them
        resources = dict(study.resources)
        if resources.get("gpu", 0) and not cluster.get("GPU"):
            print("note: the Ray cluster has no GPU; trials run on CPUs only")
            resources["gpu"] = 0
        check_capacity(resources, node_resources(), fixed=not study.address)
        meta = dict(study.meta) if study.meta is not None else new_study_json(study, resources)
        meta["time_budget"] = study.budget
        study.clock.budget_s, study.clock.granted_at_s = study.budget["seconds"], study.budget["granted_at_s"]
        study.clock.started = time.time()
        storage_url = runtime_url(meta["optuna_storage"], study.root, args.optuna_storage)
        packs = f" in packs of {meta['pack']}" if meta.get("pack", 1) > 1 else ""
        print(f"study {study.name}: space {study.space.name}, {meta['num_samples']} trials{packs}, {resources} per "
              f"trial, results in {under(study.root, 'results')}, Optuna {masked(storage_url)}")
        tuner = build_tuner(StudySettings(
            study_root=study.root, space=study.space, seed=meta.get("seed", args.seed), storage_url=storage_url,
            optuna_study_name=meta["optuna_study_name"], num_samples=meta["num_samples"],
            max_concurrent=args.max_concurrent or meta.get("max_concurrent") or study.space.max_concurrent,
            resources=resources, data_root=study.data_root, cache_dir=study.cache_dir, resume=args.resume,
            pack=meta.get("pack", 1), cluster=bool(study.address), objectives=study.space.objectives,
            grayscale=meta.get("grayscale", "kept"), clock=study.clock, verbose=args.verbose,
            driver_pid=driver_pid(), optuna_opening=prepared if resumed(study) else None))
        record_start(study, meta)
        signals.started = True
        tuner.fit()
        ending = Ending(signals.received, tuner.budget_stopped)
        tuner.final_status("stopped" if ending.signal else "budget" if ending.budget_stopped else "finished")
        shutdown()   # no Ray process of ours outlives the study, however it ended
    return ending


def resumed(study: Study) -> bool:
    return bool(study.args.resume and study.meta is not None)


def prepared_while_ray_starts(study: Study) -> Future:
    """On a thread of its own while Ray starts (mostly waiting for its processes): import the Tuner's parts
    (torch among them, and tensorboardX for Tune's logger), then open a resumed study's Optuna study on what
    ``study.optuna_read`` read meanwhile. Its result: (storage, Optuna study) for a resumed study, None for a
    new one (its Optuna study is made once Ray has started)."""
    meta, args = study.meta, study.args

    def prepare() -> tuple | None:
        from study.tune import resumed_optuna   # the Tuner's parts with it
        with contextlib.suppress(ImportError):   # else Tune's start imports it (torch too), on the driver's thread
            import tensorboardX  # noqa: F401

        if not resumed(study):
            return None
        url = runtime_url(meta["optuna_storage"], study.root, args.optuna_storage)
        return resumed_optuna(url, meta["optuna_study_name"], study.space, meta.get("seed", args.seed),
                              study.space.objectives, meta.get("pack", 1), study.optuna_read)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
    try:
        return pool.submit(prepare)
    finally:
        pool.shutdown(wait=False)


def new_study_json(study: Study, resources: dict) -> dict:
    """What study.json records of a new study (its Optuna URL without a password)."""
    from study.engine import grayscale_rule
    from study.tune import METRIC

    args, space = study.args, study.space
    # Packs pay where one device has parallel work to spare: the space says how many per device kind.
    pack = args.pack or space.pack_for(gpu=resources.get("gpu", 0) > 0)
    recorded = (without_password(args.optuna_storage) if args.optuna_storage
                else default_optuna_storage(study.root, study.name))
    return {"name": study.name, "space": space.name, "space_file": str(space.path.resolve()),
            "space_sha256": space_hash(space.path), "seed": args.seed,
            "optuna_storage": recorded, "optuna_study_name": study.name,
            # several objectives: a Pareto front over them, in this order
            "metric": list(space.objectives) if space.objectives else METRIC,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "num_samples": args.num_samples or space.num_samples,
            "max_concurrent": args.max_concurrent or space.max_concurrent, "pack": pack,
            "resources": resources, "data_root": study.data_root,
            "grayscale": grayscale_rule(),   # left out of the splits, or kept: see study.engine.data
            "command": " ".join(masked(a) if "://" in a else a for a in sys.argv)}


def record_start(study: Study, meta: dict) -> None:
    """Write study.json: only now, so a run that failed before this point has not used the study's name up."""
    from study.results import write_json

    sha = space_hash(study.space.path)
    if sha != current_space_sha(meta):   # not the file the study's last run drew from
        meta["space_changes"] = [*meta.get("space_changes", []),
                                 {"sha256": sha, "resumed": time.strftime("%Y-%m-%d %H:%M:%S")}]
    # The file as this run draws from it (again: the same name for the same contents), for resume commands.
    keep_space_copy(study.root, study.space.path, sha, study.space.name)
    write_json(study.root, "study.json", meta)
    cli.work_started()


def summarise(study: Study, ending: Ending) -> int:
    """Say how the study ended, with the command that continues it when it can go on; its exit status."""
    args = study.args
    meta = read_study_json(study.root, resume=False) or {"space": study.space.name}
    resume_cmd = resume_command(study.root, args.storage, study.name, space_argument(study.root, meta),
                                args.optuna_storage)
    if ending.signal:   # not the "best" table of a study that did not finish
        something = ending.started or study.meta is not None   # a resumed study always has its state to go on
        stopped = Stopped(ending.signal, resume_cmd if something else None, ending.at_once, ending.started)
        print(f"\n{stopped}", file=sys.stderr)
        return stopped.exit_status
    if ending.budget_stopped:
        print(f"\n{budget_summary(study.root, study.clock)}\n  {resume_cmd} --time-budget 1h   "
              f"(or another budget, or --time-budget none)")
        return 0
    try:
        check_outcome(study.root)
    except NoTrialFinished as e:   # a Ray job shows FAILED
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    print("\nbest configuration per dataset x output (ranked by val PSNR in RGB; losses are not comparable):")
    print(best_table(study.root))
    print(f"\nresults: {under(study.root, 'results/trials.parquet')} (and epochs, previews);  "
          f"analysis: python -m analysis --study {study.root} --out report/;  "
          f"curves: tensorboard --logdir {study.root}")
    return 0


def main(argv: list[str] | None = None, own_session: bool = False) -> int:
    """``own_session``: a study that starts a private Ray runs in a session of its own (``python -m study.run``)."""
    return cli.run(lambda args: _main(args, own_session), argv)


if __name__ == "__main__":
    sys.exit(main(own_session=True))
