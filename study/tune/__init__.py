"""The study's Ray layer: start or join Ray, build and resume the Tuner, the Optuna searcher (public
API only), pruning of trials and pack members, the trainable, the single writer of the results
(a Ray Tune callback), and every use of Ray's private internals in one module.
"""
from study.tune.searcher import METRIC

__all__ = ["METRIC"]
