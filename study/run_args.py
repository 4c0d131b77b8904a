"""The command line of ``python -m study.run``: its options, their help and the description ``--help``
shows. Kept apart from the study itself so that ``study.submit`` checks a job's arguments without importing
the study's Ray layer or the training engine.
"""
from __future__ import annotations

import argparse

from study import cli
from study.durations import duration
from study.space import SPACES_DIR

FROM_SPACE = "(default: the space file's {key}; the shipped spaces' are listed below)"

DESCRIPTION = """Run a hyperparameter study: ``python -m study.run --space full``.

Ray Tune schedules the trials on this machine's (or a cluster's) GPUs or CPUs,
Optuna chooses configurations and prunes bad trials early, and the results land
as Parquet in ``<storage>/<name>/results/``.

Every option, the space file and the storage are checked before anything is written and before
Ray starts (``--plan`` too); a bad one ends the command with ``error: ...`` and exit status 2.
``study.json`` is written only when the study really starts, with a copy of its space file, so a
run that fails before its first trial leaves the name free. One driver per study. The default
Optuna SQLite database is recorded relative to the study folder, so a moved study resumes there.
A password in ``--optuna-storage`` is never printed or stored: ``study.json`` keeps the URL without
it; on ``--resume`` pass it again or let the database client find it ($PGPASSWORD, ~/.pgpass).
"""


class _Parser(cli.ArgumentParser):
    """study.run's parser: the shipped spaces' settings are read only when --help shows them."""

    def format_help(self) -> str:
        if self.epilog is None:
            self.epilog = shipped_settings()
        return super().format_help()


def shipped_settings() -> str:
    """The settings each shipped space gives the options that default to the space's, as a table."""
    from study.space import load_space   # read as a study reads them: the file's values and the defaults

    head = ("space", "num-samples", "max-concurrent", "cpus-per-trial", "gpus-per-trial", "pack (gpu/cpu)",
            "time-budget")
    rows = [head]
    for path in sorted(SPACES_DIR.glob("*.yaml")):
        try:
            s = load_space(path)
        except cli.ProjectError as e:
            rows.append((path.stem, f"(cannot be read: {str(e).splitlines()[0]})"))
            continue
        rows.append((s.name, str(s.num_samples), str(s.max_concurrent), f"{s.resources.get('cpu', 0):g}",
                     f"{s.resources.get('gpu', 0):g}", f"{s.pack_for(gpu=True)}/{s.pack_for(gpu=False)}",
                     "none" if s.time_budget_s is None else duration(s.time_budget_s)))
    widths = [max(len(r[i]) for r in rows if len(r) > i) for i in range(len(head))]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return (f"The options above default to the space's settings; the shipped spaces' ({SPACES_DIR.name}/*.yaml):\n"
            + "\n".join(lines) + "\nA space file of your own sets them at its top (num_samples, max_concurrent, "
            "resources, pack, time_budget);\n--plan shows what a study of it would run.")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m study.run", description=DESCRIPTION,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    shipped = ", ".join(sorted(f.stem for f in SPACES_DIR.glob("*.yaml")))
    p.add_argument("--space", default="full",
                   help=f"a shipped space ({shipped}) or a path to a .yaml file (default: full)")
    p.add_argument("--name", help="study name (default: the space's name)")
    p.add_argument("--storage", default="studies",
                   help="where studies live: a local folder or a URL s3://<bucket>/<prefix>, gs://, hdfs://, "
                        "abfs:// (default: studies)")
    p.add_argument("--data-root", help="folder holding <dataset>/<split>/<class>/*.jpg "
                                       "(default: $COLORIZE_DATA_ROOT, else the datasets are downloaded)")
    p.add_argument("--cache-dir", help="decoded-image cache on each node (default: $COLORIZE_CACHE_DIR, else ./.cache)")
    p.add_argument("--num-samples", type=int,
                   help="trials to run, >= 1 " + FROM_SPACE.format(key="num_samples") + "; with --resume, the "
                        "study's new total (more trials for a finished study)")
    p.add_argument("--time-budget",
                   help="the study's running time: 90m, 2h, 1d, 1h30m or seconds, or none; counted across "
                        "interruptions and resumes; with --resume, a new budget from now "
                        + FROM_SPACE.format(key="time_budget, else none"))
    p.add_argument("--plan", action="store_true",
                   help="print the study's plan and an estimate of its time from a short calibration on this "
                        "machine, then stop: nothing is written and no study starts")
    p.add_argument("--verbose", action="store_true", help="also show Ray Tune's own progress tables and messages")
    p.add_argument("--max-concurrent", type=int, help="trials at once, >= 1 " + FROM_SPACE.format(key="max_concurrent"))
    p.add_argument("--gpus-per-trial", type=float,
                   help="GPUs per trial, >= 0, fractions allowed " + FROM_SPACE.format(key="resources.gpu"))
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial, > 0 " + FROM_SPACE.format(key="resources.cpu"))
    p.add_argument("--pack", type=int,
                   help="trials trained together as one fused model, >= 1 " + FROM_SPACE.format(key="pack: its gpu "
                                                                                         "or cpu value"))
    p.add_argument("--address", help="connect to an existing Ray cluster (e.g. auto, or ray://host:10001) "
                                     "(default: inside a Ray job the job's cluster, else a private local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (no --address) (default: all)")
    p.add_argument("--num-gpus", type=int,
                   help="GPUs the local Ray instance advertises (no --address) (default: all)")
    p.add_argument("--optuna-storage",
                   help="Optuna RDB URL (default: optuna.db in the study folder); a password in it is never "
                        "printed or stored: on --resume pass the URL again, or use $PGPASSWORD / ~/.pgpass")
    p.add_argument("--resume", action="store_true",
                   help="continue the study after an interruption, a time budget or its end (default: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of Optuna's sampler (default: 0)")
    cli.add_debug(p)
    return p
