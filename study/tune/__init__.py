"""The study's Ray layer: start or join Ray, build and resume the Tuner, the Optuna searcher (public
API only), pruning of trials and pack members, the trainable, the single writer of the results
(a Ray Tune callback), and every use of Ray's private internals in one module.

Importing it imports Ray (and torch, through the trainable): commands import it where they start Ray.
"""
from study.tune.backend import (
                                StudySettings,
                                StudyTuner,
                                build_tuner,
                                can_resume,
                                init_ray,
                                node_resources,
                                open_optuna,
                                saved_total_trials,
                                searcher_state_problem,
                                shutdown,
)
from study.tune.callback import ResultsCallback
from study.tune.pruning import TimedPruningScheduler
from study.tune.searcher import METRIC, STEP_METRIC, OptunaSearcher, open_study
from study.tune.state import DriverState
from study.tune.synthetic import synthetic_rows
from study.tune.timings import DriverTimings

__all__ = ["METRIC", "STEP_METRIC", "DriverState", "DriverTimings", "OptunaSearcher", "ResultsCallback",
           "StudySettings", "StudyTuner", "TimedPruningScheduler", "build_tuner", "can_resume", "init_ray",
           "node_resources", "open_optuna", "open_study", "saved_total_trials", "searcher_state_problem", "shutdown",
           "synthetic_rows"]
