"""Send a study to a running Ray cluster as a Ray job: ``python -m study.submit -- --space full --storage s3://...``.

Everything after ``--`` is passed to ``python -m study.run`` on the cluster (with
``--address auto`` added), so the study runs exactly as it does locally, only on
the cluster's nodes. The project folder travels as the job's ``working_dir``
(virtualenvs, caches, studies and VCS data excluded); the cluster must already
have the project's dependencies installed (see cluster/README.md).

Examples::

    # a cluster reached through an SSH tunnel or `kubectl port-forward` on 127.0.0.1:8265
    export RAY_AUTH_TOKEN=...        # the cluster's token (never put it in a file in the repo)
    python -m study.submit --follow -- --space full --storage s3://my-bucket/studies
    python -m study.submit --logs raysubmit_XXXX     # follow a submitted job
    python -m study.submit --stop raysubmit_XXXX

Token authentication (Ray >= 2.52, ``RAY_AUTH_MODE=token`` on the cluster): the
token is read from ``$RAY_AUTH_TOKEN`` (or the file named by
``$RAY_AUTH_TOKEN_PATH``, which must lie outside the project folder) and sent
as ``Authorization: Bearer ...``; it is never sent to the job itself.
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
from pathlib import Path
from urllib.parse import urlsplit

from study import cli
from study.cli import ProjectError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded with the working_dir (gitignore syntax; the project's .gitignore applies too).
EXCLUDES = [".git", ".venv", "venv", ".cache", "studies", "ray_results", "runs", ".pytest_cache",
            "**/__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".carry", ".whl*", ".gl",
            # credentials must never travel in a job package
            ".env", ".env.*", "*.pem", "*.key", ".aws", ".ray", "auth_token", "*.token"]
# Node-local cache of decoded images on every node (a path that exists on any Linux node).
NODE_CACHE_DIR = "/tmp/colorize-cache"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(ProjectError, RuntimeError):
    """A submission that cannot work; the message says what to change."""


# ------------------------------------------------------------------ pieces (pure, tested)


def auth_token(environ: dict | None = None) -> str | None:
    """The cluster's token: $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH (outside the project)."""
    env = os.environ if environ is None else environ
    token = (env.get("RAY_AUTH_TOKEN") or "").strip()
    if token:
        return token
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path:
        p = Path(path).expanduser().resolve()
        if p == PROJECT_ROOT or PROJECT_ROOT in p.parents:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} lies inside the project folder, which is uploaded "
                              f"to the cluster and committed: keep the token outside it (e.g. ~/.ray/auth_token)")
        return p.read_text().strip() or None
    return None


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
    from study.run import check_options, masked, parser
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
    load_space(args.space)   # the space file travels with the project folder: check it here
    return args


def _password_in(url: str) -> bool:
    from study.run import without_password

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
            hint = ("export RAY_AUTH_TOKEN=<the cluster's token>" if not token else
                    "the token in $RAY_AUTH_TOKEN is not this cluster's")
            raise SubmitError(f"{address} refused the request ({hint}): {e}") from e
        except ConnectionError as e:
            raise SubmitError(f"--address {address}: no Ray Jobs API answers there ({e}). Is the cluster up, "
                              f"and the tunnel open (see the dashboard hint in cluster/README.md)? Nothing "
                              f"was submitted") from None


# ------------------------------------------------------------------ actions


def submit(run_args: list[str], *, address: str = DEFAULT_ADDRESS, token: str | None = None,
           working_dir: str | Path = PROJECT_ROOT, env_vars: dict[str, str] | None = None,
           excludes: list[str] | None = None, submission_id: str | None = None,
           entrypoint_resources: dict[str, float] | None = None, metadata: dict[str, str] | None = None) -> str:
    """Submit ``python -m study.run <run_args> --address auto`` to the cluster; returns the job id."""
    cmd = entrypoint(run_args)
    env = runtime_env(working_dir, env_vars, excludes)   # refused credentials fail before connecting
    c = client(address, token)
    return c.submit_job(entrypoint=cmd, runtime_env=env,
                        submission_id=submission_id, entrypoint_resources=entrypoint_resources,
                        metadata={"project": "unet-colorize-study", **(metadata or {})})


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
    p = argparse.ArgumentParser(prog="python -m study.submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None,
                   help=f"the cluster's dashboard/Jobs API URL (default $RAY_API_SERVER_ADDRESS or {DEFAULT_ADDRESS})")
    p.add_argument("--follow", action="store_true",
                   help="print the job's logs until it ends; exit 0 only if it succeeded")
    p.add_argument("--wait", action="store_true", help="wait for the job to end (no logs); exit 0 only if it succeeded")
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
    token = auth_token()
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
    job_id = submit(run_args, address=address, token=token, env_vars=env_vars, excludes=args.exclude,
                    submission_id=args.submission_id)
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
