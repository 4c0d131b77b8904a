"""Record real learning curves: configurations of a stated space trained to their last epoch, no pruning.

    python scripts/record_curves.py --data-root DATA --configs 200 --seed 0 --out docs/search/cifar10-curves.parquet
    python scripts/record_curves.py --smoke --dataset samples --out /tmp/curves.parquet

Each configuration is drawn from ``SPACE`` with its own generator seeded by (``--seed``, its draw index),
so configuration i is the same whatever ``--configs`` is, and trained with ``run_trial`` on one CPU thread.
The table has one row per (configuration, epoch): ``config_id`` (a short hash of the whole TrialConfig),
``draw`` (its draw index), every TrialConfig field, the results contract's epoch metrics and ``seconds``,
and the gains over the grayscale input (``val_gain``, ``test_gain``: the contract's ``epoch_gain``). A
configuration whose training loss stops being finite gets its finished epochs plus one row for the failed
epoch, metrics missing and ``error`` set. The table is rewritten (atomically) after every configuration;
a rerun skips the config_ids already recorded, so a stopped run loses at most the configuration in
progress. Its Parquet metadata (key ``curves``) records the space, seed, commands and machine.

Later replays (a study whose trials replay recorded epochs) use it to compare search strategies on the
same curves.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from study import cli
from study.config import TrialConfig

META_KEY = b"curves"
# The space the configurations are drawn from. Choices are drawn uniformly; ("loguniform", lo, hi) is
# log-uniform, rounded to 3 significant digits so a value reads back exactly from the table.
SPACE = {
    "depth": [2, 3, 4],
    "sampling": ["maxpool-upsample", "strided-transposed"],   # the report's simple and complex UNets
    "output": ["rgb", "uv"],
    "lr": ("loguniform", 1e-4, 1e-2),
    "batch_size": [32, 64, 128],
    "base_filters": [8, 16],
    "loss": ["mse", "l1"],
    "schedule": ["none", "cosine"],
}
# What every configuration shares: the data and its size, the epochs, and nothing spent on previews.
FIXED = {"resolution": 32, "epochs": 6, "train_limit": 1024, "eval_limit": 512, "preview_count": 0,
         "precision": "fp32", "seed": 0}
SMOKE = {"epochs": 2, "train_limit": 64, "eval_limit": 32}


@dataclass(frozen=True)
class Plan:
    """What one recording run trains: the configurations and where their rows go."""
    dataset: str
    fixed: dict
    seed: int
    configs: int
    out: Path
    data_root: str | None
    cache_dir: str | None


def draw(seed: int, index: int, dataset: str, fixed: dict) -> TrialConfig:
    """Configuration ``index`` of the space under ``seed``: the same whatever else is drawn."""
    import numpy as np

    rng = np.random.default_rng([seed, index])
    values = {}
    for name, choice in SPACE.items():
        if isinstance(choice, tuple):
            _, lo, hi = choice
            v = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            values[name] = float(f"{v:.3g}")
        else:
            values[name] = choice[int(rng.integers(len(choice)))]
    return TrialConfig(dataset=dataset, **fixed, **values).validate()


def config_id(cfg: TrialConfig) -> str:
    """A short, stable hash of every value of the configuration."""
    text = json.dumps(asdict(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def train(cfg: TrialConfig, options) -> tuple[list[dict], str | None]:
    """Every epoch row of ``cfg`` trained to its last epoch, and the error that stopped it (or None)."""
    from study.engine import NonFiniteLossError, run_trial

    rows: list[dict] = []
    try:
        run_trial(cfg, lambda row, folder: rows.append(dict(row)), options)
    except NonFiniteLossError as e:
        rows.append({"epoch": len(rows) + 1})
        return rows, str(e)
    return rows, None


def table_rows(cfg: TrialConfig, index: int, rows: list[dict], error: str | None) -> list[dict]:
    """The table's rows of one configuration: its values, then each epoch's contract figures and gains."""
    from study.results.contract import EPOCH_METRICS, epoch_gain

    out = []
    for row in rows:
        figures = {m: float(row.get(m, math.nan)) for m in (*EPOCH_METRICS, "seconds")}
        gains = {f"{split}_gain": float(epoch_gain(figures, split)) for split in ("val", "test")}
        out.append({"config_id": config_id(cfg), "draw": index, **asdict(cfg), "epoch": int(row["epoch"]),
                    **figures, **gains, "error": error if "val_psnr" not in row else None})
    return out


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def read_existing(plan: Plan) -> tuple[list[dict], dict | None]:
    """The rows and metadata already at ``plan.out`` (none when it does not exist)."""
    if not plan.out.exists():
        return [], None
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(plan.out)
        meta = json.loads((table.schema.metadata or {})[META_KEY])
    except (OSError, pa.ArrowException, KeyError, ValueError) as e:  # not this script's table: never overwrite it
        raise cli.UsageError(f"--out {plan.out}: not a curves table this script wrote ({type(e).__name__}: {e}); "
                             f"choose another --out") from None
    wanted = {"space": _jsonable(SPACE), "fixed": plan.fixed, "dataset": plan.dataset, "seed": plan.seed}
    for key, value in wanted.items():
        if meta.get(key) != value:
            raise cli.UsageError(f"--out {plan.out} was recorded with {key} {meta.get(key)!r}, not {value!r}; "
                                 f"rerun with its options or choose another --out")
    return table.to_pylist(), meta


def _jsonable(value):
    return json.loads(json.dumps(value))


def write(plan: Plan, rows: list[dict], meta: dict) -> None:
    """The whole table, written to a temporary file then moved over ``plan.out``: never half a table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    plan.out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    fd, tmp = tempfile.mkstemp(prefix=".curves-", suffix=".parquet", dir=plan.out.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)   # mkstemp's file is private; the table is an ordinary file
        os.replace(tmp, plan.out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def record(plan: Plan, command: str, log=print) -> int:
    """Train the plan's configurations not recorded yet, writing the table after each; returns how many ran."""
    import torch

    torch.set_num_threads(1)   # one thread per run: seconds comparable across configurations and machines
    rows, meta = read_existing(plan)
    meta = meta or {"space": _jsonable(SPACE), "fixed": plan.fixed, "dataset": plan.dataset, "seed": plan.seed,
                    "machine": machine(), "commands": []}
    meta["commands"].append({"command": command, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    done = {r["config_id"] for r in rows}
    from study.engine import RunOptions, trial_splits

    splits, ran = None, 0
    with tempfile.TemporaryDirectory(prefix="curves-") as work:
        for index in range(plan.configs):
            cfg = draw(plan.seed, index, plan.dataset, plan.fixed)
            if config_id(cfg) in done:
                continue
            splits = splits or trial_splits(cfg, plan.data_root, plan.cache_dir)   # every config shares them
            options = RunOptions(splits=splits, device="cpu", work_dir=work, log=lambda line: None)
            started = time.perf_counter()
            history, error = train(cfg, options)
            rows += table_rows(cfg, index, history, error)
            write(plan, rows, meta)
            ran += 1
            last = history[-1]
            log(f"config {index} {config_id(cfg)}: {len(history)} epochs in {time.perf_counter() - started:.1f} s, "
                + (f"error: {error}" if error else f"test gain {last['test_psnr'] - last['test_gray_psnr']:+.2f} dB"),
                )
    return ran


def summary(df, early: int = 2, group: int = 8, draws: int = 2000, seed: int = 0) -> dict:
    """A first look at a curves table: its size and cost, the last epoch's test gains, and how well the
    ranking at epoch ``early`` (by val PSNR, the study's ranking) foresees the ranking at the last epoch,
    over the whole table and over ``draws`` random groups of ``group`` configurations (one pruning bracket)."""
    import numpy as np

    last_epoch = int(df["epochs"].max())
    val = df.pivot_table(index="config_id", columns="epoch", values="val_psnr", aggfunc="first")
    val = val.reindex(columns=range(1, last_epoch + 1)).fillna(-np.inf)   # a failed epoch ranks last
    final = df[df["epoch"] == last_epoch].set_index("config_id")
    gains = final["test_gain"].dropna()
    best = final.loc[val[last_epoch].idxmax()]
    rng = np.random.default_rng(seed)
    same, kept = 0, 0
    group = min(group, len(val))
    for _ in range(draws):
        pick = val.iloc[rng.choice(len(val), group, replace=False)]
        winner = pick[last_epoch].idxmax()
        same += pick[early].idxmax() == winner
        kept += pick.loc[winner, early] >= pick[early].median()   # median pruning at ``early`` keeps it
    return {
        "configs": int(val.shape[0]), "rows": len(df), "epochs": last_epoch,
        "failed_configs": int(df.loc[df["error"].notna(), "config_id"].nunique()),
        "seconds_per_config": {"median": float(df.groupby("config_id")["seconds"].sum().median()),
                               "mean": float(df.groupby("config_id")["seconds"].sum().mean())},
        "last_epoch_test_gain_db": {q: float(gains.quantile(v)) for q, v in
                                    (("min", 0), ("p25", .25), ("median", .5), ("p75", .75), ("max", 1))},
        "best_by_val": {"config_id": best.name, "draw": int(best["draw"]), "test_gain_db": float(best["test_gain"]),
                        **{k: best[k].item() if hasattr(best[k], "item") else best[k] for k in SPACE}},
        f"epoch{early}_leader_is_last_epoch_leader": bool(val[early].idxmax() == val[last_epoch].idxmax()),
        f"spearman_epoch{early}_vs_last": float(val[early].rank().corr(val[last_epoch].rank())),
        f"groups_of_{group}": {"draws": draws, f"epoch{early}_leader_wins": same / draws,
                               f"winner_survives_median_pruning_at_epoch{early}": kept / draws},
    }


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python scripts/record_curves.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=int, help="configurations to record (default: 2 with --smoke, else 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the configurations' draws (default: 0)")
    p.add_argument("--out", type=Path, default=Path("docs/search/cifar10-curves.parquet"),
                   help="the Parquet table, created or appended to (default: docs/search/cifar10-curves.parquet)")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "samples"],
                   help="cifar10, or samples (photos bundled with scikit-image; no data needed) (default: cifar10)")
    p.add_argument("--data-root", help="folder holding cifar10/<split>/<class>/*.png (default: $COLORIZE_DATA_ROOT)")
    p.add_argument("--cache-dir", help="decoded-image cache (default: $COLORIZE_CACHE_DIR or ./.cache)")
    p.add_argument("--smoke", action="store_true",
                   help=f"a quick check: {SMOKE['epochs']} epochs on {SMOKE['train_limit']} training and "
                        f"{SMOKE['eval_limit']} val/test images")
    p.add_argument("--summary", action="store_true",
                   help="print a first look at the table --out as JSON and train nothing")
    cli.add_debug(p)
    return p


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.summary:
        if not args.out.is_file():
            raise cli.UsageError(f"--out {args.out}: no such table; record one first")
        import pandas as pd

        print(json.dumps(summary(pd.read_parquet(args.out)), indent=1))
        return 0
    configs = args.configs if args.configs is not None else 2 if args.smoke else 64
    if configs < 1:
        raise cli.UsageError(f"--configs {configs}: record at least 1 configuration")
    if not 0 <= args.seed < 2 ** 32:
        raise cli.UsageError(f"--seed {args.seed}: use 0 to 2**32 - 1")
    if args.out.suffix != ".parquet":
        raise cli.UsageError(f"--out {args.out}: name a .parquet file")
    cli.check_writable(f"--out {args.out}", args.out.parent, "the curves table")
    if args.data_root and not Path(args.data_root).is_dir():
        raise cli.UsageError(f"--data-root {args.data_root}: no such folder; name the folder that holds cifar10/")
    fixed = {**FIXED, **(SMOKE if args.smoke else {})}
    plan = Plan(args.dataset, fixed, args.seed, configs, args.out, args.data_root, args.cache_dir)
    draw(plan.seed, 0, plan.dataset, plan.fixed)   # a space the config rules refuse fails before any work
    ran = record(plan, portable_command(argv))
    print(f"recorded {ran} new configuration(s) in {args.out}")
    return 0


# Options whose value is a folder of the recording machine: the table's metadata names them by these words.
MACHINE_PATHS = {"--data-root": "DATA", "--cache-dir": "CACHE"}


def portable_command(argv: list[str]) -> str:
    """The command as the table records it: a folder of the machine that recorded it (``MACHINE_PATHS``) is
    named by a word, in either spelling (``--data-root X`` or ``--data-root=X``)."""
    out, hide = [], None
    for arg in argv:
        name = arg.split("=", 1)[0]
        if hide is not None:
            out.append(hide)
            hide = None
        elif name in MACHINE_PATHS and "=" in arg:
            out.append(f"{name}={MACHINE_PATHS[name]}")
        else:
            out.append(arg)
            hide = MACHINE_PATHS.get(arg)
    return "python scripts/record_curves.py " + " ".join(shlex.quote(a) for a in out)


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
