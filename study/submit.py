"""Send a study to a running Ray cluster as a Ray job: ``python -m study.submit -- --space full --storage s3://...``.

Everything after ``--`` is passed to ``python -m study.run`` on the cluster (with
``--address auto`` added), so the study runs exactly as it does locally, only on
the cluster's nodes. The project folder travels as the job's ``working_dir``
(virtualenvs, caches, studies and VCS data excluded); the cluster must already
have the project's dependencies installed (see cluster/README.md).

Examples::

    # a cluster reached through an SSH tunnel or `kubectl port-forward` on 127.0.0.1:8265
    export RAY_AUTH_TOKEN=...        # the cluster's token, or keep it in ~/.ray/auth_token (mode 600)
    python -m study.submit --follow -- --space full --storage s3://my-bucket/studies
    python -m study.submit --logs raysubmit_XXXX     # follow a submitted job
    python -m study.submit --stop raysubmit_XXXX

Token authentication (Ray >= 2.52, ``RAY_AUTH_MODE=token`` on the cluster): the
token is found where Ray's own clients look, in this order: ``$RAY_AUTH_TOKEN``,
the file named by ``$RAY_AUTH_TOKEN_PATH`` (outside the project folder, which is
uploaded), then Ray's default file ``~/.ray/auth_token``. It is sent as
``Authorization: Bearer ...`` and never to the job itself. A local study
(``python -m study.run`` without ``--address``) makes Ray write its own private
cluster's token to ``~/.ray/auth_token`` if that file is missing, so a refused
token is reported with the place it came from.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from study import cli
from study.cli import ProjectError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded with the working_dir (gitignore syntax; the project's .gitignore applies too).
EXCLUDES = [".git", ".venv", "venv", ".cache", "studies", "ray_results", "runs", ".pytest_cache",
            "**/__pycache__", "*.pyc", "*.egg-info", "build", "dist",
            # credentials must never travel in a job package
            ".env", ".env.*", "*.pem", "*.key", ".aws", ".ray", "auth_token", "*.token"]
# Node-local cache of decoded images on every node (a path that exists on any Linux node).
NODE_CACHE_DIR = "/tmp/colorize-cache"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(ProjectError, RuntimeError):
    """A submission that cannot work; the message says what to change."""


# ------------------------------------------------------------------ pieces (pure, tested)


def find_token(environ: dict | None = None, home: Path | None = None) -> tuple[str | None, str | None]:
    """The cluster's token and where it came from, in Ray's own order (Ray >= 2.52's token loader):
    $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH (outside the project; unreadable or empty is an
    error, as it is for Ray), else Ray's default file ~/.ray/auth_token. (None, None) when there is none."""
    env = os.environ if environ is None else environ
    token = (env.get("RAY_AUTH_TOKEN") or "").strip()
    if token:
        return token, "$RAY_AUTH_TOKEN"
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path:
        p = Path(path).expanduser().resolve()
        if p == PROJECT_ROOT or PROJECT_ROOT in p.parents:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} lies inside the project folder, which is uploaded "
                              f"to the cluster and committed: keep the token outside it (e.g. ~/.ray/auth_token)")
        try:
            token = p.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file "
                              f"({getattr(e, 'strerror', None) or e}); point it at the file holding the "
                              f"cluster's token, or unset it") from None
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} is empty; put the cluster's token in it, or unset it")
        return token, f"$RAY_AUTH_TOKEN_PATH ({path})"
    default = default_token_file(env, home)
    try:
        token = default.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None, None   # no default file: no token (a cluster without token auth needs none)
    return (token, f"~/.ray/auth_token ({default})") if token else (None, None)


def default_token_file(environ: dict | None = None, home: Path | None = None) -> Path:
    """Ray's default token file, ~/.ray/auth_token (where `ray get-auth-token --generate` writes)."""
    env = os.environ if environ is None else environ
    return (home if home is not None else Path(env.get("HOME") or Path.home())) / ".ray" / "auth_token"


def auth_token(environ: dict | None = None, home: Path | None = None) -> str | None:
    """The cluster's token (see find_token), or None."""
    return find_token(environ, home)[0]


def _refused_hint(token: str | None) -> str:
    """What to do when the cluster refuses a request made with ``token``, naming where the token came from."""
    ways = ("export RAY_AUTH_TOKEN=<the cluster's token>, or RAY_AUTH_TOKEN_PATH=<a file holding it>, or "
            "put it in ~/.ray/auth_token (mode 600); the first of these that is set is used")
    if not token:
        return f"no token was sent: {ways}"
    try:
        found, source = find_token()
    except SubmitError:
        found, source = None, None
    if found != token:
        return "the token given is not this cluster's"
    note = (" (a local `python -m study.run` or `ray.init()` writes its own private cluster's token there when "
            "the file is missing)" if source.startswith("~") else "")
    return f"the token from {source} is not this cluster's{note}: {ways}"


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def is_loopback(address: str) -> bool:
    host = urlsplit(address if "://" in address else f"http://{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_args_checked(run_args: list[str]) -> argparse.Namespace:
    """Parse and check study.run's arguments and space here, so a mistake fails before anything is uploaded."""
    from study.driver import check_options, masked
    from study.info import local_space_file
    from study.run_args import parser
    from study.space import load_space

    if run_args and run_args[0] == "--":
        run_args = run_args[1:]
    p = parser()
    try:
        args = p.parse_args(run_args)
    except SystemExit as e:
        raise SubmitError(f"the arguments for study.run are not valid: {shlex.join(run_args)}") from e
    if "://" not in args.storage and not Path(args.storage).is_absolute():
        raise SubmitError(
            f"--storage {args.storage!r} is relative: on the cluster it would land in the job's temporary "
            f"working_dir copy. Use shared storage every node reaches (s3://bucket/prefix, gs://...) or an "
            f"absolute path on a filesystem mounted on every node (NFS)")
    check_options(args)
    if args.optuna_storage and _password_in(args.optuna_storage):
        raise SubmitError(f"--optuna-storage {masked(args.optuna_storage)}: a job's command line is shown on the "
                          f"dashboard and kept in its records: leave the password out of the URL and give it to "
                          f"the cluster's nodes (PGPASSWORD or ~/.pgpass, e.g. from a Kubernetes secret)")
    load_space(local_space_file(args.space))   # the space file travels with the project folder: check it here
    return args


def _password_in(url: str) -> bool:
    from study.driver import without_password

    try:
        return without_password(url) != url
    except ProjectError:
        return "@" in url.split("//", 1)[-1].split("/", 1)[0]


def entrypoint(run_args: list[str]) -> str:
    """The job's shell command: ``python -m study.run <run args> --address auto``."""
    if run_args and run_args[0] == "--":
        run_args = run_args[1:]
    args = run_args_checked(run_args)
    cmd = ["python", "-m", "study.run", *run_args]
    if args.address is None:
        cmd += ["--address", "auto"]
    return shlex.join(cmd)


def runtime_env(working_dir: str | Path = PROJECT_ROOT, env_vars: dict[str, str] | None = None,
                excludes: list[str] | None = None) -> dict:
    if not (Path(working_dir) / "study" / "run.py").is_file():
        raise SubmitError(f"{working_dir} is not this project's folder (run from a checkout: the folder "
                          f"is uploaded as the job's working_dir)")
    env = {"COLORIZE_CACHE_DIR": NODE_CACHE_DIR, "PYTHONUNBUFFERED": "1", **(env_vars or {})}
    for key in env:
        if any(word in key.upper() for word in ("TOKEN", "SECRET", "PASSWORD", "ACCESS_KEY", "CREDENTIAL")):
            raise SubmitError(f"--env {key}: credentials must not travel in a job's runtime_env (it is shown "
                              f"on the dashboard); give them to the cluster's nodes (instance role, "
                              f"Kubernetes secret, environment)")
    return {"working_dir": str(working_dir), "excludes": EXCLUDES + list(excludes or []), "env_vars": env}


def dashboard_hint(address: str) -> str:
    port = urlsplit(address if "://" in address else f"http://{address}").port or 8265
    return (f"dashboard: http://127.0.0.1:{port} (reach a remote head only through a tunnel: "
            f"`ssh -N -L {port}:127.0.0.1:8265 <user>@<head>`, `ray dashboard cluster/aws.yaml`, or "
            f"`kubectl port-forward svc/<raycluster>-head-svc {port}:8265`; with token auth the page asks "
            f"for the token once)")


@contextlib.contextmanager
def _explicit_address():
    """Ray's client lets $RAY_API_SERVER_ADDRESS/$RAY_ADDRESS override its address argument; ours wins."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def client(address: str, token: str | None = None):
    """A JobSubmissionClient for ``address`` (http://host:8265), with the token if there is one."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    with _explicit_address():
        try:
            return JobSubmissionClient(address, headers=auth_headers(token))
        except AuthenticationError as e:
            raise SubmitError(f"{address} refused the request ({_refused_hint(token)}): {e}") from e
        except ConnectionError as e:
            raise SubmitError(f"--address {address}: no Ray Jobs API answers there ({e}). Is the cluster up, "
                              f"and the tunnel open (see the dashboard hint in cluster/README.md)? Nothing "
                              f"was submitted") from None


# ------------------------------------------------------------------ actions


@dataclass(frozen=True)
class Job:
    """How a study travels as a Ray job: the folder uploaded (less ``excludes``), its environment, and
    Ray's own job options."""
    working_dir: str | Path = PROJECT_ROOT
    env_vars: dict[str, str] | None = None
    excludes: list[str] | None = None
    submission_id: str | None = None
    entrypoint_resources: dict[str, float] | None = None
    metadata: dict[str, str] | None = None


def submit(run_args: list[str], *, address: str = DEFAULT_ADDRESS, token: str | None = None, job: Job = Job()) -> str:
    """Submit ``python -m study.run <run_args> --address auto`` to the cluster; returns the job id."""
    cmd = entrypoint(run_args)
    env = runtime_env(job.working_dir, job.env_vars, job.excludes)   # refused credentials fail before connecting
    c = client(address, token)
    return c.submit_job(entrypoint=cmd, runtime_env=env,
                        submission_id=job.submission_id, entrypoint_resources=job.entrypoint_resources,
                        metadata={"project": "unet-colorize-study", **(job.metadata or {})})


def wait(job_id: str, *, address: str = DEFAULT_ADDRESS, token: str | None = None, timeout_s: float = 3600,
         poll_s: float = 2.0) -> str:
    """Poll until the job ends; returns its final status (SUCCEEDED, FAILED or STOPPED)."""
    c = client(address, token)
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(c.get_job_status(job_id))
        if status in TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def follow(job_id: str, *, address: str = DEFAULT_ADDRESS, token: str | None = None, out=None) -> str:
    """Print the job's logs as they come (websocket tail; polling if that fails); returns the final status."""
    out = out or sys.stdout
    c = client(address, token)

    async def tail():
        async for lines in c.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 - e.g. a proxy that does not pass websockets: poll instead
        print(f"(log stream interrupted: {e}; polling)", file=sys.stderr)
        shown = 0
        while True:
            logs = c.get_job_logs(job_id)
            out.write(logs[shown:])
            out.flush()
            shown = len(logs)
            if str(c.get_job_status(job_id)) in TERMINAL:
                break
            time.sleep(3)
    return wait(job_id, address=address, token=token, poll_s=1.0)


# ------------------------------------------------------------------ CLI


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m study.submit", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None,
                   help=f"the cluster's dashboard/Jobs API URL (default $RAY_API_SERVER_ADDRESS or {DEFAULT_ADDRESS})")
    p.add_argument("--follow", action="store_true",
                   help="print the job's logs until it ends; exit 0 only if it succeeded (default: off)")
    p.add_argument("--wait", action="store_true",
                   help="wait for the job to end (no logs); exit 0 only if it succeeded (default: off)")
    p.add_argument("--submission-id", help="job id to use (default: Ray picks one)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (not for credentials: give those to the nodes)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="another path pattern to leave out of the uploaded project folder")
    p.add_argument("--logs", metavar="JOB_ID", help="follow the logs of a submitted job instead of submitting")
    p.add_argument("--stop", metavar="JOB_ID", help="stop a submitted job instead of submitting")
    cli.add_debug(p)
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="-- then the arguments of python -m study.run")
    return p


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS
    token, source = find_token()
    if source and source.startswith("~"):   # Ray writes its default file readable by all
        default = default_token_file()
        with contextlib.suppress(OSError):
            if default.stat().st_mode & 0o077:
                print(f"warning: {default} can be read by other users (Ray writes it with mode 644): "
                      f"chmod 600 {default}", file=sys.stderr)
    if not is_loopback(address):
        print(f"warning: {address} is not a loopback address: the Jobs API is plain HTTP (the token travels "
              f"in clear) and must not be exposed; use an SSH tunnel or kubectl port-forward to 127.0.0.1",
              file=sys.stderr)
    if args.stop:
        print(f"stop {args.stop}: {client(address, token).stop_job(args.stop)}")
        return 0
    if args.logs:
        status = follow(args.logs, address=address, token=token)
        print(f"job {args.logs}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    run_args = args.run_args[1:] if args.run_args[:1] == ["--"] else args.run_args
    if not run_args:
        raise SubmitError("give the study's arguments after --, e.g. -- --space full --storage "
                          "s3://bucket/studies")
    run_args_checked(run_args)   # before connecting: a bad space or option needs no cluster
    env_vars = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        env_vars[key] = value if sep else os.environ.get(key, "")
    job_id = submit(run_args, address=address, token=token,
                    job=Job(env_vars=env_vars, excludes=args.exclude, submission_id=args.submission_id))
    print(f"submitted job {job_id}: {entrypoint(run_args)}")
    print(dashboard_hint(address))
    print(f"logs: python -m study.submit --address {address} --logs {job_id}    "
          f"stop: python -m study.submit --address {address} --stop {job_id}")
    if args.follow or args.wait:
        status = (follow(job_id, address=address, token=token) if args.follow else
                  wait(job_id, address=address, token=token))
        print(f"job {job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
