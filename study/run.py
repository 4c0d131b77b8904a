"""Run a hyperparameter study: ``python -m study.run --space full``.

Ray Tune schedules the trials on this machine's (or a cluster's) GPUs or CPUs,
Optuna chooses configurations and prunes bad trials early, and the results land
as Parquet in ``<storage>/<name>/results/``.

Every option, the space file and the storage are checked before anything is
written and before Ray starts; a bad one ends the command with ``error: ...``
and exit status 2 (``study.cli``). ``study.json`` is written only when the study
really starts, so a run that fails before its first trial leaves the name free.
One driver per study (``study.lock``). The default Optuna SQLite database is
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
import stat
import sys
import time
from pathlib import Path

from study import cli
from study.cli import UsageError
# torch (via the space and config), pandas and Ray are imported where needed: a bad option is
# reported without loading any of them.

SQLITE = "sqlite:///"
DEFAULT_SQLITE = f"{SQLITE}optuna.db"   # study.json's spelling of "optuna.db in this study's folder"
# Set in a Ray job's driver (``ray job submit``, study.submit): its working directory is a temporary copy.
RAY_JOB_ENV = ("RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_JOB_ID")
# Files Ray unpickles on --resume: code runs from them, so they must be the user's own.
PICKLE_SUFFIXES = (".pkl", ".pickle")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m study.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="full", help="space name in search_spaces/ or a path to a .yaml file")
    p.add_argument("--name", help="study name (default: the space's name)")
    p.add_argument("--storage", default="studies",
                   help="where studies live: a local folder or a pyarrow URI such as s3://bucket/prefix")
    p.add_argument("--data-root", help="folder holding <dataset>/<split>/<class>/*.jpg (or $COLORIZE_DATA_ROOT)")
    p.add_argument("--cache-dir", help="decoded-image cache on each node (default ./.cache)")
    p.add_argument("--num-samples", type=int, help="trials to run, >= 1 (default: the space's)")
    p.add_argument("--max-concurrent", type=int, help="trials at once, >= 1 (default: the space's)")
    p.add_argument("--gpus-per-trial", type=float,
                   help="GPUs per trial, >= 0, fractions allowed (default: the space's)")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial, > 0 (default: the space's)")
    p.add_argument("--pack", type=int,
                   help="trials trained together as one fused model, >= 1 (default: the space's `pack`)")
    p.add_argument("--address", help="connect to an existing Ray cluster (e.g. auto, or ray://host:10001)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (no --address)")
    p.add_argument("--num-gpus", type=int, help="GPUs the local Ray instance advertises (no --address)")
    p.add_argument("--optuna-storage",
                   help="Optuna RDB URL (default: optuna.db in the study folder); a password in it is never "
                        "printed or stored: on --resume pass the URL again, or use $PGPASSWORD / ~/.pgpass")
    p.add_argument("--resume", action="store_true", help="continue the study after an interruption")
    p.add_argument("--seed", type=int, default=0, help="seed of Optuna's sampler")
    cli.add_debug(p)
    return p


# ------------------------------------------------------------------ checks before anything is written


def check_options(args: argparse.Namespace) -> None:
    """Numbers that cannot work; 0 is an error, not "use the default" (None is the default)."""
    import math

    rules = [("num_samples", 1, "trials to run (a negative number would run forever)"),
             ("max_concurrent", 1, "trials at once"), ("pack", 1, "trials per pack"),
             ("num_cpus", 1, "CPUs of the local Ray"), ("num_gpus", 0, "GPUs of the local Ray"),
             ("seed", 0, "the sampler's seed")]
    for name, low, what in rules:
        v = getattr(args, name)
        if v is not None and v < low:
            raise UsageError(f"--{name.replace('_', '-')} {v}: {what} must be >= {low}"
                             + ("; leave it out for the space's own value" if v == 0 else ""))
    for name, positive in (("cpus_per_trial", True), ("gpus_per_trial", False)):
        v = getattr(args, name)
        if v is not None and (not math.isfinite(v) or v < 0 or (positive and v == 0)):
            raise UsageError(f"--{name.replace('_', '-')} {v}: must be a number {'> 0' if positive else '>= 0'}"
                             + (" (fractions share a GPU, e.g. 0.25)" if not positive else ""))
    if args.address and (args.num_cpus is not None or args.num_gpus is not None):
        raise UsageError("--num-cpus/--num-gpus size a local Ray instance; with --address the cluster has its "
                         "own resources: leave them out")
    if args.name is not None and (not args.name.strip() or "/" in args.name or "\\" in args.name
                                  or args.name in (".", "..")):
        raise UsageError(f"--name {args.name!r}: a study name is one folder name (no '/', not '.' or '..')")


def in_ray_job(environ=None) -> bool:
    env = os.environ if environ is None else environ
    return any(env.get(k) for k in RAY_JOB_ENV)


def check_storage(storage: str, root: str) -> None:
    """A local storage must be a folder this process can create files in (probed; nothing is left)."""
    if "://" in storage:
        if storage.startswith("file://"):
            raise UsageError(f"--storage {storage}: give a local folder as a plain path")
        return
    if not Path(storage).is_absolute() and in_ray_job():
        raise UsageError(
            f"--storage {storage!r} is relative, and this runs as a Ray job whose working directory is a "
            f"temporary copy that disappears: use shared storage every node reaches (s3://bucket/prefix) "
            f"or an absolute path on a filesystem mounted on every node")
    cli.check_writable(f"--storage {storage}", Path(root), "studies")


def check_pickles(root: str) -> None:
    """Ray unpickles its state on --resume: refuse files others could have written (as ssh does with keys)."""
    from study.results import resolve

    fs, path = resolve(root)
    if "://" in root:
        return   # object stores have no owner/mode bits: trust rests on the bucket's policy
    me, my_group = os.geteuid(), os.getegid()
    folder = Path(path)
    bad = []
    for p in [folder, *sorted(q for q in folder.rglob("*") if q.suffix in PICKLE_SUFFIXES)]:
        st = p.lstat()
        # Group-writable counts only for a group other than the user's own (umask 002 with
        # user-private groups makes every file g+w; a shared team group is what could tamper).
        writers = [who for who, bit in (("others", 0o002), ("group", 0o020)) if st.st_mode & bit
                   and (who == "others" or st.st_gid != my_group)]
        if stat.S_ISLNK(st.st_mode):
            bad.append(f"{p} is a symbolic link")
        elif st.st_uid != me:
            bad.append(f"{p} is owned by uid {st.st_uid}, not you ({me})")
        elif writers:
            bad.append(f"{p} is writable by {' and '.join(reversed(writers))} (gid {st.st_gid})"
                       if "group" in writers else f"{p} is writable by others")
        if len(bad) >= 5:
            break
    if bad:
        raise UsageError("--resume would load Ray's pickled state, which runs code, from files someone else "
                         "could have changed: " + "; ".join(bad) + f". If you trust them, take them over: "
                         f"chown -R $(id -u) {folder} && chmod -R go-w {folder}")


# ------------------------------------------------------------------ Optuna storage URLs


def _url(url: str):
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError) as e:
        shown = str(e).replace(url, masked(url))
        raise UsageError(f"--optuna-storage {masked(url)}: not a database URL ({shown}); e.g. "
                         f"postgresql://user@host/db or sqlite:////abs/path/optuna.db") from None


def masked(url: str) -> str:
    """For output: the URL with its password shown as ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - unparsable: hide whatever sits between ':' and '@' by hand
        import re
        return re.sub(r"//([^/@:]*):[^@]*@", r"//\1:***@", url)


def without_password(url: str) -> str:
    """For files: the URL with no password at all (the secret comes from the environment)."""
    return _url(url)._replace(password=None).render_as_string(hide_password=False)


def check_optuna_url(url: str) -> None:
    """Reach a given Optuna database before Ray starts (SQLite: only its folder, so nothing is created)."""
    parsed = _url(url)
    if parsed.drivername.startswith("sqlite"):
        db = parsed.database or ""
        folder = Path(db).resolve().parent if db and db != ":memory:" else None
        if folder is None or not folder.is_dir():
            raise UsageError(f"--optuna-storage {url}: the folder of the SQLite file does not exist; give "
                             f"sqlite:////absolute/path/optuna.db in an existing folder (or leave it out)")
        return
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    shown = masked(url)
    secret = parsed.password or "\0"
    try:
        engine = create_engine(url)
    except ImportError as e:
        raise UsageError(f"--optuna-storage {shown}: its database driver is not installed ({e}); install it "
                         f"(PostgreSQL: pip install -e '.[postgres]' (psycopg 3; postgresql+psycopg://...))"
                         ) from None
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0].replace(secret, "***")
        raise UsageError(f"--optuna-storage {shown}: cannot connect ({reason}); check the host, the database "
                         f"and the credentials (a password: $PGPASSWORD or ~/.pgpass rather than the URL)") from None
    finally:
        engine.dispose()


def runtime_url(recorded: str, root: str, given: str | None) -> str:
    """The URL to connect with: the recorded one (relative SQLite resolved in the study folder), or the
    one given again on --resume (for its password)."""
    if given:
        if without_password(given) != recorded:
            raise UsageError(f"--optuna-storage {masked(given)} is not the study's ({masked(recorded)}); "
                             f"leave it out to use the study's own")
        return given
    if recorded.startswith(SQLITE) and not recorded[len(SQLITE):].startswith("/"):
        if "://" in root:
            raise UsageError(f"study.json keeps a relative SQLite path {recorded!r}, which cannot live on "
                             f"{root}: pass --optuna-storage")
        from study.results import resolve
        return f"{SQLITE}{Path(resolve(root)[1]) / recorded[len(SQLITE):]}"
    return recorded


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
    from study.contract import best_trials, gain
    from study.results import read_table

    best = best_trials(read_table(root, "trials"), by=["dataset", "output"])
    if best.empty:
        return "no trial finished an epoch"
    best = best.assign(vs_gray=gain(best))
    cols = ["dataset", "output", "trial_id", "status", "best_val_psnr", "val_gray_psnr", "vs_gray",
            "best_test_psnr", "best_test_ssim", "sampling", "depth", "base_filters", "lr", "batch_size",
            "loss", "epochs_run"]
    return best[[c for c in cols if c in best]].to_string(index=False, float_format=lambda v: f"{v:.4g}")


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    check_options(args)
    from study.results import read_json, write_json
    from study.space import load_space

    space = load_space(args.space)
    name = args.name or space.name
    root = study_root(args.storage, name)
    check_storage(args.storage, root)
    given_url = args.optuna_storage
    meta = read_json(root, "study.json")
    if args.resume and meta is None:
        raise UsageError(f"--resume: no study at {root}; run without --resume to start it")
    from study import lock
    held = lock.holder(root)
    if held is not None:
        raise lock.LockError(lock.refusal(root, held))
    if meta is not None and not args.resume:
        from study import tune_backend as tb
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
        from study.data import ALLOW_GRAYSCALE_ENV, grayscale_rule
        # Studies from before the rule was recorded kept their grayscale images.
        recorded, now = meta.get("grayscale", "kept"), grayscale_rule()
        if recorded != now:
            fix = (f"set {ALLOW_GRAYSCALE_ENV}=1 to resume it as it was" if recorded == "kept"
                   else f"unset {ALLOW_GRAYSCALE_ENV} to resume it")
            raise UsageError(f"--resume: the study at {root} was started with grayscale images {recorded} of its "
                             f"data splits, and they would now be {now}; PSNR from the two rules cannot be "
                             f"compared (grayscale images score ~110 dB as their own input). {fix[0].upper()}"
                             f"{fix[1:]}, or start a new study with --name (nothing was changed)")
    if meta is not None and meta.get("space_sha256") not in (None, space_hash(space.path)):
        print(f"note: {space.path} changed since the study started; the study goes on with the file as it "
              f"is now (Optuna keeps its earlier trials)", file=sys.stderr)
    if given_url:
        check_optuna_url(runtime_url(meta["optuna_storage"], root, given_url) if meta else given_url)
    if args.pack is not None and args.pack > 1 and space.enqueue:
        raise UsageError(f"--pack {args.pack}: {space.path} has an `enqueue` list, which needs pack 1 (a pack's "
                         f"members share one structure); leave --pack out")
    if args.resume:
        check_pickles(root)
        from study.results import read_table
        for table in ("trials", "epochs"):   # a corrupt table is named now, not when the driver first writes
            read_table(root, table)
        from study import tune_backend as tb
        if not tb.can_resume(root):
            raise UsageError(f"--resume: the study at {root} never started a trial (Ray Tune saved no state); "
                             f"run it again without --resume")
        if args.pack is not None and args.pack != meta.get("pack", 1):
            raise UsageError(f"--pack {args.pack}: the study was started with pack {meta.get('pack', 1)}; "
                             f"a resumed study keeps its pack size (leave --pack out)")
    data_root = str(Path(args.data_root).resolve()) if args.data_root else os.environ.get("COLORIZE_DATA_ROOT")
    if data_root and not Path(data_root).is_dir() and "://" not in data_root:
        raise UsageError(f"--data-root {data_root} is not a folder; give the folder holding cifar10/ and "
                         f"flowers102/ (or leave it out to download them)")
    cache_dir = str(Path(args.cache_dir or os.environ.get("COLORIZE_CACHE_DIR") or ".cache").resolve())
    cli.check_writable(f"--cache-dir {args.cache_dir or cache_dir}", Path(cache_dir), "the decoded-image cache")

    if not args.address:  # on a cluster each node decodes into its own cache
        prepare_data(space, data_root, cache_dir)

    # Ray is imported only here: the trial engine does not need it.
    from study import tune_backend as tb

    resources = dict(space.resources)
    if args.gpus_per_trial is not None:
        resources["gpu"] = args.gpus_per_trial
    if args.cpus_per_trial is not None:
        resources["cpu"] = args.cpus_per_trial
    with lock.StudyLock(root):
        cluster = tb.init_ray(args.address, args.num_cpus, args.num_gpus)
        if resources.get("gpu", 0) and not cluster.get("GPU"):
            print("note: the Ray cluster has no GPU; trials run on CPUs only")
            resources["gpu"] = 0
        if meta is None:
            from study.data import grayscale_rule
            # Packs pay where one device has parallel work to spare: the space says how many per device kind.
            pack = args.pack or space.pack_for(gpu=resources.get("gpu", 0) > 0)
            recorded = without_password(given_url) if given_url else default_optuna_storage(root, name)
            meta = {"name": name, "space": space.name, "space_file": str(space.path.resolve()),
                    "space_sha256": space_hash(space.path), "seed": args.seed,
                    "optuna_storage": recorded, "optuna_study_name": name,
                    # several objectives: a Pareto front over them, in this order
                    "metric": list(space.objectives) if space.objectives else tb.METRIC,
                    "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "num_samples": args.num_samples or space.num_samples,
                    "max_concurrent": args.max_concurrent or space.max_concurrent, "pack": pack,
                    "resources": resources, "data_root": data_root,
                    "grayscale": grayscale_rule(),   # left out of the splits, or kept: see study.data
                    "command": " ".join(masked(a) if "://" in a else a for a in sys.argv)}
        storage_url = runtime_url(meta["optuna_storage"], root, given_url)
        packs = f" in packs of {meta['pack']}" if meta.get("pack", 1) > 1 else ""
        print(f"study {name}: space {space.name}, {meta['num_samples']} trials{packs}, {resources} per trial, "
              f"results in {under(root, 'results')}, Optuna {masked(storage_url)}")
        tuner = tb.build_tuner(
            study_root=root, space=space, seed=meta.get("seed", args.seed), storage_url=storage_url,
            optuna_study_name=meta["optuna_study_name"], num_samples=meta["num_samples"],
            max_concurrent=args.max_concurrent or meta.get("max_concurrent") or space.max_concurrent,
            resources=resources, data_root=data_root, cache_dir=cache_dir, resume=args.resume,
            pack=meta.get("pack", 1), cluster=bool(args.address), objectives=space.objectives,
            grayscale=meta.get("grayscale", "kept"))
        if not args.resume:
            # Only now: a run that failed before this point has not used the study's name up.
            write_json(root, "study.json", meta)
        cli.work_started()
        tuner.fit()
    print("\nbest configuration per dataset x output (ranked by val PSNR in RGB; losses are not comparable):")
    print(best_table(root))
    print(f"\nresults: {under(root, 'results/trials.parquet')} (and epochs, previews);  "
          f"analysis: python -m analysis --study {root};  "
          f"curves: tensorboard --logdir {root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
