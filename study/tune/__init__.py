"""The study's Ray layer: start or join Ray, build and resume the Tuner, the Optuna searcher (public
API only), pruning of trials and pack members, the trainable, the single writer of the results
(a Ray Tune callback), and every use of Ray's private internals in one module.

Each public name is imported from its module on first use (PEP 562): a trial's worker, which unpickles
only the trainable, does not import the driver's searcher, callback and Optuna, and a command starts Ray
(``raystart``) while a thread imports the Tuner's parts and torch. Importing a name that needs Tune imports
Ray; the Tuner's parts import torch too.
"""
from importlib import import_module

# public name -> the module of study.tune that defines it
_HOME = {
    "StudySettings": "backend", "StudyTuner": "backend", "build_tuner": "backend", "open_optuna": "backend",
    "resumed_optuna": "backend",
    "OptunaRead": "preread",
    "can_resume": "saved", "saved_total_trials": "saved", "saved_state_refusal": "saved",
    "init_ray": "raystart", "node_resources": "raystart", "shutdown": "raystart",
    "ResultsCallback": "callback",
    "TimedPruningScheduler": "pruning",
    "METRIC": "keys", "STEP_METRIC": "keys",
    "OptunaSearcher": "searcher", "open_study": "searcher",
    "DriverState": "state",
    "synthetic_rows": "synthetic",
    "DriverTimings": "timings",
}

__all__ = ["DriverState", "DriverTimings", "METRIC", "OptunaRead", "OptunaSearcher", "ResultsCallback",
           "STEP_METRIC", "StudySettings", "StudyTuner", "TimedPruningScheduler", "build_tuner", "can_resume",
           "init_ray", "node_resources", "open_optuna", "open_study", "resumed_optuna", "saved_state_refusal",
           "saved_total_trials", "shutdown", "synthetic_rows"]   # the keys of _HOME


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'study.tune' has no attribute {name!r}")
    value = getattr(import_module(f"study.tune.{_HOME[name]}"), name)
    globals()[name] = value   # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
