"""What the driver running a study now knows (``DriverState``), handed to the searcher, the scheduler and the
results callback when they are made.

Ray pickles those three (``tuner.pkl``, world-readable): what it pickles holds none of this, since the
storage URL may hold a password, and where the study and its data are, and the space file, are those of
the driver that runs now (a copied study resumes in its new place; an edited space file is what new
trials are drawn from). On ``--resume`` Ray unpickles them without it: ``study.tune.backend`` hands it to
them in one place (``bind_restored``) before the study runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class DriverState:
    """The study's driver state: where things are, the space, the clock, and how this run is ending."""
    storage_url: str
    space: Any                      # study.space.Space
    study_root: str = ""
    data_root: str | None = None
    cache_dir: str | None = None
    cluster: bool = False
    decisions: Any = None           # the PackDecisions actor handle (packs only)
    total: int = 0                  # the study's trials (models), for progress
    clock: Any = None               # study.driver.StudyClock: running time and time budget
    budget_stopped: bool = False    # set when the time budget stopped the study
    structure: tuple[str, ...] = ()  # the parameters a pack's members share (study.engine.STRUCTURE)
    pid: int | None = None          # the process that stands for the driver (status.json); None: this one
    # (RDBStorage, optuna.Study) as the driver opened them, or a Future of them (a resumed study's, read on
    # a thread): the searcher uses them rather than read every trial of the study a second time (seconds in
    # a study of thousands of trials)
    optuna: Any = None


class UsesDriver:
    """An object Ray pickles that uses the driver state: it holds it in memory only, never in its pickle.

    Unpickled (``--resume``), it has none until ``bind`` gives it the driver's that runs now."""
    _driver: DriverState | None = None   # also what an unpickled object (of any version) starts with

    def bind(self, driver: DriverState) -> None:
        self._driver = driver

    @property
    def driver(self) -> DriverState:
        if self._driver is None:
            raise RuntimeError(f"{type(self).__name__} was used before it was given the study's driver state "
                               f"(study.tune.backend binds the ones Ray restores)")
        return self._driver

    def _pickled(self, state: dict) -> dict:
        """``state`` (an object's ``__dict__`` or a copy) as Ray may pickle it: without the driver state."""
        return {k: v for k, v in state.items() if k != "_driver"}
