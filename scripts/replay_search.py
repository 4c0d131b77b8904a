"""Replay search strategies on recorded learning curves (docs/search.md): which finds a good colorizer sooner?

    python scripts/replay_search.py --table docs/search/cifar10-curves.parquet --trials 300 --seeds 20 \\
        --concurrency 8 32 --processes 2 --figure docs/search/replay.png --csv docs/search/replay.csv

Trials replay the table's curves on a simulated clock (analysis.replay: a proposal maps to its nearest
recorded configuration, a trial costs the recorded seconds of the epochs it ran). The strategies are
analysis.replay.STRATEGIES (Optuna's samplers and pruners) and, here:
- ``default``: the sampler and pruner of ``search_spaces/full.yaml``, made by ``study.space``'s own
  factories, as a study makes them;
- ``asha``: random search with Ray Tune's ASHA (``ray.tune.schedulers.ASHAScheduler``), driven through its
  public ``on_trial_add`` / ``on_trial_result`` / ``on_trial_complete``;
- ``report-grid``: the CIFAR-10 half of ``search_spaces/report.yaml``'s 8-configuration grid. Its
  configurations are not in the table (32 filters, 30 epochs): each replays its nearest neighbour.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.replay import STRATEGIES, Curves, Job, OptunaFactories, Strategy, run_jobs, table_curves  # noqa: E402
from study import cli  # noqa: E402

DEFAULT_SPACE = "full"


@dataclass(frozen=True)
class _TuneTrial:
    """All ASHAScheduler reads of a trial: its id."""
    trial_id: str


class AshaJudge:
    """Ray Tune's ASHA (Ray's defaults: grace period 1, reduction factor 4, one bracket) on val PSNR."""

    def __init__(self, epochs: int, seed: int):
        import numpy as np
        from ray.tune.schedulers import ASHAScheduler

        np.random.seed(seed)   # on_trial_add draws each trial's bracket from numpy's global generator
        self.scheduler = ASHAScheduler(time_attr="training_iteration", metric="val_psnr", mode="max",
                                       max_t=epochs, grace_period=1, reduction_factor=4)

    def add(self, trial) -> None:
        self.scheduler.on_trial_add(None, _TuneTrial(str(trial.number)))

    def should_stop(self, trial, epoch: int, value: float) -> bool:
        from ray.tune.schedulers import TrialScheduler

        result = {"training_iteration": epoch, "val_psnr": value}
        return self.scheduler.on_trial_result(None, _TuneTrial(str(trial.number)), result) == TrialScheduler.STOP

    def complete(self, trial, epoch: int, value: float) -> None:
        result = {"training_iteration": epoch, "val_psnr": value}
        self.scheduler.on_trial_complete(None, _TuneTrial(str(trial.number)), result)


class SpaceFactories(OptunaFactories):
    """Samplers and pruners as a study makes them (study.space), and Ray's ASHA for ``{name: asha}``."""

    def sampler(self, spec: dict, seed: int):
        from study.space import make_sampler
        return make_sampler(spec, seed)

    def pruner(self, spec: dict):
        from study.space import make_pruner
        return make_pruner({"name": "none"} if spec["name"] == "asha" else spec)

    def judge(self, strategy: Strategy, seed: int, epochs: int):
        return AshaJudge(epochs, seed) if strategy.pruner["name"] == "asha" else super().judge(strategy, seed, epochs)


def report_grid(curves: Curves) -> tuple[dict, ...]:
    """The CIFAR-10 configurations of report.yaml's grid on the table's axes (values the report leaves
    out are TrialConfig's defaults)."""
    from study.config import TrialConfig
    from study.space import load_space

    space = load_space("report")
    grid = space.grid()
    fixed = {n: p.dist_for({"dataset": "cifar10"}).values[0] for n, p in space.params.items() if n not in grid}
    out = []
    for values in itertools.product(*grid.values()):
        config = {**fixed, **dict(zip(grid, values))}
        if config["dataset"] == "cifar10":
            cfg = TrialConfig.from_dict(config)
            out.append({a.name: getattr(cfg, a.name) for a in curves.axes})
    return tuple(out)


def strategies(curves: Curves) -> list[Strategy]:
    from study.space import load_space

    full = load_space(DEFAULT_SPACE)
    return [*STRATEGIES,
            Strategy("default", full.sampler, full.pruner,
                     note=f"search_spaces/{DEFAULT_SPACE}.yaml's sampler {full.sampler} and pruner {full.pruner}"),
            Strategy("asha", {"name": "random"}, {"name": "asha"},
                     note="random search + Ray Tune's ASHA (grace period 1 epoch, reduction factor 4)"),
            Strategy("report-grid", {"name": "random"}, {"name": "none"}, report_grid(curves),
                     note="report.yaml's CIFAR-10 grid (4 configurations), each as its nearest recorded neighbour")]


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python scripts/replay_search.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", type=Path, default=Path("docs/search/cifar10-curves.parquet"),
                   help="a curves table scripts/record_curves.py wrote (default: docs/search/cifar10-curves.parquet)")
    p.add_argument("--trials", type=int, default=300, help="trials per replay (default: 300)")
    p.add_argument("--seeds", type=int, default=20, help="replays per strategy, seeds 0.. (default: 20)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[8], help="workers, one replay set each (default: 8)")
    p.add_argument("--processes", type=int, default=2, help="processes the replays are spread over (default: 2)")
    p.add_argument("--only", nargs="+", help="replay only these strategies (default: all)")
    p.add_argument("--figure", type=Path, help="write the figure (PNG) here")
    p.add_argument("--csv", type=Path, help="write the summary table (CSV) here")
    cli.add_debug(p)
    return p


def _check(args) -> None:
    for name, low, high in (("trials", 1, 100_000), ("seeds", 1, 10_000), ("processes", 1, 256)):
        if not low <= getattr(args, name) <= high:
            raise cli.UsageError(f"--{name} {getattr(args, name)}: use {low}..{high:,}")
    if any(not 1 <= c <= 10_000 for c in args.concurrency):
        raise cli.UsageError(f"--concurrency {args.concurrency}: each must be in 1..10,000")
    if not args.table.is_file():
        raise cli.UsageError(f"--table {args.table}: no such file; record one with scripts/record_curves.py")
    for option in ("figure", "csv"):
        path = getattr(args, option)
        if path is not None:
            cli.check_writable(f"--{option} {path}", path.parent, f"the {option}")


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    _check(args)
    curves = table_curves(args.table)
    chosen = strategies(curves)
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in chosen})
        if unknown:
            raise cli.UsageError(f"--only {unknown}: unknown; choose from {[s.name for s in chosen]}")
        chosen = [s for s in chosen if s.name in args.only]
    jobs = [Job(s, seed, args.trials, c) for c in args.concurrency for s in chosen for seed in range(args.seeds)]
    print(f"{len(curves)} recorded configurations; {len(jobs)} replays of {args.trials} trials on "
          f"{args.processes} process(es)", flush=True)
    started = time.perf_counter()
    runs = run_jobs(curves, jobs, SpaceFactories(), args.processes)
    print(f"replays took {time.perf_counter() - started:.1f} s", flush=True)
    _write(runs, curves, chosen, args)
    return 0


def _write(runs, curves: Curves, chosen: list[Strategy], args) -> None:
    from analysis.replay_figures import progress_figure, summary
    from analysis.style import save

    best = curves.best()
    print(f"best configuration by val: {curves.ids[best]} ({curves.params[best]}), test gain "
          f"{curves.found(best):+.2f} dB")
    for s in chosen:
        print(f"- {s.name}: {s.note}")
    table = summary(runs, curves, best)
    print(table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.figure:
        save(progress_figure(runs, curves, best), args.figure)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
