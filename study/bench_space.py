"""The synthetic study's space as the driver benchmarks write it (study.bench_driver, study.bench_growth):
a space like the smoke study's (TPE, the median pruner or none) whose trials report generated curves
(study.tune.synthetic), at the benchmark's sizes. Imports no Ray."""
from __future__ import annotations

import yaml


def space_text(trials: int, epochs: int, concurrency: int, epoch_seconds: float, pruning: bool = True) -> str:
    """A synthetic space like the smoke study's (TPE, median pruner or none), with the benchmark's sizes."""
    return yaml.safe_dump({
        "description": "the driver benchmark's synthetic study (python -m study.bench --parts driver)",
        "synthetic": {"epoch_seconds": epoch_seconds},
        "sampler": {"name": "tpe", "n_startup_trials": 10},
        "pruner": {"name": "median", "n_startup_trials": 5, "n_warmup_steps": 2} if pruning else {"name": "none"},
        "num_samples": trials, "max_concurrent": concurrency, "resources": {"cpu": 1, "gpu": 0},
        "max_failures": 0,
        "params": {**PARAMS_CONSTANT, "epochs": epochs, "depth": {"int": [2, 3]},
                   "sampling": {"choice": ["maxpool-upsample", "strided-transposed"]},
                   "output": {"choice": ["rgb", "uv"]}, "lr": {"loguniform": [3.0e-4, 3.0e-3]}},
    }, sort_keys=False)


PARAMS_CONSTANT = {"dataset": "samples", "base_filters": 8, "batch_size": 16, "train_limit": 16,
                   "eval_limit": 8, "preview_count": 1, "seed": 0}
