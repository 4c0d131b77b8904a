"""The synthetic study on ``s3://`` storage: the object-store requests per reported epoch, by kind, and
the time to read the study back.

    python scripts/scale_s3.py --trials 40 --epochs 10 --concurrency 4 [--json F]

Starts moto's S3 server on loopback (the one the tests use), runs a synthetic study (generated curves,
no training, no pruning: every trial reports every epoch) into ``s3://bench/studies/<name>`` through
``python -m study.run``, and counts every request the server answers, from the driver and from Ray's
trial workers, by method and by what it touched:

- ``results``: the study's results tables and their journal (``results/``), the driver's;
- ``study files``: study.json, status.json, the driver's lock and the space's copy, the driver's;
- ``checkpoints``: the trials' checkpoints (``checkpoint_*``), which Ray uploads;
- ``ray state``: Ray Tune's experiment, search and searcher state files;
- ``ray trial logs``: what Ray's default loggers write per trial (result.json, progress.csv, params,
  TensorBoard events), as bare Ray Tune does;
- ``folders and listings``: the rest (listings, folder markers, the bucket), mostly Ray's storage layer.

Then it times, each in a process of its own: reading every table with pandas (``study.results.read_table``)
and ``python -m study.info``. Prints one JSON object. Needs ``moto[server]`` and ``boto3`` (the test
extras).
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scale_study import READ, timed  # noqa: E402 - the reader and timing of the local scale study
from study.bench_space import space_text  # noqa: E402 - after the path, as a script

BUCKET = "bench"
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP')

class Requests(logging.Handler):
    """Counts the requests moto's server logs (werkzeug's access log), by (kind, method)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        found = REQUEST.search(record.getMessage())
        if found:
            self.counts[(kind(found.group(2)), found.group(1))] += 1


def kind(path: str) -> str:
    path = path.split("?", 1)[0]
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if "/results/" in path or path.endswith("/results"):
        return "results"
    if "/checkpoint_" in path:
        return "checkpoints"
    if re.match(r"(experiment_state|search_gen_state|searcher-state|tuner\.pkl|basic-variant-state)", name):
        return "ray state"
    if re.match(r"(result\.json|progress\.csv|params\.json|params\.pkl|events\.out\.tfevents)", name):
        return "ray trial logs"
    if re.match(r"(study\.json|status\.json|driver\.lock|spaces)", name) or "/spaces/" in path:
        return "study files"
    return "folders and listings"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--epoch-seconds", type=float, default=0.05)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    os.environ.update(ENV)
    counter = Requests()
    logging.getLogger("werkzeug").addHandler(counter)
    logging.getLogger("werkzeug").setLevel(logging.INFO)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=True)
    server.start()
    try:
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket=BUCKET)
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        name = f"s3-{args.trials}x{args.epochs}-{time.strftime('%Y%m%d-%H%M%S')}"
        with tempfile.TemporaryDirectory() as tmp:
            space = Path(tmp) / f"{name}.yaml"
            space.write_text(space_text(args.trials, args.epochs, args.concurrency, args.epoch_seconds, False))
            counter.counts.clear()
            wall, _ = timed([sys.executable, "-m", "study.run", "--space", str(space), "--name", name,
                             "--storage", f"s3://{BUCKET}/studies?{query}", "--num-cpus", str(args.concurrency),
                             "--cache-dir", str(Path(tmp) / "cache")])
            during = dict(counter.counts)
            root = f"s3://{BUCKET}/studies/{name}?{query}"
            counter.counts.clear()
            read_s, rows = timed([sys.executable, "-c", READ, root])
            read_requests = sum(counter.counts.values())
            info_s, _ = timed([sys.executable, "-m", "study.info", root])
    finally:
        server.stop()
    results = args.trials * args.epochs
    by_kind: dict[str, int] = collections.Counter()
    for (k, _), n in during.items():
        by_kind[k] += n
    out = {"trials": args.trials, "epochs": args.epochs, "results": results, "concurrency": args.concurrency,
           "study_wall_s": round(wall, 1), "requests": sum(during.values()),
           "requests_per_result": round(sum(during.values()) / results, 2),
           "per_result_by_kind": {k: round(n / results, 2) for k, n in sorted(by_kind.items())},
           "by_kind_and_method": {f"{k} {m}": n for (k, m), n in sorted(during.items())},
           "read_tables_s": float(rows.split()[0]), "read_tables_process_s": read_s,
           "read_tables_requests": read_requests, "rows": rows.split(" ", 1)[1].strip(), "info_s": info_s}
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
