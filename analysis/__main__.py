"""python -m analysis --study <study folder> --out <folder>

Exit status 2 when the folder is not a study at all, or --out is unusable (a
file, unwritable, or inside the study's results/); 130 on Ctrl-C and 143 on
SIGTERM, each with one line and ``--out`` left as it was (the report is made
beside it and moved into place when complete); 0 otherwise, with every problem
(missing tables, no finished trial, no previews, ...) printed to stderr as a
warning and listed in report.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from analysis.replay_study import MIN_TRIALS, ReplaySettings
from study import cli


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m analysis", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", type=Path, required=True,
                   help="the study folder (holding study.json and results/*.parquet); may still be running "
                        "(required)")
    p.add_argument("--out", type=Path, required=True,
                   help="the folder the figures, tables and report.md/report.html go to; made if missing "
                        "(required)")
    p.add_argument("--replay", action="store_true",
                   help="also replay search strategies (random, TPE, TPE with Optuna's pruners) over the study's "
                        f"own trials and report the compute each would have needed to find its best trial "
                        f"(needs at least {MIN_TRIALS} trials with recorded epochs)")
    p.add_argument("--replay-seeds", type=int, default=ReplaySettings.seeds,
                   help=f"replays per strategy with --replay, 1-1000 (default: {ReplaySettings.seeds})")
    cli.add_debug(p)
    return p


def check_out(out: Path, study: Path) -> None:
    """The report never goes into the study's results/ (the study's writer owns that folder, and readers
    would take the report's files for tables)."""
    results = (study / "results").resolve()
    if out.resolve() == results or results in out.resolve().parents:
        raise cli.UsageError(f"--out {out} is inside the study's results folder {study / 'results'}; give a "
                             f"folder outside it (e.g. {study / 'report'})")


def _replay(args, study):
    """With --replay, the study's curves and the replay's settings, or a usage error before anything is
    written; None without it."""
    if not args.replay:
        return None
    from analysis.replay_study import ReplayRefused, check_replayable
    try:
        return check_replayable(study), ReplaySettings(seeds=args.replay_seeds)
    except ReplayRefused as e:
        raise cli.UsageError(str(e)) from None


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if not 1 <= args.replay_seeds <= 1000:
        raise cli.UsageError(f"--replay-seeds {args.replay_seeds}: use 1-1000")
    check_out(args.out, args.study)
    cli.check_writable(f"--out {args.out}", args.out, "the report")   # before anything is read or written
    # Headless by default: the figures are only ever written to files.
    os.environ.setdefault("MPLBACKEND", "Agg")
    from analysis.load import load_study
    study = load_study(args.study)   # NotAStudyError: exit 2 through cli.run
    replay = _replay(args, study)
    from analysis.build import write_report  # matplotlib and seaborn: only once there is a study
    result = write_report(study, args.out, warn=lambda message: print(f"warning: {message}", file=sys.stderr),
                          replay=replay)
    figures = sum(f.endswith(".png") for f in result.files)
    tables = sum(f.endswith(".csv") for f in result.files)
    print(f"wrote {args.out / 'report.md'} and report.html: {figures} figures, {tables} tables, "
          f"{len(result.warnings)} warning(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
