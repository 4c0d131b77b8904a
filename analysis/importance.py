"""Hyperparameter importance from the study's Optuna storage.

Optional by design: optuna is imported only here and only when study.json
names a storage, so the rest of the analysis runs where optuna is missing.
"""
from __future__ import annotations

import sqlite3
import tempfile
import warnings
from contextlib import closing
from pathlib import Path

from study.urls import masked, scrub

SQLITE = "sqlite:///"
# Below this many completed trials the importances are withheld. Optuna's default evaluator (PED-ANOVA)
# compares the parameter values of the best 10% of completed trials with those of all, and takes at
# least 2 as that top set; under ten trials the "top 10%" is just the 2 best, and the ranking is noise
# (3 trials once ranked lr 0.97 and output 0.003 in a study whose output decided everything). Ten is a
# floor, not a guarantee (Optuna's docs prefer 5 trials in the top set, i.e. 50): the count is always
# printed with the importances.
MIN_COMPLETED = 10
STABLE_COMPLETED = 50   # 5 trials in the top 10%, as Optuna's PED-ANOVA documentation prefers


class ImportanceSkipped(Exception):
    """Importance cannot be computed for this study; the message says why."""


def param_importances(meta: dict, folder: Path, minimum: int = MIN_COMPLETED) -> tuple[dict[str, float], int]:
    """optuna.importance.get_param_importances of the study named in study.json, largest first, and the
    number of completed trials it rests on (at least ``minimum``, else ImportanceSkipped)."""
    url = meta.get("optuna_storage")
    if not url:
        raise ImportanceSkipped("study.json names no optuna_storage (the study ran without Optuna)")
    try:
        import optuna
    except ImportError:
        raise ImportanceSkipped("optuna is not installed") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = meta.get("optuna_study_name") or meta.get("name")
    with tempfile.TemporaryDirectory(prefix="analysis-optuna-") as tmp:
        study = _load(optuna, name, _snapshot(url, folder, Path(tmp)))
        completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(completed) < minimum:
            raise ImportanceSkipped(f"it would rest on {len(completed)} completed Optuna trial(s), and "
                                    f"under {minimum} the top 10% that Optuna's evaluator (PED-ANOVA) compares "
                                    "with all trials is just the 2 best, and its ranking is noise")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # experimental-feature notices are noise in a report
                # Several objectives (fidelity and vividness): the importance for the first, the PSNR gain;
                # optuna needs a target then.
                target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
                importances = optuna.importance.get_param_importances(study, target=target)
        except Exception as e:
            raise ImportanceSkipped(f"optuna could not compute importances ({type(e).__name__}: {e})") from None
    # Ties ordered by name so the table and the figure are the same on every run.
    ranked = dict(sorted(((k, float(v)) for k, v in importances.items()), key=lambda kv: (-kv[1], kv[0])))
    return ranked, len(completed)


def _load(optuna, name: str | None, url: str):
    try:
        return optuna.load_study(study_name=name, storage=url)
    except KeyError:
        raise ImportanceSkipped(f"the Optuna storage holds no study named {name!r}") from None
    except Exception as e:   # its message may quote the URL: every secret of it is hidden
        raise ImportanceSkipped(f"the Optuna storage {masked(url)} could not be opened "
                                f"({type(e).__name__}: {scrub(str(e), url)})") from None


def _snapshot(url: str, folder: Path, tmp: Path) -> str:
    """A private, consistent copy of an SQLite storage; other storages are read in place.

    Opening an RDB storage may write to it (schema set-up) and the study may
    still be running, so the analysis reads a copy made with SQLite's backup
    API. A relative path is relative to the study folder; an absolute one is of
    the machine that ran the study, so on a laptop that copied the folder the
    database is looked for beside study.json.
    """
    if not url.startswith(SQLITE):
        return url
    recorded = Path(url[len(SQLITE):].split("?", 1)[0])
    if not recorded.is_absolute():   # study.run records its own database relative to the study folder
        recorded = folder / recorded
    found = next((p for p in (recorded, folder / recorded.name) if p.is_file()), None)
    if found is None:
        raise ImportanceSkipped(f"the Optuna storage {recorded} is not there, nor is {recorded.name} beside study.json")
    copy = tmp / "optuna.db"
    try:
        with (closing(sqlite3.connect(f"{found.resolve().as_uri()}?mode=ro", uri=True)) as source,
              closing(sqlite3.connect(copy)) as target):
            source.backup(target)
    except sqlite3.Error as e:
        raise ImportanceSkipped(f"the Optuna storage {found.name} is unreadable ({e})") from None
    return f"{SQLITE}{copy}"
