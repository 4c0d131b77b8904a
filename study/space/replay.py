"""A space's ``synthetic`` key (``{epoch_seconds: s}``: generated curves; ``{replay: <table.parquet>}``:
trials that replay recorded learning curves) and the curves tables a replay reads.

The table is one ``scripts/record_curves.py`` wrote: one row per (``config_id``, ``epoch``) with the
configuration's values and the epoch's figures, and the space it was drawn from in its Parquet metadata
(key ``curves``). A trial's configuration maps to its *nearest recorded configuration* on that space's
axes: 1 per categorical axis that differs, plus ``|t(a) - t(b)| / (t(hi) - t(lo))`` per continuous one
(t = log for a log-uniform axis); ties go to the smaller ``config_id``. ``analysis.replay`` maps a
sampler's proposals by the same rule (tests/test_replay_study.py holds the two to the same answers).
No torch, no Ray.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

META_KEY = b"curves"
CONTINUOUS = ("loguniform", "uniform")
NEEDED = ("config_id", "epoch", "val_psnr", "seconds")


class ReplayTableError(ValueError):
    """Not a curves table a replay can read; the message says what is wrong."""


def read_curves(path: str | Path):
    """The table's rows (pandas, sorted by config_id and epoch) and its space (``{name: [choices] or
    ["loguniform", lo, hi]}``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        space = json.loads((table.schema.metadata or {})[META_KEY])["space"]
    except (OSError, pa.ArrowException, KeyError, ValueError, TypeError) as e:
        raise ReplayTableError(f"{path} is not a curves table scripts/record_curves.py wrote "
                               f"({type(e).__name__}: {e})") from None
    rows = table.to_pandas()
    missing = [c for c in (*NEEDED, *space) if c not in rows.columns]
    if missing or rows.empty or not isinstance(space, dict) or not space:
        raise ReplayTableError(f"{path}: a curves table needs rows, a space and the columns {missing or list(NEEDED)}")
    return rows.sort_values(["config_id", "epoch"], kind="stable").reset_index(drop=True), space


def _coordinate(spec, v: float) -> float:
    t = math.log if spec[0] == "loguniform" else float
    return (t(float(v)) - t(float(spec[1]))) / (t(float(spec[2])) - t(float(spec[1])))


def distance(space: dict, a: dict, b: dict) -> float:
    """How far configuration ``a`` is from ``b`` on the space's axes (see the module's docstring)."""
    out = 0.0
    for name, spec in space.items():
        if isinstance(spec, list) and len(spec) == 3 and spec[0] in CONTINUOUS:
            out += abs(_coordinate(spec, a[name]) - _coordinate(spec, b[name]))
        else:
            out += float(a[name] != b[name])
    return out


def nearest_rows(rows, space: dict, values: dict):
    """The rows of the recorded configuration nearest to ``values`` (a mapping with the space's names)."""
    firsts = rows.drop_duplicates("config_id")
    configs = firsts[list(space)].to_dict("records")
    scores = [distance(space, values, c) for c in configs]
    best = firsts["config_id"].iloc[min(range(len(scores)), key=lambda i: (scores[i], i))]
    return rows[rows["config_id"] == best]


# The longest a synthetic epoch may pretend to take (an hour): a benchmark of the driver, not a wait.
MAX_SYNTHETIC_EPOCH_S = 3600.0


def parse_synthetic(spec, fail) -> dict | None:
    """``synthetic: {epoch_seconds: s}``: trials report generated epoch curves every ``s`` seconds instead
    of training (study.tune.synthetic), to measure the driver itself. ``synthetic: {replay: <table>}``
    (``epoch_seconds`` optional, default 0): trials report the recorded epochs of their nearest
    configuration in a curves table (``nearest_rows``), each with its recorded ``seconds``; a relative
    path is taken from the current folder and stored absolute."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or not spec or set(spec) - {"epoch_seconds", "replay"} or (
            "replay" not in spec and "epoch_seconds" not in spec):
        fail("synthetic", f"a mapping with 'epoch_seconds' (e.g. {{epoch_seconds: 0.01}}) or 'replay' (a curves "
                          f"table: {{replay: docs/search/cifar10-curves.parquet}}), got {spec!r}")
    s = spec.get("epoch_seconds", 0.0)
    if not _seconds(s):
        fail("synthetic.epoch_seconds", f"a number of seconds from 0 to {MAX_SYNTHETIC_EPOCH_S:g}, got {s!r}")
    out = {"epoch_seconds": float(s)}
    if "replay" in spec:
        out["replay"] = _replay_table(spec["replay"], fail)
    return out


def _replay_table(value, fail) -> str:
    """The curves table a replay reads: it must exist and be one (read now, before a study folder exists)."""
    if not isinstance(value, str) or not value.endswith(".parquet"):
        fail("synthetic.replay", f"the path of a curves table (.parquet) scripts/record_curves.py wrote, got {value!r}")
    path = Path(value).absolute()
    if not path.is_file():
        fail("synthetic.replay", f"{value}: no such file (a relative path is taken from the current folder)")
    try:
        read_curves(path)
    except ReplayTableError as e:
        fail("synthetic.replay", str(e))
    return str(path)


def _seconds(s) -> bool:
    return (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
            and 0 <= s <= MAX_SYNTHETIC_EPOCH_S)
