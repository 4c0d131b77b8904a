"""What Ray Tune saved of a study, read without building its Tuner: where it lies, whether it can resume,
its total of trials and whether this version reads its search state. The checks of ``--resume`` use it
before Ray starts; it imports Tune and the searcher, not the trainable or torch.
"""
from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class StateProblem:
    """Why Tune's restore could not read one of the study's saved files."""
    name: str             # the file, in the study folder
    why: str              # what it is and what is wrong with it
    damaged: bool         # cut short or damaged (else written by another version)
    older: str | None     # the file of its kind a restore would read without it (an earlier run's)


def saved_state_problem(study_root: str) -> StateProblem | None:
    """What keeps Tune's restore from reading the study's saved state, the newest file of each kind it reads;
    None when nothing does.

    Checked before Ray restores it: a searcher that fails to restore makes Tune start the study afresh, and
    the others stop the restore with a traceback. A file cut short is what a crash while it was copied
    into the study folder leaves (studies saved by versions that copied it in place); another version's
    file is one whose classes this version lacks."""
    alias_moved_modules()
    path, fs = experiment_path(study_root)
    for kind, pattern in ray_internals.saved_state_patterns().items():
        files = ray_internals.saved_files(path, fs, pattern)
        if not files:
            continue   # Tune saved none yet: its restore starts that part afresh, as it should
        (name, file), older = files[-1], (files[-2][0] if len(files) > 1 else None)
        problem = _unreadable(kind, fs, file)
        if problem is not None:
            return StateProblem(name, f"{_WHAT[kind]} {name}: {problem[0]}", problem[1], older)
    return None


def saved_state_refusal(study_root: str) -> str | None:
    """Why ``--resume`` refuses the study's saved state and what to do, after "the study at ROOT"; None: it reads."""
    problem = saved_state_problem(study_root)
    if problem is None:
        return None
    kept = f"nothing was changed: its results stay in {study_root}/results"
    if not problem.damaged:
        return (f"cannot be resumed by this version of the project: {problem.why}. It was most likely started by an "
                f"older version; resume it with that version, or start a new study with --name ({kept})")
    fix = (f"move it out of the study folder to resume from the state an earlier run saved ({problem.older})"
           if problem.older else "no earlier state is left, so start a new study with --name")
    return (f"cannot be resumed as it is: {problem.why}, most likely by a crash while it was saved. "
            f"{fix[0].upper()}{fix[1:]} ({kept} and its Optuna study in its database)")


_WHAT = {"experiment": "Tune's experiment state", "search": "Tune's search state", "searcher": "its search state"}


def _unreadable(kind: str, fs: pafs.FileSystem, file: str) -> tuple[str, bool] | None:
    """(why, damaged) when the saved file cannot be read; None when it can."""
    import pickle

    import ray.cloudpickle as cloudpickle

    from study.tune.searcher import load_state
    if kind == "experiment":   # JSON, as large as the study: its last bytes say whether it ends
        with fs.open_input_file(file) as f:
            size = f.size()
            f.seek(max(0, size - 64))
            whole = f.read().rstrip().endswith(b"}")
        return None if whole else ("it is cut short (it ends before its JSON does)", True)
    with fs.open_input_stream(file) as f:
        blob = f.read()
    try:
        if kind == "search":
            cloudpickle.loads(blob)
        else:
            load_state(blob)
    except Exception as e:  # noqa: BLE001 - unpickling fails in many ways (a class since removed, a cut file)
        cause = e.__cause__ if isinstance(e, ValueError) and e.__cause__ is not None else e
        if isinstance(cause, (EOFError, pickle.UnpicklingError)):
            state = "cut short" if isinstance(cause, EOFError) or "truncated" in str(cause) else "damaged"
            return f"it is {state} ({type(cause).__name__}: {cause})", True
        return (str(e) if isinstance(e, ValueError) else f"it cannot be read ({type(e).__name__}: {e})"), False
    return None
