"""What ``study.run`` checks before anything is written or Ray starts: its options (each number against
the bound its consumer needs), the storage (parsed once into a local folder or a URL pyarrow opens, then
probed in a child process with a timeout), the Ray cluster's address (probed), the files Ray unpickles on
``--resume``, Optuna database URLs (shown and stored only through ``study.urls``), and that a resumed study's
Optuna database is its own. Each failure is a ``UsageError`` naming the fix."""
from __future__ import annotations

import argparse
import os
import re
import stat
from pathlib import Path
from urllib.parse import urlsplit

from study import cli, urls
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


# Upper bounds of the numeric options, by what consumes them: Ray keeps resource amounts as int64 fixed-point
# numbers (4 decimals) and every trial in the driver's memory; a pack is one model on one device.
MAX_NUM_SAMPLES = 1_000_000
MAX_CONCURRENT = 10_000
MAX_PACK = 1_024
MAX_CPUS = 1_000_000
MAX_GPUS = 10_000
MIN_RESOURCE = 1e-4   # Ray's smallest unit of a resource


def check_options(args: argparse.Namespace) -> None:
    """Every number against the bounds its consumer needs, before anything starts; 0 is an error, not
    "use the default" (None is the default)."""
    import math

    from study.config import ConfigError, TrialConfig

    rules = [("num_samples", 1, MAX_NUM_SAMPLES, "trials to run (a negative number would run forever)"),
             ("max_concurrent", 1, MAX_CONCURRENT, "trials at once"), ("pack", 1, MAX_PACK, "trials per pack"),
             ("num_cpus", 1, MAX_CPUS, "CPUs of the local Ray"), ("num_gpus", 0, MAX_GPUS, "GPUs of the local Ray")]
    for name, low, high, what in rules:
        v = getattr(args, name)
        if v is not None and not low <= v <= high:
            raise UsageError(f"--{name.replace('_', '-')} {v}: {what} must be in {low}..{high:,}"
                             + ("; leave it out for the space's own value" if v == 0 else ""))
    if args.seed is not None:
        try:   # the trial's own rule for seeds: what every seeded generator takes
            TrialConfig.check_value("seed", args.seed)
        except ConfigError as e:
            # Its message starts "seed=<value as the config coerced it>": the value given is shown instead.
            raise UsageError(f"--seed {args.seed}: the sampler's seed {str(e).partition(' ')[2]}") from None
    for name, positive, high in (("cpus_per_trial", True, MAX_CPUS), ("gpus_per_trial", False, MAX_GPUS)):
        v = getattr(args, name)
        if v is not None and (not math.isfinite(v) or v < 0 or v > high or (0 < v < MIN_RESOURCE)
                              or (positive and v == 0)):
            raise UsageError(f"--{name.replace('_', '-')} {v}: must be a number {'> 0' if positive else '>= 0'}"
                             f" and at most {high:,}, in steps of {MIN_RESOURCE:g} (Ray's unit)"
                             + (" (fractions share a GPU, e.g. 0.25)" if not positive else ""))
    if getattr(args, "time_budget", None) is not None:
        from study.durations import parse_duration
        parse_duration(args.time_budget)
    if args.address is not None and not args.address.strip():
        raise UsageError("--address '': give a Ray cluster's address (auto, ray://host:10001, host:6379), or "
                         "leave it out for a private local Ray")
    if args.address and (args.num_cpus is not None or args.num_gpus is not None):
        raise UsageError("--num-cpus/--num-gpus size a local Ray instance; with --address the cluster has its "
                         "own resources: leave them out")
    address_form(args.address)   # its form only: whether it answers is check_address's, where the study runs
    if args.name is not None:
        check_name(args.name if isinstance(args.name, str) else "", "--name")   # argparse turns --name=-- into []


def check_name(name: str, what: str = "--name") -> None:
    """A study name is one folder name that a shell command can carry as an argument."""
    if not name.strip() or "/" in name or "\\" in name or name in (".", ".."):
        raise UsageError(f"{what} {name!r}: a study name is one folder name (no '/', not '.' or '..')")
    if name.startswith("-"):
        raise UsageError(f"{what} {name!r}: a study name cannot start with '-' (commands would read it as an "
                         f"option); e.g. {name.lstrip('-') or 'study'!r}")
    if any(not ch.isprintable() for ch in name):
        raise UsageError(f"{what} {name!r}: a study name holds no control characters (tabs, newlines)")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise UsageError(f"{what}: {len(name.encode())} bytes long; a study name is a folder name of at most "
                         f"{MAX_NAME_BYTES} bytes (file systems allow 255, and Ray adds to it)")


def in_ray_job(environ=None) -> bool:
    env = os.environ if environ is None else environ
    return any(env.get(k) for k in RAY_JOB_ENV)


# URL schemes of pyarrow filesystems a study can live on, and what must follow ``scheme://``; whether this
# machine can use one (a client library, Java for hdfs, credentials, a reachable endpoint) the probe tells.
STORAGE_SCHEMES = {"s3": "bucket", "gs": "bucket", "gcs": "bucket", "hdfs": "host", "viewfs": "host",
                   "abfs": "container", "abfss": "container"}
_URL_START = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(//)?")
PROBE_TIMEOUT_S = 15.0   # a reachable store answers in a second; an unreachable one retries for ~6 s
CREDENTIALS_HINT = ("give credentials through the environment instead (s3: AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, or ~/.aws; gs: GOOGLE_APPLICATION_CREDENTIALS; abfs: AZURE_* variables)")


def check_storage_url(storage: str, option: str = "--storage") -> str:
    """The kind of a storage value: "local" (a folder) or the URL's scheme; anything else is refused.
    Parsing only: nothing is opened (``probe_storage`` does that)."""
    if not storage or not storage.strip():
        raise UsageError(f"{option} {storage!r}: empty; give a folder (e.g. studies) or a URL s3://<bucket>/<prefix>")
    if any(not ch.isprintable() for ch in storage):
        shown = urls.masked(storage) if "://" in storage else repr(storage)   # a folder's name is no secret
        raise UsageError(f"{option} {shown}: holds a control character (a tab or a newline); give a folder or a "
                         f"URL on one line")
    m = _URL_START.match(storage)
    if m is None or (not m[2] and len(m[1]) == 1):
        return "local"   # a folder (C:... is a Windows drive, not a scheme)
    scheme, shown = m[1].lower(), urls.masked(storage)
    kinds = ", ".join(f"{k}://<{v}>/<prefix>" for k, v in STORAGE_SCHEMES.items() if k not in ("gcs", "viewfs"))
    if scheme == "file":
        raise UsageError(f"{option} {shown}: give a local folder as a plain path")
    if not m[2]:
        raise UsageError(f"{option} {shown!r} looks like a URL without '//': write {scheme}://<bucket>/<prefix>, "
                         f"or ./{shown} for a local folder of that name")
    if scheme not in STORAGE_SCHEMES:
        raise UsageError(f"{option} {shown}: {scheme}:// is not a storage a study can live on; give a local "
                         f"folder or one of {kinds}")
    try:
        netloc = urlsplit(storage).netloc
    except ValueError:
        netloc = None
    if netloc is None or shown.endswith("not shown>"):
        raise UsageError(f"{option} {shown}: cannot be read as a URL; write {scheme}://<{STORAGE_SCHEMES[scheme]}>"
                         f"/<prefix>")
    if not netloc:
        what = STORAGE_SCHEMES[scheme]
        raise UsageError(f"{option} {shown}: no {what} after {scheme}://; write {scheme}://<{what}>/<prefix>")
    if urls.has_secrets(storage):
        raise UsageError(f"{option} {shown}: holds credentials, which would be printed and recorded with the "
                         f"study; {CREDENTIALS_HINT}")
    return scheme


# Run by ``probe_storage`` in a child process: a store that hangs (gs:// without credentials waits for a
# metadata server) is killed after the timeout, and Ctrl-C reaches the parent at once. Reads only: a write
# probe would leave a folder marker behind on an object store (pyarrow keeps a deleted file's parent).
_PROBE = r"""
import json, sys
url, bucket = json.loads(sys.stdin.read())
out = {}
try:
    import pyarrow.fs as pafs
    fs, path = pafs.FileSystem.from_uri(url)
    if fs.get_file_info(path).type == pafs.FileType.File:
        out["error"] = "it is a file, not a folder"
    elif bucket and fs.get_file_info(path.split("/", 1)[0]).type == pafs.FileType.NotFound:
        out["error"] = f"the {bucket} {path.split('/', 1)[0]!r} does not exist"
except BaseException as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def probe_storage(option: str, url: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Open ``url`` with pyarrow and look at it (and at its bucket) in a child process with a timeout; a
    failure is a UsageError naming the cause. Nothing is written."""
    import json
    import subprocess
    import sys

    scheme = urlsplit(url).scheme.lower()
    bucket = STORAGE_SCHEMES.get(scheme) if STORAGE_SCHEMES.get(scheme) in ("bucket", "container") else None
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE], input=json.dumps([url, bucket]), capture_output=True,
                           text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise UsageError(f"{option}: no answer within {timeout_s:g} s (the network, the endpoint or the "
                         f"credentials); {_hint(scheme)}") from None
    try:
        error = json.loads(p.stdout.strip().splitlines()[-1]).get("error")
    except (IndexError, ValueError, AttributeError):
        error = (p.stderr.strip().splitlines() or [f"the probe exited with status {p.returncode}"])[-1]
    if error:
        reason = urls.scrub((error.strip().splitlines() or ["?"])[0][:300], url)
        raise UsageError(f"{option}: cannot be opened ({reason}); {_hint(scheme)}")


def _hint(scheme: str) -> str:
    return {"s3": "check the bucket's name and region, and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws",
            "gs": "check the bucket and GOOGLE_APPLICATION_CREDENTIALS", "gcs": "check the bucket and "
            "GOOGLE_APPLICATION_CREDENTIALS", "hdfs": "hdfs:// needs Java (JAVA_HOME) and libhdfs "
            "(ARROW_LIBHDFS_DIR) on this machine", "viewfs": "viewfs:// needs Java (JAVA_HOME) and libhdfs",
            }.get(scheme, "check the container, the account and the AZURE_* credentials")


def check_storage(storage: str, root: str, write: bool = True, option: str = "--storage") -> None:
    """The storage of the study at ``root``: a local folder this process can create files in (``write``), or a
    URL whose filesystem pyarrow opens and whose bucket exists (probed; nothing is written). ``write=False``:
    a study only read (study.info)."""
    kind = check_storage_url(storage, option)
    if write:
        check_name(root.partition("?")[0].rstrip("/").rsplit("/", 1)[-1], "study name")
    if kind != "local":
        probe_storage(f"{option} {urls.masked(storage)}", root)
        return
    if not write:
        return
    if not Path(storage).is_absolute() and in_ray_job():
        raise UsageError(
            f"{option} {storage!r} is relative, and this runs as a Ray job whose working directory is a "
            f"temporary copy that disappears: use shared storage every node reaches (s3://bucket/prefix) "
            f"or an absolute path on a filesystem mounted on every node")
    cli.check_writable(f"{option} {storage}", Path(root), "studies")


# Forms of --address that ray.init takes: "auto" (the running cluster), "local" (a new one), ray://host[:port]
# (Ray Client, port 10001 by default) and host:port (the cluster's GCS).
ADDRESS_TIMEOUT_S = 5.0


def address_form(address: str | None) -> tuple[str, int] | None:
    """(host, port) of a ``--address`` ray.init takes, None for auto/local/none; any other form is refused."""
    if address is None or address in ("auto", "local"):
        return None   # "auto" finds the cluster Ray knows of (RAY_ADDRESS, `ray start`): Ray says if there is none
    shown = urls.masked(address)
    form = "auto, ray://<host>:10001 or <host>:6379"
    m = re.fullmatch(r"(?:(ray)://)?(\[[^\]]+\]|[^:/\[\]\s@]+)(?::(\d{1,5}))?/?", address.strip())
    if m is None:
        scheme = urls.scheme_of(address) if "://" in address else None
        hint = (" (an http:// address is the Jobs API that python -m study.submit takes)"
                if scheme in ("http", "https") else "")
        raise UsageError(f"--address {shown}: not a Ray cluster address{hint}; give {form}")
    port = int(m[3]) if m[3] else (10001 if m[1] else None)
    if port is None or not 0 < port < 65536:
        raise UsageError(f"--address {shown}: no port; give {form}")
    return m[2].strip("[]"), port


def check_address(address: str | None, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """A Ray cluster address something answers at (a TCP connection, in a worker thread with a timeout, so
    Ctrl-C works): an unreachable one is one line now, not Ray's traceback after half a minute."""
    where = address_form(address)
    if where is None:
        return
    problem = _reach(*where, timeout_s)
    if problem:
        raise UsageError(f"--address {urls.masked(address)}: nothing answers at {where[0]}:{where[1]} ({problem}); "
                         f"start the cluster (ray start --head), or give its address (auto, ray://<host>:10001 or "
                         f"<host>:6379), or leave --address out for a private local Ray (nothing was written)")


def _reach(host: str, port: int, timeout_s: float) -> str | None:
    """Why no TCP connection to host:port opens within ``timeout_s`` (name lookup included), or None."""
    import socket
    import threading

    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e.strerror or str(e) or type(e).__name__)
    worker = threading.Thread(target=connect, daemon=True)   # a hung name lookup does not keep the process
    worker.start()
    worker.join(timeout_s)
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s"


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


EXAMPLE_URLS = "postgresql+psycopg://user@host/db or sqlite:////abs/path/optuna.db"
CONNECT_TIMEOUT_S = 10   # libpq's and MySQL's connect_timeout: an unreachable host is an answer, not a hang


def _url(url: str):
    """SQLAlchemy's reading of an Optuna URL; a URL it cannot read, or reads otherwise than the masking rule
    (an unencoded '@' in the password), is refused without being shown."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    shown = urls.masked_url(url)
    problem = "it cannot be read as a URL" if shown.endswith("not shown>") else urls.ambiguity(url)
    if problem:
        raise UsageError(f"--optuna-storage {shown}: not a database URL ({problem}); e.g. {EXAMPLE_URLS}")
    try:
        return make_url(url)
    except (ArgumentError, ValueError):   # its message quotes the URL: not shown
        raise UsageError(f"--optuna-storage {shown}: not a database URL; e.g. {EXAMPLE_URLS}") from None


def masked(url: str) -> str:
    """For output: the URL with its secrets shown as *** (``study.urls``, the one rule)."""
    return urls.masked(url)


def without_password(url: str) -> str:
    """For files: the URL with no password or secret parameter at all (the secret comes from the environment)."""
    _url(url)
    return urls.without_secrets(url)


def check_optuna_url(url: str) -> None:
    """Reach a given Optuna database before Ray starts (SQLite: only its folder, so nothing is created)."""
    parsed = _url(url)
    shown = masked(url)
    if parsed.drivername.startswith("sqlite"):
        db = parsed.database or ""
        folder = Path(db).resolve().parent if db and db != ":memory:" else None
        if folder is None or not folder.is_dir():
            raise UsageError(f"--optuna-storage {shown}: the folder of the SQLite file does not exist; give "
                             f"sqlite:////absolute/path/optuna.db in an existing folder (or leave it out)")
        return
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    timeout = {"connect_timeout": CONNECT_TIMEOUT_S} if parsed.get_backend_name() in ("postgresql", "mysql") else {}
    try:
        engine = create_engine(url, connect_args=timeout)
    except ImportError as e:
        raise UsageError(f"--optuna-storage {shown}: its database driver is not installed ({e}); install it "
                         f"(PostgreSQL: pip install -e '.[postgres]' (psycopg 3; postgresql+psycopg://...))"
                         ) from None
    except Exception as e:  # noqa: BLE001 - a dialect refusing the URL's options: its message, scrubbed
        raise UsageError(f"--optuna-storage {shown}: not usable ({urls.scrub(_first_line(e), url)}); "
                         f"e.g. {EXAMPLE_URLS}") from None
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as e:
        reason = urls.scrub(_first_line(getattr(e, "orig", None) or e), url)
        raise UsageError(f"--optuna-storage {shown}: cannot connect ({reason}); check the host, the database "
                         f"and the credentials (a password: $PGPASSWORD or ~/.pgpass rather than the URL)") from None
    finally:
        engine.dispose()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


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
                             f"{masked(root)}: pass --optuna-storage")
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
        try:
            names = set(optuna.study.get_all_study_names(storage=url))
        except Exception as e:  # noqa: BLE001 - unreachable, refused: the driver's message, scrubbed
            raise UsageError(f"--resume: the study's Optuna database {masked(url)} cannot be read "
                             f"({urls.scrub(_first_line(e), url)}); check that it is reachable, or {fix}") from None
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
    """Trial id -> the epochs its trials row says it ran but the epochs table lacks (a deleted file).

    Column-wise first: a trial whose epochs 1..last are all there (last: the larger of what its row says it
    ran and its highest epoch) is complete, and only the others are looked at one by one (a study of
    10,000 trials is checked in its first second on --resume)."""
    import pandas as pd

    if trials is None or trials.empty:
        return {}
    ran = pd.Series(trials.epochs_run.fillna(0).astype(int).to_numpy(), index=trials.trial_id)
    counted = epochs[epochs.epoch >= 1] if epochs is not None else None
    if counted is not None and len(counted):
        by = counted.groupby("trial_id").epoch
        top, present = by.max().reindex(ran.index).fillna(0), by.nunique().reindex(ran.index).fillna(0)
    else:
        top = present = pd.Series(0, index=ran.index)
    last = ran.where(ran > top, top).astype(int)
    out = {}
    for trial_id in ran.index[(present < last).to_numpy()]:
        got = set(counted.epoch[counted.trial_id == trial_id]) if counted is not None else set()
        out[trial_id] = [e for e in range(1, int(last[trial_id]) + 1) if e not in got]
    return out
