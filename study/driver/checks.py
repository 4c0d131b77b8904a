"""What ``study.run`` checks before anything is written or Ray starts: its options, the storage
location (a folder or a URL), the files Ray unpickles on ``--resume``, Optuna database URLs, and that a
resumed study's Optuna database is its own. Each failure is a ``UsageError`` naming the fix."""
from __future__ import annotations

import argparse
import os
import re
import stat
from pathlib import Path
from urllib.parse import urlsplit

from study import cli
from study.cli import UsageError

SQLITE = "sqlite:///"
DEFAULT_SQLITE = f"{SQLITE}optuna.db"   # study.json's spelling of "optuna.db in this study's folder"
# Set in a Ray job's driver (``ray job submit``, study.submit): its working directory is a temporary copy.
RAY_JOB_ENV = ("RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_JOB_ID")
MAX_NAME_BYTES = 120
# What a study.json must hold for --resume (study.run writes all of these).
STUDY_KEYS = ("name", "space", "optuna_storage", "optuna_study_name", "num_samples")
# Files Ray unpickles on --resume: code runs from them, so they must be the user's own.
PICKLE_SUFFIXES = (".pkl", ".pickle")


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
    if args.name is not None and len(args.name.encode()) > MAX_NAME_BYTES:
        raise UsageError(f"--name: {len(args.name.encode())} bytes long; a study name is a folder name of at most "
                         f"{MAX_NAME_BYTES} bytes (file systems allow 255, and Ray adds to it)")


def in_ray_job(environ=None) -> bool:
    env = os.environ if environ is None else environ
    return any(env.get(k) for k in RAY_JOB_ENV)


# URL schemes of pyarrow filesystems a study can live on, and what must follow ``scheme://``.
STORAGE_SCHEMES = {"s3": "bucket", "gs": "bucket", "gcs": "bucket", "hdfs": "host", "abfs": "container",
                   "abfss": "container"}
_URL_START = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(//)?")


def check_storage_url(storage: str) -> None:
    """A storage that looks like a URL must be one a study can live on: never a local folder named ``s3:``."""
    m = _URL_START.match(storage)
    if m is None:
        return   # a local folder
    scheme = m[1].lower()
    kinds = ", ".join(f"{k}://<{v}>/<prefix>" for k, v in STORAGE_SCHEMES.items() if k != "gcs")
    if scheme == "file":
        raise UsageError(f"--storage {storage}: give a local folder as a plain path")
    if not m[2]:
        raise UsageError(f"--storage {storage!r} looks like a URL without '//': write {scheme}://<bucket>/<prefix>, "
                         f"or ./{storage} for a local folder of that name")
    if scheme not in STORAGE_SCHEMES:
        raise UsageError(f"--storage {storage}: {scheme}:// is not a storage a study can live on; give a local "
                         f"folder or one of {kinds}")
    if not urlsplit(storage).netloc:
        what = STORAGE_SCHEMES[scheme]
        raise UsageError(f"--storage {storage}: no {what} after {scheme}://; write {scheme}://<{what}>/<prefix>")


def check_storage(storage: str, root: str) -> None:
    """A local storage must be a folder this process can create files in (probed; nothing is left)."""
    check_storage_url(storage)
    if "://" in storage:
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


def check_resume_database(url: str, study_name: str) -> None:
    """The Optuna database of a study to resume exists and holds that study (a missing or foreign one
    would silently start an empty study that Ray's restored state cannot use)."""
    fix = "start a new study with --name (nothing was changed)"
    if url.startswith(SQLITE):
        import sqlite3
        path = Path(url[len(SQLITE):])
        if not path.is_file():
            raise UsageError(f"--resume: the study's Optuna database {path} is missing; it records which "
                             f"configurations were tried. Put the study's own optuna.db back (from a copy), or {fix}")
        try:
            # Read-write, as Optuna opens it: a killed driver may leave a journal that SQLite rolls back.
            con = sqlite3.connect(str(path))
            try:
                names = {r[0] for r in con.execute("SELECT study_name FROM studies")}
            finally:
                con.close()
        except sqlite3.DatabaseError as e:
            raise UsageError(f"--resume: {path} is not an Optuna database ({e}); put the study's own optuna.db "
                             f"back (from a copy), or {fix}") from None
    else:
        import optuna
        names = set(optuna.study.get_all_study_names(storage=url))
    if study_name not in names:
        held = ", ".join(sorted(names)[:5]) or "none"
        raise UsageError(f"--resume: the Optuna database {masked(url)} holds no study {study_name!r} (it holds: "
                         f"{held}), so it is another study's; give this study's own database, or {fix}")


def space_change_problems(space, url: str, study_name: str) -> list[str]:
    """Why Optuna could not draw new trials from an edited space file: a searched parameter whose kind
    (choice or range) or choices differ from those its earlier trials were drawn from (Optuna refuses both)."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=url)
    seen: dict[str, object] = {}
    for t in study.get_trials(deepcopy=False):
        seen.update(t.distributions)
    problems = []
    for name, old in seen.items():
        base, _, case = name.partition("__")
        p = space.params.get(base)
        if p is None:
            continue
        dist = next((d for k, d in p.cases.items() if (k is None and not case) or str(k) == case), None)
        if dist is None or dist.kind == "constant":
            continue
        was_choice = isinstance(old, optuna.distributions.CategoricalDistribution)
        if was_choice != (dist.kind == "choice"):
            problems.append(f"{name} was a {'choice' if was_choice else 'range'} and is now a "
                            f"{'choice' if dist.kind == 'choice' else 'range'}")
        elif was_choice and list(old.choices) != list(dist.values):
            problems.append(f"{name} choices were {list(old.choices)} and are now {list(dist.values)}")
    return problems


def read_study_json(root: str, resume: bool = True) -> dict | None:
    """``study.json`` of the study at ``root`` (None when there is none); one that is not JSON, or lacks what a
    resume needs, is named with what to do."""
    from study.results import read_json

    where = f"{root.rstrip('/')}/study.json"
    try:
        meta = read_json(root, "study.json")
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{where} is not valid JSON ({e}); restore it from a copy of the study, or start a new "
                         f"study with --name (nothing was changed)") from None
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise UsageError(f"{where} is not a study record (a JSON object); restore it from a copy of the study, "
                         f"or start a new study with --name (nothing was changed)")
    missing = [k for k in STUDY_KEYS if k not in meta] if resume else []
    if missing:
        raise UsageError(f"{where} lacks {', '.join(missing)}, which this study needs; restore it from a copy of "
                         f"the study, or start a new study with --name (nothing was changed)")
    return meta


def missing_epochs(trials, epochs) -> dict[str, list[int]]:
    """Trial id -> the epochs its trials row says it ran but the epochs table lacks (a deleted file)."""
    import pandas as pd

    if trials is None or trials.empty:
        return {}
    have = {} if epochs is None else epochs.groupby("trial_id")["epoch"].apply(set).to_dict()
    out = {}
    for row in trials.itertuples():
        ran = 0 if pd.isna(row.epochs_run) else int(row.epochs_run)
        got = have.get(row.trial_id, set())
        last = max([ran, *got]) if got else ran
        gone = [e for e in range(1, last + 1) if e not in got]
        if gone:
            out[row.trial_id] = gone
    return out
