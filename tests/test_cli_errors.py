"""Every bad input through the real command line: exit status, message, nothing written.

Each case runs ``python -m <module> <args>`` in its own folder (which holds the
storage, the space files and anything the case sets up beforehand) and checks
the exit status, the ``error:`` message on stderr, that there is no traceback,
and that the folder's listing is the same after the command as before it. The
cases fail before Ray starts and before any training, so they run concurrently
in a small thread pool (about a second of CPU each: importing torch).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml
from conftest import PYTHON, ROOT, python_env

TINY = {"sampler": {"name": "random"}, "num_samples": 2, "max_concurrent": 1, "resources": {"cpu": 1, "gpu": 0},
        "params": {"dataset": "samples", "depth": 2, "base_filters": 4, "epochs": 1, "train_limit": 64,
                   "eval_limit": 32, "lr": {"loguniform": [3.0e-4, 3.0e-3]}}}
SECRET = "S3cr3tPW"


def space(**changes) -> Callable[[Path], None]:
    """Set-up: writes ``space.yaml`` = TINY with top-level keys or params changed (None removes)."""
    def setup(folder: Path) -> None:
        raw = json.loads(json.dumps(TINY))
        for k, v in changes.items():
            target = raw["params"] if k.startswith("p_") else raw
            key = k[2:] if k.startswith("p_") else k
            if v is None:
                target.pop(key, None)
            else:
                target[key] = v
        (folder / "space.yaml").write_text(yaml.safe_dump(raw))
    return setup


def space_text(text: str) -> Callable[[Path], None]:
    """Set-up: writes ``space.yaml`` as this exact text (what yaml.safe_dump cannot write: aliases)."""
    def setup(folder: Path) -> None:
        (folder / "space.yaml").write_text(text)
    return setup


def alias_bomb(folder: Path) -> None:
    """9 levels of 9 aliases in ``description`` (9**9 strings once expanded)."""
    lines = ['  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    space_text(yaml.safe_dump(TINY) + "description:\n" + "\n".join(lines) + "\n")(folder)


def huge_space(folder: Path) -> None:
    """A valid space of 2 MiB of choices (a 55 MB one once hung)."""
    raw = json.loads(json.dumps(TINY))
    raw["params"]["seed"] = {"choice": list(range(300_000))}
    (folder / "space.yaml").write_text(yaml.safe_dump(raw, default_flow_style=True, width=1 << 30))


def study_json(space_name: str, name: str = "space", started: bool = False, **meta) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        space()(folder)
        (folder / "st" / name).mkdir(parents=True)
        record = {"name": name, "space": space_name, "optuna_storage": "sqlite:///optuna.db",
                  "optuna_study_name": name, "num_samples": 2, **meta}
        (folder / "st" / name / "study.json").write_text(json.dumps({k: v for k, v in record.items()
                                                                    if v is not None}))
        if started:   # Ray's saved state, as a started study has it (never read: the command stops first)
            (folder / "st" / name / "tuner.pkl").write_bytes(b"not read")
    return setup


def live_lock(folder: Path) -> None:
    space()(folder)
    (folder / "st" / "space").mkdir(parents=True)
    (folder / "st" / "space" / "driver.lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "token": "x", "heartbeat": time.time() + 3600,
         "heartbeat_s": 15, "started_at": "earlier"}))


def writable_pickle(folder: Path) -> None:
    study_json("space", grayscale="left out")(folder)
    pkl = folder / "st" / "space" / "tuner.pkl"
    pkl.write_bytes(b"not read")
    pkl.chmod(0o666)


def corrupt_trials(folder: Path) -> None:
    study_json("space", started=True, grayscale="left out")(folder)
    (folder / "st" / "space" / "results").mkdir()
    (folder / "st" / "space" / "results" / "trials.parquet").write_bytes(b"PAR1 cut short")


def many(*setups) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        for s in setups:
            s(folder)
    return setup


def a_file(folder: Path) -> None:
    space()(folder)
    (folder / "afile").write_text("a regular file")


def a_folder(folder: Path) -> None:
    (folder / "spaces").mkdir()


def empty_data(folder: Path) -> None:
    space(p_dataset="cifar10")(folder)
    (folder / "data").mkdir()


@dataclass
class Case:
    id: str
    module: str
    args: list[str]
    match: str                       # regex searched in stderr
    setup: Callable[[Path], None] = space()
    status: int = 2
    env: dict = field(default_factory=dict)
    skip: str | None = None


RUN = ["--storage", "st", "--cache-dir", "cache"]
CUDA = None
try:   # only for the skip marker; torch is imported by the cases themselves anyway
    import torch
    CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    pass

def a_png(folder: Path) -> None:
    from PIL import Image
    space()(folder)
    Image.new("L", (8, 8), 128).save(folder / "img.png")


def a_study_with_results(folder: Path) -> None:
    study_json("space")(folder)
    (folder / "st" / "space" / "results").mkdir()


FAKE_AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true"}
UNREACHABLE_S3 = "s3://bucket/x?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"

# The rules (secret, storage, options, space keys, colorize, analysis), each over inputs nobody named before.
RULE_CASES = [
    # the secret rule: every shape of URL in an error line is masked, an unreadable one not shown at all
    Case("optuna-url-password-in-query", "study.run",
         [*RUN, "--space", "space.yaml", "--optuna-storage", f"postgresql://u@127.0.0.1:9/db?password={SECRET}"],
         r"--optuna-storage postgresql://u@127\.0\.0\.1:9/db\?password=\*\*\*: cannot connect"),
    Case("optuna-url-sslpassword-in-query", "study.run",
         [*RUN, "--space", "space.yaml", "--optuna-storage",
          f"postgresql+psycopg://u@127.0.0.1:9/db?sslmode=disable&SSLPassword={SECRET}"],
         r"postgresql\+psycopg://u@127\.0\.0\.1:9/db\?sslmode=disable&SSLPassword=\*\*\*: cannot connect"),
    Case("optuna-url-at-in-password", "study.run",
         [*RUN, "--space", "space.yaml", "--optuna-storage", f"postgresql://u:p@ss:{SECRET}@127.0.0.1:9/db"],
         r"postgresql://u:\*\*\*@127\.0\.0\.1:9/db: not a database URL \(its user name or password holds an "
         r"unencoded '@'"),
    Case("optuna-url-ipv6-host", "study.run",
         [*RUN, "--space", "space.yaml", "--optuna-storage", f"postgresql://u:{SECRET}@[::1]:9/db"],
         r"--optuna-storage postgresql://u:\*\*\*@\[::1\]:9/db: cannot connect"),
    Case("optuna-url-percent-encoded", "study.run",
         [*RUN, "--space", "space.yaml", "--optuna-storage", f"postgresql://u:{SECRET}%40x@127.0.0.1:9/db"],
         r"--optuna-storage postgresql://u:\*\*\*@127\.0\.0\.1:9/db: cannot connect"),
    Case("optuna-url-bad-port", "study.run",
         [*RUN, "--space", "space.yaml", "--optuna-storage", f"postgresql://u:{SECRET}@host:99x/db"],
         r"--optuna-storage postgresql://<unreadable URL, not shown>: not a database URL"),
    Case("optuna-url-no-scheme", "study.run",
         [*RUN, "--space", "space.yaml", "--optuna-storage", f"u:{SECRET}@host/db"],
         r"--optuna-storage <not a URL, not shown>: not a database URL"),
    Case("optuna-url-a-pasted-password", "study.run", [*RUN, "--space", "space.yaml", "--optuna-storage", SECRET],
         r"--optuna-storage <not a URL, not shown>: not a database URL"),
    Case("optuna-url-garbage", "study.run", [*RUN, "--space", "space.yaml", "--optuna-storage", "::garbage::"],
         r"--optuna-storage <not a URL, not shown>: not a database URL"),
    Case("optuna-url-unknown-driver", "study.run",
         [*RUN, "--space", "space.yaml", "--optuna-storage", f"nosuchdb://u:{SECRET}@h/db"],
         r"--optuna-storage nosuchdb://u:\*\*\*@h/db: not usable"),
    # the storage rule: parsed once into a folder or a URL pyarrow opens, probed with a timeout
    Case("storage-empty", "study.run", ["--storage", "", "--space", "space.yaml"], r"--storage '': empty"),
    Case("storage-blank", "study.run", ["--storage", "  ", "--space", "space.yaml"], r"--storage '  ': empty"),
    Case("storage-newline", "study.run", ["--storage", "st\nx", "--space", "space.yaml"],
         r"--storage 'st\\nx': holds a control character"),
    Case("storage-file-scheme", "study.run", ["--storage", "file:///tmp/x", "--space", "space.yaml"],
         r"give a local folder as a plain path"),
    Case("storage-hdfs-unusable", "study.run", ["--storage", "hdfs://nohost:1/x", "--space", "space.yaml"],
         r"--storage hdfs://nohost:1/x: (cannot be opened|no answer within)"),
    Case("storage-gs-unusable", "study.run", ["--storage", "gs://colorize-no-such-bucket/x", "--space", "space.yaml"],
         r"--storage gs://colorize-no-such-bucket/x: (cannot be opened|no answer within)"),
    Case("storage-s3-unreachable", "study.run", ["--storage", UNREACHABLE_S3, "--space", "space.yaml"],
         r"--storage s3://bucket/x\?endpoint_override=127\.0\.0\.1:9.*: cannot be opened \(.*(connect|NETWORK)",
         env=FAKE_AWS),
    Case("storage-s3-credentials-in-url", "study.run", ["--storage", f"s3://AKIAX:{SECRET}@bucket/x", "--space",
                                                        "space.yaml"],
         r"--storage s3://AKIAX:\*\*\*@bucket/x: holds credentials"),
    Case("storage-s3-secret-in-query", "study.run", ["--storage", f"s3://bucket/x?secret_key={SECRET}", "--space",
                                                     "space.yaml"],
         r"--storage s3://bucket/x\?secret_key=\*\*\*: holds credentials"),
    # options against the bounds their consumers need, before anything starts
    Case("seed-over-max", "study.run", [*RUN, "--space", "space.yaml", "--seed", "99999999999999999999"],
         r"--seed 99999999999999999999: .*above the limit 4294967295 \(MAX_SEED in study/config/trial\.py\)"),
    Case("num-samples-over-max", "study.run", [*RUN, "--space", "space.yaml", "--num-samples", "1000000000000"],
         r"--num-samples 1000000000000: .*must be in 1\.\.1,000,000"),
    Case("num-samples-over-max-on-resume", "study.run",
         [*RUN, "--space", "space.yaml", "--resume", "--num-samples", "1000000000000"],
         r"--num-samples 1000000000000: .*must be in 1\.\.1,000,000", study_json("space", started=True)),
    Case("max-concurrent-over-max", "study.run", [*RUN, "--space", "space.yaml", "--max-concurrent", "100000"],
         r"--max-concurrent 100000: trials at once must be in 1\.\.10,000"),
    Case("pack-over-max", "study.run", [*RUN, "--space", "space.yaml", "--pack", "5000"], r"--pack 5000: .*1\.\.1,024"),
    Case("num-cpus-over-max", "study.run", [*RUN, "--space", "space.yaml", "--num-cpus", "10000000000"],
         r"--num-cpus 10000000000: CPUs of the local Ray must be in 1\.\.1,000,000"),
    Case("cpus-per-trial-nan", "study.run", [*RUN, "--space", "space.yaml", "--cpus-per-trial", "nan"],
         r"--cpus-per-trial nan: must be a number > 0"),
    Case("gpus-per-trial-below-rays-unit", "study.run", [*RUN, "--space", "space.yaml", "--gpus-per-trial", "1e-9"],
         r"--gpus-per-trial 1e-09: .*in steps of 0\.0001"),
    Case("time-budget-0", "study.run", [*RUN, "--space", "space.yaml", "--time-budget", "0"],
         r"--time-budget '0': a budget must be more than 0; for no budget at all write none"),
    Case("time-budget-0s", "study.run", [*RUN, "--space", "space.yaml", "--time-budget", "0s"],
         r"--time-budget '0s': a budget must be more than 0"),
    Case("time-budget-0m0s-on-plan", "study.run", [*RUN, "--space", "space.yaml", "--time-budget", "0m0s", "--plan"],
         r"--time-budget '0m0s': a budget must be more than 0"),
    Case("space-time-budget-0", "study.run", [*RUN, "--space", "space.yaml"],
         r"space\.yaml: time_budget: 0: a budget must be more than 0; for no budget at all write none",
         space(time_budget=0)),
    Case("name-starting-with-dash", "study.run", [*RUN, "--space", "space.yaml", "--name=-x"],
         r"--name '-x': a study name cannot start with '-'"),
    Case("name-with-newline", "study.run", [*RUN, "--space", "space.yaml", "--name", "a\nb"],
         r"--name 'a\\nb': a study name holds no control characters"),
    Case("address-empty", "study.run", [*RUN, "--space", "space.yaml", "--address", ""], r"--address '': give"),
    Case("address-jobs-api", "study.run", [*RUN, "--space", "space.yaml", "--address", "http://127.0.0.1:8265"],
         r"--address http://127\.0\.0\.1:8265: not a Ray cluster address \(an http:// address is the Jobs API"),
    Case("address-unreachable", "study.run", [*RUN, "--space", "space.yaml", "--address", "ray://127.0.0.1:1"],
         r"--address ray://127\.0\.0\.1:1: nothing answers at 127\.0\.0\.1:1"),
    Case("address-unreachable-gcs", "study.run", [*RUN, "--space", "space.yaml", "--address", "127.0.0.1:1"],
         r"--address 127\.0\.0\.1:1: nothing answers at 127\.0\.0\.1:1"),
    Case("address-with-credentials", "study.run",
         [*RUN, "--space", "space.yaml", "--address", f"ray://u:{SECRET}@127.0.0.1:1"],
         r"--address ray://u:\*\*\*@127\.0\.0\.1:1: not a Ray cluster address"),
    Case("name-dash-dash", "study.run", [*RUN, "--space", "space.yaml", "--name=--"], r"--name '': a study name"),
    # space files: a repeated key is named with its lines
    Case("space-duplicate-param", "study.run", [*RUN, "--space", "space.yaml"],
         r"space\.yaml: key 'lr' is given twice in the same mapping \(lines 3 and 4\)",
         space_text("params:\n  dataset: samples\n  lr: 0.001\n  lr: 0.01\n")),
    Case("space-duplicate-top-key", "study.run", [*RUN, "--space", "space.yaml"],
         r"key 'num_samples' is given twice in the same mapping \(lines 1 and 3\)",
         space_text("num_samples: 2\nparams: {dataset: samples, epochs: 1}\nnum_samples: 3\n")),
    # study.info: the same storage rule
    Case("info-on-a-file", "study.info", ["afile"], r"afile: is a file, not a folder", a_file),
    Case("info-empty", "study.info", [""], r"study '': empty"),
    Case("info-unknown-scheme", "study.info", ["ftp://h/x"], r"ftp:// is not a storage"),
    Case("info-credentials-in-url", "study.info", [f"s3://AKIAX:{SECRET}@b/x"], r"s3://AKIAX:\*\*\*@b/x: holds credentials"),
    Case("info-hdfs-unusable", "study.info", ["hdfs://nohost:1/x"], r"hdfs://nohost:1/x: (cannot be opened|no answer)"),
    # colorize: refused before the model loads
    Case("colorize-temperature-1e-400", "study.colorize",
         ["--study", "st", "--out", "out", "--temperature", "1e-400", "img.png"],
         r"--temperature: .*temperature", a_png),
    Case("colorize-out-unwritable", "study.colorize", ["--study", "st", "--out", "/proc/colorized", "img.png"],
         r"--out /proc/colorized: cannot create files in /proc", a_png),
    Case("colorize-study-is-a-file", "study.colorize", ["--study", "afile", "--out", "out", "img.png"],
         r"--study afile is a file, not a folder", many(a_file, a_png)),
    Case("colorize-study-credentials-in-url", "study.colorize",
         ["--study", f"s3://AKIAX:{SECRET}@b/st", "--out", "out", "img.png"], r"holds credentials", a_png),
    # analysis: never into the study's results/
    Case("analysis-out-inside-results", "analysis", ["--study", "st/space", "--out", "st/space/results/report"],
         r"--out st/space/results/report is inside the study's results folder", a_study_with_results),
    Case("analysis-out-is-results", "analysis", ["--study", "st/space", "--out", "st/space/results"],
         r"is inside the study's results folder", a_study_with_results),
]

CASES = [
    # space files (the rest of the space rules are tested in-process in test_space.py)
    Case("space-folder", "study.run", [*RUN, "--space", "spaces"], r"--space spaces is a folder, not a space file",
         a_folder),
    Case("max-failures-lots", "study.run", [*RUN, "--space", "space.yaml"],
         r"space\.yaml: max_failures: must be a whole number >= 0, got 'lots'", space(max_failures="lots")),
    Case("step-0", "study.run", [*RUN, "--space", "space.yaml"], r"params\.depth\.step: must be a whole number >= 1",
         space(p_depth={"int": [2, 3], "step": 0})),
    Case("step-negative", "study.run", [*RUN, "--space", "space.yaml"], r"params\.depth\.step: .* got -1",
         space(p_depth={"int": [2, 3], "step": -1})),
    Case("sampler-typo", "study.run", [*RUN, "--space", "space.yaml"],
         r"sampler\.n_startup_trail: not an option of tpe \(TPESampler\); allowed: \[.*'n_startup_trials'",
         space(sampler={"name": "tpe", "n_startup_trail": 3})),
    Case("resources-cpu-negative", "study.run", [*RUN, "--space", "space.yaml"],
         r"resources\.cpu: CPUs per trial must be a number > 0, got -1", space(resources={"cpu": -1})),
    Case("lr-negative", "study.run", [*RUN, "--space", "space.yaml"], r"params\.lr: lr=-0\.001 must be > 0",
         space(p_lr=-0.001)),
    Case("base-filters-0", "study.run", [*RUN, "--space", "space.yaml"], r"params\.base_filters: base_filters=0",
         space(p_base_filters={"choice": [0, 8]})),
    Case("dropout-1.5", "study.run", [*RUN, "--space", "space.yaml"], r"params\.dropout: dropout=1\.5 must be in",
         space(p_dropout={"uniform": [0.0, 1.5]})),
    Case("epochs-0", "study.run", [*RUN, "--space", "space.yaml"], r"params\.epochs: epochs=0 must be >= 1",
         space(p_epochs=0)),
    # sizes bounded before anything is written, each message naming its limit
    Case("space-alias-bomb", "study.run", [*RUN, "--space", "space.yaml"],
         r"space\.yaml: expands to more than 100,000 YAML values .*MAX_YAML_NODES", alias_bomb),
    Case("space-over-1-mib", "study.run", [*RUN, "--space", "space.yaml"],
         r"space\.yaml: larger than 1024 KiB \(MAX_SPACE_BYTES in study/space/reading\.py\)", huge_space),
    Case("space-is-a-device", "study.run", [*RUN, "--space", "/dev/zero"], r"--space /dev/zero is not a regular file"),
    Case("space-int-range-1e11", "study.run", [*RUN, "--space", "space.yaml"],
         r"params\.train_limit: int range \[1, 100000000000\] .* more than the limit 1,000,000 \(MAX_INT_RANGE_VALUES",
         space(p_train_limit={"int": [1, 100_000_000_000]})),
    Case("space-resolution-1000000", "study.run", [*RUN, "--space", "space.yaml"],
         r"params\.resolution: resolution=1000000 is above the limit 1024 px \(MAX_RESOLUTION in study/config/trial\.py\)",
         space(p_resolution=1000000)),
    Case("space-batch-size-over-limit", "study.run", [*RUN, "--space", "space.yaml"],
         r"params\.batch_size: batch_size=100000 is above the limit 8192 \(MAX_BATCH_SIZE",
         space(p_batch_size={"choice": [64, 100000]})),
    Case("space-epochs-over-limit", "study.run", [*RUN, "--space", "space.yaml"],
         r"params\.epochs: epochs=100000 is above the limit 1000 \(MAX_EPOCHS", space(p_epochs=100000)),
    # sampler and pruner options by type and documented range (this one used to start Ray, then fail)
    Case("sampler-option-wrong-type", "study.run", [*RUN, "--space", "space.yaml"],
         r"sampler\.n_startup_trials: 'three' is not a whole number \(TPESampler\.n_startup_trials: int",
         space(sampler={"name": "tpe", "n_startup_trials": "three"})),
    Case("sampler-option-out-of-range", "study.run", [*RUN, "--space", "space.yaml"],
         r"sampler\.mutation_prob: must be in \[0\.0, 1\.0\], got 1\.5",
         space(sampler={"name": "nsga2", "mutation_prob": 1.5})),
    Case("sampler-option-python-object", "study.run", [*RUN, "--space", "space.yaml"],
         r"sampler\.crossover: takes a Python object", space(sampler={"name": "nsga2", "crossover": "uniform"})),
    Case("pruner-option-wrong-type", "study.run", [*RUN, "--space", "space.yaml"],
         r"pruner\.n_warmup_steps: 2\.5 is not a whole number \(MedianPruner",
         space(pruner={"name": "median", "n_warmup_steps": 2.5})),
    Case("pruner-option-out-of-range", "study.run", [*RUN, "--space", "space.yaml"],
         r"pruner\.reduction_factor: must be a whole number >= 2, got 1",
         space(pruner={"name": "hyperband", "reduction_factor": 1})),
    Case("space-number-read-as-text", "study.run", [*RUN, "--space", "space.yaml"],
         r"params\.lr: '1e-3' is not a valid float for lr \(YAML reads 1e-3 as text: write 1\.0e-03, with a dot\)",
         space_text("params: {dataset: samples, epochs: 1, lr: 1e-3}\n")),
    # options
    Case("max-concurrent-negative", "study.run", [*RUN, "--space", "space.yaml", "--max-concurrent", "-2"],
         r"--max-concurrent -2: trials at once must be in 1\.\.10,000"),
    Case("max-concurrent-0", "study.run", [*RUN, "--space", "space.yaml", "--max-concurrent", "0"],
         r"--max-concurrent 0: .* leave it out for the space's own value"),
    Case("num-samples-negative", "study.run", [*RUN, "--space", "space.yaml", "--num-samples", "-1"],
         r"--num-samples -1: .*would run forever"),
    Case("num-samples-0", "study.run", [*RUN, "--space", "space.yaml", "--num-samples", "0"],
         r"--num-samples 0: .* must be in 1\.\.1,000,000; leave it out"),
    Case("cpus-per-trial-0", "study.run", [*RUN, "--space", "space.yaml", "--cpus-per-trial", "0"],
         r"--cpus-per-trial 0\.0: must be a number > 0"),
    Case("gpus-per-trial-negative", "study.run", [*RUN, "--space", "space.yaml", "--gpus-per-trial", "-1"],
         r"--gpus-per-trial -1\.0: must be a number >= 0"),
    Case("pack-option-0", "study.run", [*RUN, "--space", "space.yaml", "--pack", "0"], r"--pack 0: .* must be in 1\.\.1,024"),
    Case("seed-negative", "study.run", [*RUN, "--space", "space.yaml", "--seed", "-1"], r"--seed -1: .* >= 0"),
    Case("data-root-missing", "study.run", [*RUN, "--space", "space.yaml", "--data-root", "nodata"],
         r"--data-root .*nodata is not a folder"),
    Case("name-with-slash", "study.run", [*RUN, "--space", "space.yaml", "--name", "../elsewhere"],
         r"--name '\.\./elsewhere': a study name is one folder name"),
    Case("storage-below-a-file", "study.run", ["--storage", "afile/studies", "--space", "space.yaml"],
         r"--storage afile/studies: .*afile is a file, not a folder", a_file),
    Case("cache-dir-below-a-file", "study.run", ["--storage", "st", "--cache-dir", "afile/cache", "--space",
                                                  "space.yaml"], r"--cache-dir afile/cache: .*afile is a file", a_file),
    Case("storage-unwritable", "study.run", ["--storage", "/proc/colorize-studies", "--space", "space.yaml"],
         r"--storage /proc/colorize-studies: cannot create files in /proc"),
    Case("storage-relative-in-ray-job", "study.run", [*RUN, "--space", "space.yaml"],
         r"--storage 'st' is relative, and this runs as a Ray job", env={"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}),
    Case("optuna-url-unreachable", "study.run",
         [*RUN, "--space", "space.yaml", "--optuna-storage", f"postgresql://u:{SECRET}@127.0.0.1:9/db"],
         r"--optuna-storage postgresql://u:\*\*\*@127\.0\.0\.1:9/db: cannot connect"),
    Case("data-root-without-dataset", "study.run", [*RUN, "--space", "space.yaml", "--data-root", "data"],
         r"dataset 'cifar10': .*does not exist under the data root", empty_data),
    # study folders
    Case("resume-nothing", "study.run", [*RUN, "--space", "space.yaml", "--resume"], r"--resume: no study at"),
    Case("resume-other-space", "study.run", [*RUN, "--space", "space.yaml", "--resume"],
         r"--resume with space 'space', but the study at .* was started with 'smoke'", study_json("smoke")),
    Case("resume-study-that-kept-grayscale", "study.run", [*RUN, "--space", "space.yaml", "--resume"],
         r"started with grayscale images kept of its data splits, and they would now be left out.*"
         r"Set COLORIZE_ALLOW_GRAYSCALE=1 to resume it as it was",
         study_json("space", started=True)),   # a study.json from before the rule was recorded
    Case("resume-study-that-left-grayscale-out", "study.run", [*RUN, "--space", "space.yaml", "--resume"],
         r"started with grayscale images left out .* Unset COLORIZE_ALLOW_GRAYSCALE to resume it",
         study_json("space", started=True, grayscale="left out"), env={"COLORIZE_ALLOW_GRAYSCALE": "1"}),
    Case("exists-without-resume", "study.run", [*RUN, "--space", "space.yaml"],
         r"a study already exists at .*; pass --resume", study_json("space", started=True)),
    Case("second-driver", "study.run", [*RUN, "--space", "space.yaml"],
         r"the study at .* is being run by another driver pid \d+ on", live_lock),
    Case("resume-writable-pickle", "study.run", [*RUN, "--space", "space.yaml", "--resume"],
         r"tuner\.pkl is writable by others.*chmod -R go-w", writable_pickle),
    Case("resume-corrupt-trials", "study.run", [*RUN, "--space", "space.yaml", "--resume"],
         r"trials\.parquet is not a readable Parquet table .*Restore it from a copy", corrupt_trials),
    Case("enqueue-with-pack", "study.run", [*RUN, "--space", "space.yaml", "--pack", "2"],
         r"--pack 2: .*space\.yaml has an `enqueue` list, which needs pack 1",
         space(enqueue=[{"lr": 1.0e-3}])),
    # study.trial
    Case("trial-cuda-missing", "study.trial", ["--device", "cuda"], r"--device 'cuda': CUDA is not available",
         skip="this machine has CUDA" if CUDA else None),
    Case("trial-tpu", "study.trial", ["--device", "tpu"], r"--device 'tpu'"),
    Case("trial-lr-nan", "study.trial", ["--lr", "nan"], r"lr=nan must be a finite number"),
    Case("trial-temperature-0", "study.trial", ["--temperature", "0"],
         r"--temperature: temperature=0\.0 must be in \(0, 10\] \(1: the mean, towards 0: the mode"),
    Case("trial-temperature-negative", "study.trial", ["--temperature", "-0.5"], r"temperature=-0\.5 must be in \(0, 10\]"),
    Case("trial-rebalance-over-1", "study.trial", ["--rebalance", "1.5"],
         r"--rebalance: rebalance=1\.5 must be in \[0, 1\] \(0: none, 1: uniform\)"),
    Case("trial-rebalance-negative", "study.trial", ["--rebalance", "-0.1"], r"rebalance=-0\.1 must be in \[0, 1\]"),
    Case("trial-adversarial-negative", "study.trial", ["--adversarial", "-0.01"],
         r"--adversarial: adversarial=-0\.01 must be in \[0, 10\] \(0: off\)"),
    Case("trial-resolution-1000000", "study.trial", ["--resolution", "1000000"],
         r"--resolution: resolution=1000000 is above the limit 1024 px \(MAX_RESOLUTION in study/config/trial\.py\)"),
    Case("trial-batch-size-over-limit", "study.trial", ["--batch-size", "100000"],
         r"--batch-size: batch_size=100000 is above the limit 8192 \(MAX_BATCH_SIZE"),
    Case("trial-epochs-over-limit", "study.trial", ["--epochs", "5000"],
         r"--epochs: epochs=5000 is above the limit 1000 \(MAX_EPOCHS"),
    Case("trial-epochs-not-whole", "study.trial", ["--epochs", "2.5"], r"--epochs: epochs='2\.5' is not a whole number"),
    Case("trial-unknown-choice", "study.trial", ["--loss", "lab"],
         r"^error: argument --loss: invalid choice: 'lab' \(choose from 'mse', 'l1', 'huber'\) \(see python -m "
         r"study\.trial --help\)$"),
    Case("trial-unknown-option", "study.trial", ["--learning-rate", "0.1"],
         r"error: unrecognized arguments: --learning-rate 0\.1"),
    Case("trial-cache-env-unwritable", "study.trial", [],
         r"COLORIZE_CACHE_DIR=/proc/colorize-cache: cannot create files in /proc",
         env={"COLORIZE_CACHE_DIR": "/proc/colorize-cache"}),
    Case("trial-samples-too-many", "study.trial", ["--train-limit", "100000000", "--device", "cpu"],
         r"dataset 'samples': 100,000,000 train crops of 32x32 would take 286\.1 GiB, over the limit of 4 GiB "
         r"per split \(SAMPLE_MAX_BYTES"),
    Case("trial-out-file", "study.trial", ["--out", "afile/run"], r"--out afile/run: afile is a file, not a folder", a_file),
    # study.submit: checked before connecting, and an unreachable address is one line
    Case("submit-bad-space", "study.submit", ["--address", "http://127.0.0.1:9", "--", "--space", "nope",
                                               "--storage", "/abs/studies"], r"no space named 'nope'"),
    Case("submit-bad-option", "study.submit", ["--address", "http://127.0.0.1:9", "--", "--space", "space.yaml",
                                                "--storage", "/abs/studies", "--max-concurrent", "0"],
         r"--max-concurrent 0"),
    Case("submit-password-in-url", "study.submit",
         ["--address", "http://127.0.0.1:9", "--", "--space", "space.yaml", "--storage", "/abs/studies",
          "--optuna-storage", f"postgresql://u:{SECRET}@db.example/studies"],
         r"--optuna-storage postgresql://u:\*\*\*@db\.example/studies: a job's command line is shown"),
    Case("submit-unreachable", "study.submit", ["--address", "http://127.0.0.1:9", "--", "--space", "space.yaml",
                                                 "--storage", "/abs/studies"],
         r"--address http://127\.0\.0\.1:9: no Ray Jobs API answers there.*Nothing was submitted"),
    # analysis
    Case("analysis-out-file", "analysis", ["--study", "st", "--out", "afile"], r"--out afile: afile is a file", a_file),
    Case("analysis-not-a-study", "analysis", ["--study", "nowhere", "--out", "report"], r"nowhere"),
    # storage URLs, names, study records and resumes, checked before anything is written
    Case("storage-s3-no-bucket", "study.run", ["--storage", "s3://", "--space", "space.yaml"],
         r"--storage s3://: no bucket after s3://"),
    Case("storage-s3-empty-host", "study.run", ["--storage", "s3:///x", "--space", "space.yaml"],
         r"--storage s3:///x: no bucket after s3://"),
    Case("storage-unknown-scheme", "study.run", ["--storage", "foo://bar", "--space", "space.yaml"],
         r"foo:// is not a storage a study can live on"),
    Case("storage-no-slashes", "study.run", ["--storage", "s3:bucket", "--space", "space.yaml"],
         r"looks like a URL without '//'"),
    Case("name-300-chars", "study.run", [*RUN, "--space", "space.yaml", "--name", "n" * 300],
         r"--name: 300 bytes long; a study name is a folder name of at most 120 bytes"),
    Case("study-json-not-json", "study.run", [*RUN, "--space", "space.yaml", "--resume"],
         r"st/space/study\.json is not valid JSON", many(space(), lambda f: (f / "st" / "space").mkdir(parents=True),
                                                        lambda f: (f / "st" / "space" / "study.json").write_text("{"))),
    Case("study-json-missing-keys", "study.run", [*RUN, "--space", "space.yaml", "--resume"],
         r"study\.json lacks optuna_storage, optuna_study_name, num_samples",
         study_json("space", started=True, optuna_storage=None, optuna_study_name=None, num_samples=None)),
    Case("resume-without-optuna-db", "study.run", [*RUN, "--space", "space.yaml", "--resume"],
         r"the study's Optuna database .*optuna\.db is missing",
         study_json("space", started=True, grayscale="left out", optuna_storage="sqlite:///optuna.db",
                    optuna_study_name="space", num_samples=2)),
    Case("time-budget-words", "study.run", [*RUN, "--space", "space.yaml", "--time-budget", "soon"],
         r"--time-budget 'soon': give a duration such as 90m, 2h, 1d"),
    Case("space-time-budget-bad", "study.run", [*RUN, "--space", "space.yaml"],
         r"space\.yaml: time_budget: .*give a duration such as 90m", space(time_budget="tomorrow")),
    Case("cpus-no-node-has", "study.run", [*RUN, "--space", "space.yaml", "--num-cpus", "1"],
         r"each trial asks for 64 CPU, and this machine's Ray has at most 1 CPU", space(resources={"cpu": 64})),
    # the handler itself: --debug adds the traceback and keeps the exit status
    Case("debug-shows-traceback", "study.run", [*RUN, "--space", "space.yaml", "--max-concurrent", "0", "--debug"],
         r"Traceback .*UsageError: --max-concurrent 0"),
    Case("debug-keeps-status-of-a-space-error", "study.run", [*RUN, "--space", "space.yaml", "--debug"],
         r"Traceback .*params\.epochs: epochs=0 must be >= 1", space(p_epochs=0)),
    *RULE_CASES,
]


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mode) for p in sorted(folder.rglob("*"))
            if "cache" not in p.relative_to(folder).parts}


def run_case(case: Case, root: Path) -> dict:
    folder = root / case.id
    folder.mkdir()
    case.setup(folder)
    before = listing(folder)
    env = python_env(**case.env)
    for k in ("COLORIZE_DEBUG", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", *(() if case.env else
                                                                          ("RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_JOB_ID"))):
        if k not in case.env:
            env.pop(k, None)
    t0 = time.monotonic()
    p = subprocess.run([PYTHON, "-m", case.module, *case.args], cwd=folder, env=env, capture_output=True,
                       text=True, timeout=120)
    return {"rc": p.returncode, "out": p.stdout, "err": p.stderr, "before": before, "after": listing(folder),
            "seconds": time.monotonic() - t0}


@pytest.fixture(scope="module")
def results(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("cli-errors")
    # Only the cases this session selected (-k), all at once in a small pool.
    selected = {item.callspec.params["case"].id for item in request.session.items
                if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})}
    todo = [c for c in CASES if not c.skip and c.id in selected]
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = dict(zip((c.id for c in todo), pool.map(lambda c: run_case(c, root), todo)))
    return done


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_message_exit_2_and_nothing_written(case, results):
    if case.skip:
        pytest.skip(case.skip)
    r = results[case.id]
    err = r["err"]
    assert r["rc"] == case.status, (r["rc"], err[-3000:], r["out"][-1000:])
    assert re.search(case.match, err, re.S), err[-3000:]
    assert SECRET not in err + r["out"]
    if case.status == 2 and "--debug" not in case.args:
        assert "Traceback" not in err, err[-3000:]
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, err
    assert r["after"] == r["before"], (sorted(set(r["after"]) ^ set(r["before"])), err[-2000:])


# ------------------------------------------------------------------ the handler itself, in-process


def test_handler_statuses(capsys, monkeypatch):
    from study import cli

    monkeypatch.setenv(cli.DEBUG_ENV, "0")   # restored after the test: run() sets it for --debug

    def fails(exc, started=False):
        def main(argv):
            if started:
                cli.work_started()
            raise exc
        return main

    assert cli.run(fails(cli.UsageError("--x 0: give 1 or more")), []) == 2
    assert capsys.readouterr().err == "error: --x 0: give 1 or more\n"
    assert cli.run(fails(cli.UsageError("results folder went away"), started=True), []) == 1   # partly done
    assert cli.run(lambda argv: None, []) == 0 and cli.run(lambda argv: 3, []) == 3
    try:   # a library that wraps our error (raise ... from) still gives the message
        raise RuntimeError("wrapper") from cli.UsageError("the real reason")
    except RuntimeError as e:
        wrapped = e
    assert cli.run(fails(wrapped), []) == 2 and "error: the real reason" in capsys.readouterr().err
    assert cli.run(fails(KeyboardInterrupt()), []) == 130
    with pytest.raises(ZeroDivisionError):   # a bug keeps its traceback
        cli.run(fails(ZeroDivisionError()), [])
    seen = []
    assert cli.run(lambda argv: seen.append(argv), ["--a", "--debug", "--", "--debug"]) == 0
    assert seen == [["--a", "--", "--debug"]]   # only before "--": what follows belongs to another command
    # --debug adds the traceback; the status is the same as without it
    assert cli.run(fails(cli.UsageError("x")), ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: x\n")
    assert cli.run(fails(cli.UsageError("y"), started=True), ["--debug"]) == 1
    assert cli.run(fails(KeyboardInterrupt()), ["--debug"]) == 130


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_command_started_with_its_stop_signals_blocked_still_stops_on_them(sig, status):
    """The mask is inherited: a parent that left SIGINT and SIGTERM blocked must not make a command deaf."""
    def blocked() -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

    code = ("import sys, time; from study import cli; "
            "sys.exit(cli.run(lambda argv: (print('ready', flush=True), time.sleep(60))))")
    p = subprocess.Popen([PYTHON, "-c", code], cwd=ROOT, env=python_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=blocked)
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == status, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


# ------------------------------------------------------------------ help that helps


def _help_blocks(text: str) -> dict[str, str]:
    """``--flag`` -> its help text, from argparse's --help output (an option line, then indented lines)."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.split("options:", 1)[1].splitlines():
        m = re.match(r"^  (-[^ ].*?)(?:  +(.*))?$", line)
        if m:
            current = m.group(1).split()[0].rstrip(",")
            blocks[current] = (m.group(2) or "").strip()
        elif current and line.startswith("   "):
            blocks[current] = (blocks[current] + " " + line.strip()).strip()
    return blocks


def test_trial_help_describes_every_option_with_choices_and_default():
    from dataclasses import fields

    from study.config.trial import TrialConfig, choices_of, show_default

    p = subprocess.run([PYTHON, "-m", "study.trial", "--help"], env=python_env(COLUMNS="100"), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    blocks = _help_blocks(p.stdout)
    assert len(blocks) >= len(fields(TrialConfig)) + 5, blocks
    for flag, text in blocks.items():
        assert text, f"{flag} has no help"
        if flag not in ("-h", "--debug"):
            assert "(default: " in text, f"{flag}: {text}"
    for f in fields(TrialConfig):
        text = " ".join(blocks["--" + f.name.replace("_", "-")].split())
        # The field's own metadata is the one source: its words, its choices, its default.
        assert " ".join(f.metadata["help"].split()) in text, (f.name, text)
        assert text.endswith(f"(default: {show_default(f.default)})"), (f.name, text)
        for choice in choices_of(f.name) or ():
            assert choice in text, (f.name, choice, text)
    assert blocks["--loss"] == ("training loss of rgb and uv outputs (uv-classes: cross-entropy); "
                                "one of mse, l1, huber (default: mse)")


def test_the_hostile_pass_script_runs_its_cases_and_says_each_is_ok():
    """scripts/hostile.py's smoke: a few of its cases, through the real command line (the whole pass takes
    about two minutes and is run by hand)."""
    p = subprocess.run([PYTHON, str(ROOT / "scripts" / "hostile.py"), "--only", "run name", "--jobs", "2"],
                       capture_output=True, text=True, env=python_env(), timeout=300, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    summary = p.stdout.strip().splitlines()[-2]
    n = int(summary.split()[0])
    assert n >= 5 and f"{n} cases: {n} ok, 0 bad" in summary, summary
