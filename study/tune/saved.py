"""What Ray Tune saved of a study, read without building its Tuner: where it lies, whether it can resume,
its total of trials and whether this version reads its search state. The checks of ``--resume`` use it
before Ray starts; it imports Tune and the searcher, not the trainable or torch.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
from ray import tune

import study.tune.ray_internals as ray_internals
from study.results import resolve
from study.tune.moved import alias_moved_modules


def storage_args(study_root: str) -> tuple[str, pafs.FileSystem, str]:
    """(storage_path, filesystem, name) for Ray from the study location (local folder or URI)."""
    fs, path = resolve(study_root)
    parent, name = path.rstrip("/").rsplit("/", 1)
    return parent, fs, name


def experiment_path(study_root: str) -> tuple[str, pafs.FileSystem]:
    parent, fs, name = storage_args(study_root)
    return (str(Path(parent) / name) if isinstance(fs, pafs.LocalFileSystem) else f"{parent}/{name}"), fs


def saved_total_trials(study_root: str) -> int | None:
    path, fs = experiment_path(study_root)
    return ray_internals.saved_total_trials(path, fs)


def can_resume(study_root: str) -> bool:
    path, fs = experiment_path(study_root)
    return tune.Tuner.can_restore(path, storage_filesystem=fs)


def searcher_state_problem(study_root: str) -> str | None:
    """Why the study's saved search state cannot be resumed by this version (None: it can).

    Checked before Ray restores it: a searcher that fails to restore makes Tune start the study afresh."""
    from study.tune.searcher import load_state
    alias_moved_modules()
    path, fs = experiment_path(study_root)
    saved = ray_internals.newest_searcher_state(path, fs)
    if saved is None:
        return None   # Tune saved no search state yet: its restore starts the search afresh, as it should
    name, blob = saved
    try:
        load_state(blob)
    except ValueError as e:
        return f"its search state {name}: {e}"
    return None
