"""Bad invocations of the project's commands, as a hostile new user would type them.

    python scripts/hostile.py [--jobs 3] [--timeout 60] [--only SUBSTRING]

Each case runs ``python -m <module> <args>`` through the real command line, in a folder of its own (which
holds a tiny space file, a file, a study record or a cut table, as the case needs), with a timeout. Per case
the table says: the exit status, whether a traceback was printed, whether it hung (the timeout ran out),
whether anything was written (the folder's listing changed, caches aside), and whether a secret appeared
(the token SECRET in stdout, stderr or any written file). A case is ``ok`` when no traceback was printed
(except with --debug), it did not hang, no secret appeared, its exit status is the one expected, and a
refusal (status 2) wrote nothing. Exit status 0 when every case is ok, else 1.

No real study is started: the cases are refusals, ``--plan`` or quick failures. Takes about two minutes on
two cores (a few cases wait on a storage probe's 15-second timeout).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
SECRET = "Hx7SeCrEt"
SPACE = ("sampler: {name: random}\nnum_samples: 2\nmax_concurrent: 1\nresources: {cpu: 1, gpu: 0}\n"
         "params: {dataset: samples, depth: 2, base_filters: 4, epochs: 1, train_limit: 64, eval_limit: 32}\n")
CACHES = {"cache", ".cache"}


def space(folder: Path) -> None:
    (folder / "space.yaml").write_text(SPACE)


def text(name: str, content: str) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        space(folder)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content)
    return setup


def a_png(folder: Path) -> None:
    import zlib
    space(folder)
    raw = b"".join(b"\x00" + bytes([128] * 8) for _ in range(8))   # 8x8 gray, filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    (folder / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", (8).to_bytes(4, "big") * 2 + b"\x08\x00\x00\x00\x00")
                                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def study_record(started: bool = False, results: bool = False, cut: bool = False) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        space(folder)
        root = folder / "st" / "space"
        root.mkdir(parents=True)
        (root / "study.json").write_text(json.dumps({"name": "space", "space": "space", "grayscale": "left out",
                                                     "optuna_storage": "sqlite:///optuna.db",
                                                     "optuna_study_name": "space", "num_samples": 2}))
        if started:
            (root / "tuner.pkl").write_bytes(b"never read")
        if results or cut:
            (root / "results").mkdir()
        if cut:
            (root / "results" / "trials.parquet").write_bytes(b"PAR1\x15\x04\x15" + b"\x00" * 40)
    return setup


def study_record_with_url(url: str) -> Callable[[Path], None]:
    """A stopped study whose record names an Optuna URL (a secret in it must never be shown)."""
    def setup(folder: Path) -> None:
        study_record()(folder)
        path = folder / "st" / "space" / "study.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "optuna_storage": url}))
    return setup


@dataclass
class Case:
    id: str
    module: str
    args: list[str]
    setup: Callable[[Path], None] = space
    expect: tuple[int, ...] = (2,)
    env: dict = field(default_factory=dict)


RUN = ["--space", "space.yaml", "--storage", "st", "--cache-dir", "cache"]
PLAN = [*RUN, "--plan"]
S = SECRET

CASES = [
    # storage: one kind, probed with a timeout
    Case("run storage ''", "study.run", ["--space", "space.yaml", "--storage", "", "--plan"]),
    Case("run storage blanks", "study.run", ["--space", "space.yaml", "--storage", "   "]),
    Case("run storage tab", "study.run", ["--space", "space.yaml", "--storage", "st\tx"]),
    Case("run storage gs no creds", "study.run", ["--space", "space.yaml", "--storage", "gs://hostile-none/x"]),
    Case("run storage hdfs no java", "study.run", ["--space", "space.yaml", "--storage", "hdfs://nohost:1/x"]),
    Case("run storage abfs no creds", "study.run", ["--space", "space.yaml", "--storage",
                                                    "abfs://c@hostilenone.dfs.core.windows.net/x"]),
    Case("run storage s3 creds in url", "study.run", ["--space", "space.yaml", "--storage", f"s3://AK:{S}@b/x"]),
    Case("run storage s3 secret query", "study.run", ["--space", "space.yaml", "--storage",
                                                      f"s3://b/x?aws_secret_access_key={S}"]),
    Case("run storage webdav", "study.run", ["--space", "space.yaml", "--storage", "webdav://h/x"]),
    Case("run storage s3 closed port", "study.run",
         ["--space", "space.yaml", "--storage", "s3://b/x?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"],
         env={"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": S, "AWS_EC2_METADATA_DISABLED": "true"}),
    # Optuna URLs: secrets in every shape
    Case("run optuna password in query", "study.run",
         [*RUN, "--optuna-storage", f"postgresql://u@127.0.0.1:9/db?password={S}"]),
    Case("run optuna @ in password", "study.run", [*RUN, "--optuna-storage", f"postgresql://user:p@ss:{S}@127.0.0.1/db"]),
    Case("run optuna / in password", "study.run", [*RUN, "--optuna-storage", f"postgresql://u:12/{S}@127.0.0.1/db"]),
    Case("run optuna bad ipv6", "study.run", [*RUN, "--optuna-storage", f"postgresql://u:{S}@[::1:9/db"]),
    Case("run optuna bad port", "study.run", [*RUN, "--optuna-storage", f"postgresql://u:{S}@h:5x/db"]),
    Case("run optuna pasted secret", "study.run", [*RUN, "--optuna-storage", S]),
    Case("run optuna --opt=url", "study.run", [*RUN, f"--optuna-storage=postgresql://u:{S}@127.0.0.1:9/db"]),
    Case("run optuna mysql driver", "study.run", [*RUN, "--optuna-storage", f"mysql+nodriver://u:{S}@127.0.0.1:9/db"]),
    Case("run optuna sqlite no dir", "study.run", [*RUN, "--optuna-storage", "sqlite:////nonexistent/dir/x.db"]),
    Case("run optuna token param", "study.run",
         [*RUN, "--optuna-storage", f"postgresql+psycopg://u@127.0.0.1:9/db?sslmode=disable&Auth_Token={S}"]),
    # numbers against their consumers' bounds
    Case("run seed 2**64", "study.run", [*PLAN, "--seed", str(2 ** 64)]),
    Case("run seed 1e3", "study.run", [*PLAN, "--seed", "1e3"]),
    Case("run num-samples 1e12", "study.run", [*PLAN, "--num-samples", str(10 ** 12)]),
    Case("run resume num-samples 1e12", "study.run", [*RUN, "--resume", "--num-samples", str(10 ** 12)],
         study_record(started=True)),
    Case("run max-concurrent -5", "study.run", [*PLAN, "--max-concurrent=-5"]),
    Case("run pack 1e6", "study.run", [*PLAN, "--pack", str(10 ** 6)]),
    Case("run num-cpus 0", "study.run", [*PLAN, "--num-cpus", "0"]),
    Case("run cpus-per-trial 1e-300", "study.run", [*PLAN, "--cpus-per-trial", "1e-300"]),
    Case("run gpus-per-trial inf", "study.run", [*PLAN, "--gpus-per-trial", "inf"]),
    Case("run time-budget 0", "study.run", [*PLAN, "--time-budget", "0"]),
    Case("run time-budget 0s", "study.run", [*RUN, "--time-budget", "0s"]),
    Case("run time-budget nan", "study.run", [*RUN, "--time-budget", "nan"]),
    Case("run time-budget 1e9", "study.run", [*RUN, "--time-budget", "1e9"]),
    Case("run time-budget -1h", "study.run", [*RUN, "--time-budget=-1h"]),
    Case("space time_budget 0", "study.run", RUN, text("space.yaml", SPACE + "time_budget: 0\n")),
    # names and addresses
    Case("run name=-x", "study.run", [*RUN, "--name=-x"]),
    Case("run name --", "study.run", [*RUN, "--name=--"]),
    Case("run name newline", "study.run", [*RUN, "--name", "a\nb"]),
    Case("run address ''", "study.run", [*RUN, "--address", ""]),
    Case("run address http", "study.run", [*RUN, "--address", "http://127.0.0.1:8265"]),
    Case("run address ray closed", "study.run", [*RUN, "--address", "ray://127.0.0.1:1"]),
    # space files
    Case("space duplicate key", "study.run", RUN, text("space.yaml", SPACE + "num_samples: 3\n")),
    Case("space duplicate param", "study.run", RUN,
         text("space.yaml", SPACE.replace("epochs: 1,", "epochs: 1, epochs: 2,"))),
    Case("space /dev/null", "study.run", ["--space", "/dev/null", "--storage", "st"]),
    Case("space a folder", "study.run", ["--space", ".", "--storage", "st"]),
    Case("debug keeps status", "study.run", [*PLAN, "--max-concurrent", "0", "--debug"]),
    # study.info
    Case("info a file", "study.info", ["space.yaml"]),
    Case("info ''", "study.info", [""]),
    Case("info not a study", "study.info", ["."]),
    Case("info s3 creds", "study.info", [f"s3://k:{S}@b/x"]),
    Case("info hdfs", "study.info", ["hdfs://nohost:1/x"]),
    Case("info cut table", "study.info", ["st/space"], study_record(cut=True)),
    # colorize
    Case("colorize temperature 1e-40", "study.colorize",
         ["--study", "st", "--out", "out", "--temperature", "1e-40", "img.png"], a_png),
    Case("colorize temperature 1e-400", "study.colorize",
         ["--study", "st", "--out", "out", "--temperature", "1e-400", "img.png"], a_png),
    Case("colorize temperature nan", "study.colorize",
         ["--study", "st", "--out", "out", "--temperature", "nan", "img.png"], a_png),
    Case("colorize out /proc", "study.colorize", ["--study", "st", "--out", "/proc/colorized", "img.png"], a_png),
    Case("colorize study a file", "study.colorize", ["--study", "img.png", "--out", "out", "img.png"], a_png),
    Case("colorize study s3 creds", "study.colorize", ["--study", f"s3://k:{S}@b/st", "--out", "out", "img.png"], a_png),
    Case("colorize no study", "study.colorize", ["--study", "nowhere", "--out", "out", "img.png"], a_png),
    # analysis
    Case("analysis out in results", "analysis", ["--study", "st/space", "--out", "st/space/results/r"],
         study_record(results=True)),
    Case("analysis study a file", "analysis", ["--study", "space.yaml", "--out", "r"]),
    Case("analysis out /proc", "analysis", ["--study", "st/space", "--out", "/proc/r"], study_record(results=True)),
    Case("analysis cut table", "analysis", ["--study", "st/space", "--out", "r"], study_record(cut=True), expect=(0,)),
    # study.trial
    Case("trial seed 2**64", "study.trial", ["--seed", str(2 ** 64)]),
    Case("trial out /proc", "study.trial", ["--out", "/proc/t", "--device", "cpu"]),
    Case("trial epochs 0", "study.trial", ["--epochs", "0"]),
    Case("trial device cuda:99", "study.trial", ["--device", "cuda:99", "--epochs", "1"]),
    # a tiny real trial at a temperature far below any useful one: it must decode (the mode), not paint gray
    # a second pass: inputs of the same rules nobody listed
    Case("run storage s3 empty bucket", "study.run", ["--space", "space.yaml", "--storage", "s3://"]),
    Case("run storage s3 no bucket", "study.run", ["--space", "space.yaml", "--storage", "s3:///x"]),
    Case("run storage unknown scheme", "study.run", ["--space", "space.yaml", "--storage", "foo://bar/x"]),
    Case("run storage file url nowhere", "study.run", ["--space", "space.yaml", "--storage", "file:///proc/x"]),
    Case("run storage /proc", "study.run", ["--space", "space.yaml", "--storage", "/proc/st"]),
    Case("run storage a file", "study.run", ["--space", "space.yaml", "--storage", "space.yaml"]),
    Case("run storage gcs alias", "study.run", ["--space", "space.yaml", "--storage", "gcs://hostile-none/x"]),
    Case("run optuna redis", "study.run", [*RUN, "--optuna-storage", f"redis://:{S}@127.0.0.1:9/0"]),
    Case("run optuna sslpassword", "study.run",
         [*RUN, "--optuna-storage", f"postgresql://u@127.0.0.1:9/db?sslpassword={S}"]),
    Case("run optuna PASSWORD upper", "study.run",
         [*RUN, "--optuna-storage", f"postgresql://u@127.0.0.1:9/db?PASSWORD={S}"]),
    Case("run optuna api_key", "study.run",
         [*RUN, "--optuna-storage", f"postgresql://u@127.0.0.1:9/db?api_key={S}&x=1"]),
    Case("run optuna encoded @", "study.run", [*RUN, "--optuna-storage", f"postgresql://u:{S}%40x@127.0.0.1:9/db"]),
    Case("run num-samples 0", "study.run", [*PLAN, "--num-samples", "0"]),
    Case("run num-samples -1", "study.run", [*PLAN, "--num-samples=-1"]),
    Case("run seed -1", "study.run", [*PLAN, "--seed=-1"]),
    Case("run pack 0", "study.run", [*PLAN, "--pack", "0"]),
    Case("run max-concurrent 0", "study.run", [*PLAN, "--max-concurrent", "0"]),
    Case("run time-budget inf", "study.run", [*RUN, "--time-budget", "inf"]),
    Case("run time-budget 1.5.3h", "study.run", [*RUN, "--time-budget", "1.5.3h"]),
    Case("run name ..", "study.run", [*RUN, "--name", ".."]),
    Case("run name a/b", "study.run", [*RUN, "--name", "a/b"]),
    Case("run name ''", "study.run", [*RUN, "--name", ""]),
    Case("space a list", "study.run", RUN, text("space.yaml", "- 1\n- 2\n")),
    Case("space unknown sampler", "study.run", RUN, text("space.yaml", SPACE.replace("random", "annealing"))),
    Case("space binary", "study.run", RUN, text("space.yaml", "\x00\x01\x02 not yaml: [")),
    Case("resume no study", "study.run", [*RUN, "--resume", "--plan"]),
    Case("analysis replay seeds 0", "analysis", ["--study", "st/space", "--out", "r", "--replay", "--replay-seeds", "0"],
         study_record(results=True)),
    Case("info optuna secret query", "study.info", ["st/space", "--json"], study_record_with_url(
        f"postgresql://u@127.0.0.1:9/db?password={S}"), expect=(0,)),
    Case("trial temperature 1e-40", "study.trial",
         ["--temperature", "1e-40", "--output", "uv-classes", "--dataset", "samples", "--epochs", "1",
          "--train-limit", "32", "--eval-limit", "16", "--base-filters", "4", "--device", "cpu", "--out", "out"],
         expect=(0,)),
]


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if not CACHES & set(p.relative_to(folder).parts)}


def run_case(case: Case, root: Path, timeout: float) -> dict:
    folder = root / case.id.replace(" ", "_").replace("/", "_")
    folder.mkdir()
    case.setup(folder)
    before = listing(folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "COLORIZE_DEBUG"))}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **case.env)
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", case.module, *case.args], cwd=folder, env=env, capture_output=True,
                           text=True, timeout=timeout)
        status, out, err, hung = p.returncode, p.stdout, p.stderr, False
    except subprocess.TimeoutExpired as e:
        status, hung = None, True
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
    seconds = time.monotonic() - t0
    after = listing(folder)
    written = sorted(set(after) - set(before)) + sorted(k for k in before if k in after and after[k] != before[k])
    in_files = any(S.encode() in (folder / w).read_bytes() for w in written if (folder / w).is_file())
    secret = S in out + err or in_files
    traceback = "Traceback (most recent call last)" in err
    ok = (not hung and not secret and status in case.expect and (not traceback or "--debug" in case.args)
          and not (status == 2 and written) and " nan dB" not in out + err)   # a NaN figure is never an answer
    line = next((ln for ln in reversed(err.splitlines()) if ln.startswith(("error:", "interrupted", "terminated"))),
                (err.strip().splitlines() or out.strip().splitlines() or [""])[-1])
    return {"case": case.id, "status": status, "traceback": traceback, "hung": hung, "written": written,
            "secret": secret, "seconds": seconds, "ok": ok, "line": line}


def table(rows: list[dict]) -> str:
    def yes(v) -> str:
        return "YES" if v else "-"
    out = [f"{'case':<32} {'exit':>4} {'trace':>5} {'hung':>4} {'wrote':>5} {'secret':>6} {'s':>5}  verdict / message"]
    for r in rows:
        status = "-" if r["status"] is None else str(r["status"])
        out.append(f"{r['case']:<32} {status:>4} {yes(r['traceback']):>5} {yes(r['hung']):>4} "
                   f"{yes(r['written']):>5} {yes(r['secret']):>6} {r['seconds']:5.1f}  "
                   f"{'ok ' if r['ok'] else 'BAD'} {r['line'][:110]}")
    bad = [r for r in rows if not r["ok"]]
    out.append(f"\n{len(rows)} cases: {len(rows) - len(bad)} ok, {len(bad)} bad; "
               f"{sum(r['traceback'] for r in rows)} traceback(s), {sum(r['hung'] for r in rows)} hung, "
               f"{sum(bool(r['written']) for r in rows)} wrote something, {sum(r['secret'] for r in rows)} "
               f"showed a secret; exit statuses: "
               + ", ".join(f"{s}: {n}" for s, n in sorted(_count(r["status"] for r in rows).items(), key=str)))
    return "\n".join(out)


def _count(values) -> dict:
    counts: dict = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=3, help="cases at once (default: 3)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as hung (default: 60)")
    p.add_argument("--only", help="run only the cases whose id contains this")
    args = p.parse_args()
    cases = [c for c in CASES if not args.only or args.only in c.id]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            rows = list(pool.map(lambda c: run_case(c, Path(tmp), args.timeout), cases))
    print(table(rows))
    print(f"({time.monotonic() - t0:.0f} s)")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
