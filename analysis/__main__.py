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
    cli.add_debug(p)
    return p


def check_out(out: Path, study: Path) -> None:
    """The report never goes into the study's results/ (the study's writer owns that folder, and readers
    would take the report's files for tables)."""
    results = (study / "results").resolve()
    if out.resolve() == results or results in out.resolve().parents:
        raise cli.UsageError(f"--out {out} is inside the study's results folder {study / 'results'}; give a "
                             f"folder outside it (e.g. {study / 'report'})")


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    check_out(args.out, args.study)
    cli.check_writable(f"--out {args.out}", args.out, "the report")   # before anything is read or written
    # Headless by default: the figures are only ever written to files.
    os.environ.setdefault("MPLBACKEND", "Agg")
    from analysis.load import load_study
    study = load_study(args.study)   # NotAStudyError: exit 2 through cli.run
    from analysis.build import write_report  # matplotlib and seaborn: only once there is a study
    result = write_report(study, args.out, warn=lambda message: print(f"warning: {message}", file=sys.stderr))
    figures = sum(f.endswith(".png") for f in result.files)
    tables = sum(f.endswith(".csv") for f in result.files)
    print(f"wrote {args.out / 'report.md'} and report.html: {figures} figures, {tables} tables, "
          f"{len(result.warnings)} warning(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
