"""The results writer's cost per reported result, and how fast a big study's tables read back.

    python scripts/bench_results.py events --trials 100 1000 10000 --epochs 5 [--sample 40] [--pace 0.05 --interval 0]
    python scripts/bench_results.py readback --trials 10000 --epochs 20 [--flush-every 5] [--previews 8]

``events``: the driver's loop without Ray: for each trial, every epoch is ``add_epochs`` of one
``epoch_row`` plus ``upsert("trials", ...)`` of its RUNNING ``trial_row``, and its end is an
``upsert`` of its DONE row; each of those (an epoch's pair, an end) is one timed result. ``--sample K``
prefills all but the last K trials straight into the one-file-per-epoch layout (no writer: an old
writer would take hours to get there) and times only the last K trials: the cost at that size. ``--pace``
spaces the results as a driver gets them (with ``--interval 0`` every result then meets a table write).

``readback``: builds the study (through the writer, writing the tables every ``--flush-every`` trials
as a long study would, or ``--prefill`` as above), then times ``read_table`` of each table and opening
a writer on it twice (what --resume does; the first opening converts an earlier version's layout).

Prints one JSON object. Uses only the writer's API that every version has (``add_epochs``,
``upsert``, ``read_table``), plus ``close()`` where the writer has one.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from study.results.contract import CURVE_METRICS, EPOCH_METRICS  # noqa: E402
from study.results.store import ResultsWriter, epoch_row, read_table, trial_row  # noqa: E402

CONFIG = {"dataset": "cifar10", "resolution": 32, "depth": 3, "sampling": "maxpool-upsample", "output": "uv",
          "base_filters": 32, "max_filters": 512, "gray_start": False, "dropout": 0.0, "lr": 0.001,
          "batch_size": 64, "loss": "mse", "epochs": 5, "schedule": "none", "warmup_epochs": 0,
          "weight_decay": 0.0, "ema": 0.0, "chroma_weight": 0.0, "temperature": 0.38, "rebalance": 0.5,
          "adversarial": 0.0, "augment": False, "augment_strength": 1.0, "seed": 0, "train_limit": 0,
          "eval_limit": 0, "preview_count": 8, "precision": "auto", "tta_flip": False}


def metrics(trial: int, epoch: int) -> dict:
    out = {m: 20.0 + (trial * 7 + epoch * 13) % 17 / 10 for m in EPOCH_METRICS}
    return {"epoch": epoch, **out, "seconds": 30.0, "precision": "fp32"}


def trial_id(n: int) -> str:
    return f"t{n:06d}"


def the_trial_row(n: int, status: str, history: list[dict]) -> dict:
    # What the Ray callback passes: the config, the run's facts and the pack's.
    return trial_row(trial_id(n), {**CONFIG, "seed": n}, status, history, optuna_number=n, wall_time_s=30.0 * len(history),
                     device="cpu", node_id="node-1", checkpoint_path="", gpu_ids="", started_at=1.7e9 + n,
                     finished_at=1.7e9 + n + 30.0 * len(history), restarts=0, resumed_at_epoch=0,
                     pack_id=n, pack_size=1)


def previews(n: int, epoch: int, count: int) -> list[dict]:
    """``count`` prediction PNGs (2 kB of noise each: a 32x32 PNG's size, and as incompressible)."""
    return [{"trial_id": trial_id(n), "dataset": "cifar10", "resolution": 32, "epoch": epoch, "image_index": i,
             "kind": "prediction", "png": os.urandom(2048)} for i in range(count)]


def run_trials(writer, first: int, last: int, epochs: int, times: list[float] | None, flush_every: int = 0,
               preview_count: int = 0, pace: float = 0.0) -> None:
    for n in range(first, last):
        if flush_every and n % flush_every == 0:
            writer.flush()   # a long study writes its tables many more times than a fast loop does
        tid, history = trial_id(n), []
        for e in range(1, epochs + 1):
            t0 = time.perf_counter()
            row = epoch_row(tid, metrics(n, e))
            history.append(row)
            writer.add_epochs(tid, [row])
            writer.upsert("trials", [the_trial_row(n, "RUNNING", history)])
            if times is not None:
                times.append(time.perf_counter() - t0)
            time.sleep(pace)   # results a while apart, as a driver gets them: each may meet a write
            if preview_count and (e % 5 == 0 or e == epochs):   # a checkpoint's previews (not timed)
                writer.add_previews(previews(n, e, preview_count))
        t0 = time.perf_counter()
        writer.upsert("trials", [the_trial_row(n, "DONE", history)])
        if times is not None:
            times.append(time.perf_counter() - t0)


def prefill(study: str, trials: int, epochs: int, preview_count: int = 0) -> None:
    """The first ``trials`` trials in the one-file-per-(trial, epoch) layout, written straight to disk."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from study.results.contract import coerce
    folder = Path(study, "results", "epochs.parquet")
    folder.mkdir(parents=True, exist_ok=True)
    fields = [("trial_id", pa.string()), ("epoch", pa.int64()), *((m, pa.float64()) for m in EPOCH_METRICS),
              ("seconds", pa.float64()), *((m, pa.float64()) for m in CURVE_METRICS), ("precision", pa.string())]
    schema = pa.schema(fields)
    rows = []
    for n in range(trials):
        history = [epoch_row(trial_id(n), metrics(n, e)) for e in range(1, epochs + 1)]
        for row in history:
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist([{f.name: row.get(f.name) for f in schema}], schema=schema), buf)
            (folder / f"t-{row['trial_id']}-e{row['epoch']:04d}.parquet").write_bytes(buf.getvalue())
        rows.append(the_trial_row(n, "DONE", history))
        for e in [e for e in range(1, epochs + 1) if preview_count and (e % 5 == 0 or e == epochs)]:
            Path(study, "results", "previews.parquet").mkdir(exist_ok=True)
            pd.DataFrame(previews(n, e, preview_count)).to_parquet(
                Path(study, "results", "previews.parquet", f"t-{trial_id(n)}-e{e:04d}.parquet"), index=False)
    df = coerce("trials", pd.DataFrame(rows))
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), Path(study, "results", "trials.parquet"))


def close(writer) -> None:
    for name in ("close", "flush"):
        if hasattr(writer, name):
            getattr(writer, name)()
            return


def percentiles(times: list[float]) -> dict:
    ms = sorted(t * 1000 for t in times)

    def at(q: float) -> float:
        return round(ms[min(len(ms) - 1, math.ceil(q * len(ms)) - 1)], 3)
    return {"results": len(ms), "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": round(ms[-1], 3),
            "mean_ms": round(sum(ms) / len(ms), 3)}


def events(args) -> dict:
    out = {}
    for n in args.trials:
        with tempfile.TemporaryDirectory(dir=args.dir) as study:
            first = 0
            if args.sample and args.sample < n:
                first = n - args.sample
                prefill(study, first, args.epochs)
            writer = ResultsWriter(study, **({} if args.interval is None else {"interval_s": args.interval}))
            times: list[float] = []
            t0 = time.perf_counter()
            run_trials(writer, first, n, args.epochs, times, pace=args.pace)
            t_close = time.perf_counter()
            close(writer)
            out[str(n)] = {**percentiles(times), "timed_trials": n - first, "loop_s": round(t_close - t0, 2),
                           "close_s": round(time.perf_counter() - t_close, 3)}
            print(json.dumps({str(n): out[str(n)]}), file=sys.stderr, flush=True)
    return out


def readback(args) -> dict:
    out = {}
    for n in args.trials:
        with tempfile.TemporaryDirectory(dir=args.dir) as study:
            t0 = time.perf_counter()
            if args.prefill:
                prefill(study, n, args.epochs, args.previews)
            else:
                writer = ResultsWriter(study)
                run_trials(writer, 0, n, args.epochs, None, args.flush_every, args.previews)
                close(writer)
            built = time.perf_counter() - t0
            files = sum(len(f) for _, _, f in os.walk(Path(study, "results")))
            reads = {}
            for name in ("trials", "epochs", "previews"):
                t0 = time.perf_counter()
                df = read_table(study, name)
                reads[name] = {"s": round(time.perf_counter() - t0, 3), "rows": 0 if df is None else len(df)}
            opened = []
            for _ in range(2):   # what --resume does; the second time after the first converted an old layout
                t0 = time.perf_counter()
                writer = ResultsWriter(study)
                opened.append(round(time.perf_counter() - t0, 3))
                hist = writer.history(trial_id(n - 1))
                assert len(hist) == args.epochs, len(hist)
                close(writer)
            out[f"{n}x{args.epochs}"] = {"build_s": round(built, 1), "files": files, "read_table": reads,
                                         "writer_open_s": opened[0], "writer_reopen_s": opened[1],
                                         "files_after": sum(len(f) for _, _, f in os.walk(Path(study, "results")))}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("events", "readback"))
    p.add_argument("--trials", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--sample", type=int, default=0, help="time only the last K trials (prefilling the rest)")
    p.add_argument("--interval", type=float, default=None, help="events: the writer's interval_s (where it has one)")
    p.add_argument("--pace", type=float, default=0.0, help="events: seconds between results (not timed)")
    p.add_argument("--prefill", action="store_true", help="readback: write the study straight to disk")
    p.add_argument("--flush-every", type=int, default=0, help="readback: write the tables every N trials")
    p.add_argument("--previews", type=int, default=0,
                   help="readback: PNGs per checkpoint (every 5th and the last epoch), 2 kB each")
    p.add_argument("--dir", default=None, help="where the temporary studies go (default: the system's)")
    args = p.parse_args()
    out = events(args) if args.mode == "events" else readback(args)
    print(json.dumps({"mode": args.mode, "epochs": args.epochs, "results": out}, indent=1))


if __name__ == "__main__":
    main()
