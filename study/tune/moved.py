"""Where the modules of earlier versions live now, for the pickles their studies hold.

Ray pickles the study's searcher, scheduler and results callback (``tuner.pkl``,
``searcher-state-*.pkl`` and the search generator's state) by the module that defined each class when
the study started. Those modules have since moved into wings (study.config.modelspec then into
study.config.trial), and a few classes out of a module that stayed; a study started by an earlier
version resumes once its old names point at the new places.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "study.modelspec": "study.config.trial",
    "study.config.modelspec": "study.config.trial",
    "study.contract": "study.results.contract",
    "study.color": "study.engine.color",
    "study.metrics": "study.engine.metrics",
    "study.chroma": "study.engine.chroma",
    "study.models": "study.engine.models",
    "study.data": "study.engine.data",
    "study.device": "study.engine.device",
    "study.optim": "study.engine.optim",
    "study.losses": "study.engine.losses",
    "study.evaluation": "study.engine.evaluation",
    "study.fused": "study.engine.fused",
    "study.adversarial": "study.engine.adversarial",
    "study.checkpoints": "study.engine.checkpoints",
    "study.pack": "study.engine.pack",
    "study.train": "study.engine.trial",
    "study.plan_timing": "study.engine.timing",
    "study.space_options": "study.space.options",
    "study.space_yaml": "study.space.reading",
    "study.tune_progress": "study.driver.progress",
    "study.lock": "study.driver.lock",
    "study.stopping": "study.driver.stopping",
    "study.run_checks": "study.driver.checks",
    "study.tune_backend": "study.tune.backend",
    "study.tune_searcher": "study.tune.searcher",
    "study.tune_pruning": "study.tune.pruning",
    "study.tune_results": "study.tune.callback",
    "study.tune_trainable": "study.tune.trainable",
    "study.ray_internals": "study.tune.ray_internals",
}

# Classes that moved out of a module that still exists: (module, name) -> the module that holds it now.
MOVED_CLASSES = {
    ("study.tune.synthetic", "TimedPruningScheduler"): "study.tune.pruning",
    ("study.tune.synthetic", "DriverTimings"): "study.tune.timings",
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an earlier module name as the module that holds its classes now, when something (an
    unpickler) first imports it: only the modules a pickle names are imported (torch only for one that
    names the engine's)."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])   # the module itself, under its old name too

    def exec_module(self, module) -> None:
        pass   # it ran when it was imported by its own name


def alias_moved_modules() -> None:
    """Make each earlier module name importable as the module that holds its classes now (idempotent).

    ``study.config``, ``study.results``, ``study.engine`` and ``study.space`` kept their names as wings
    whose ``__init__`` exports the classes an earlier pickle names."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())   # after Python's own finders: a module that exists wins
    for (old, name), new in MOVED_CLASSES.items():
        module = importlib.import_module(old)
        if not hasattr(module, name):
            setattr(module, name, getattr(importlib.import_module(new), name))
