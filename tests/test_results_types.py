"""The table rule: every column of every table has its contract type from the first write (in each file's
Arrow schema, and as pandas reads it, with and without the project), all-missing columns included; the
epochs and previews tables exist, empty, from the first write; and the README's column list is the
contract's."""
from __future__ import annotations

import itertools
import re
from dataclasses import fields

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import ROOT
from test_results_shape import check_shape

from study.config.trial import TrialConfig
from study.results import contract
from study.results.files import ARROW_TYPES
from study.results.store import ResultsWriter, epoch_row, read_table, trial_row

CONFIG = {**TrialConfig(dataset="samples").to_dict(), "resolution": 32}


def epoch(n: int, curves: bool = False) -> dict:
    row = {"epoch": n, "seconds": 1.0, "precision": "bf16", **{m: 20.0 + n for m in contract.EPOCH_METRICS}}
    return {**row, **({m: 1.0 for m in contract.CURVE_METRICS} if curves else {})}


def table_of(path) -> str:
    return next(name for name in contract.TABLES if f"/{name}.parquet" in str(path))


def check_files(study) -> int:
    """Every Parquet file under results/: the contract's columns in their Arrow types. Returns how many."""
    files = sorted((study / "results").rglob("*.parquet"))
    files = [f for f in files if f.is_file()]
    for f in files:
        name = table_of(f)
        arrow = pq.read_schema(f)
        want = {c: ARROW_TYPES[k] for c, k in contract.kinds(name).items() if c in arrow.names or
                c in contract.COLUMNS[name]}
        got = {c: arrow.field(c).type for c in want}
        assert got == want, (f, {c: (got[c], want[c]) for c in want if got[c] != want[c]})
    return len(files)


@pytest.mark.parametrize("first", ["trial", "epoch", "preview"])
def test_every_table_exists_with_its_typed_columns_from_the_first_write(tmp_path, first):
    w = ResultsWriter(str(tmp_path))
    if first == "trial":
        w.stage("trials", [trial_row("t1", CONFIG, "RUNNING", [])])   # no epoch, no error, no precision yet
    elif first == "epoch":
        w.add_epochs("t1", [epoch_row("t1", epoch(1))])
    else:
        w.add_previews([{"trial_id": "", "dataset": "samples", "resolution": 32, "epoch": 0, "image_index": 0,
                         "kind": "original", "png": b"png"}])
    assert check_files(tmp_path) >= 2
    for name in ("epochs", "previews") + (("trials",) if first == "trial" else ()):
        plain = pd.read_parquet(tmp_path / f"results/{name}.parquet")   # pandas alone, no project
        check_shape(name, plain)
        check_shape(name, read_table(str(tmp_path), name))
        if name != "trials":
            assert len(plain) == (name == first + "s")


def test_every_file_of_a_study_has_the_contracts_types_all_missing_columns_included(tmp_path):
    w = ResultsWriter(str(tmp_path), interval_s=0)
    w.stage("trials", [trial_row("t0", CONFIG, "RUNNING", [])])
    history = []
    for n in (1, 2, 3):
        history.append(epoch_row("t1", epoch(n, curves=n == 2)))
        w.add_epochs("t1", history[-1:])
        w.stage("trials", [trial_row("t1", CONFIG, "RUNNING", history, started_at=1.7e9, pack_id=4, pack_size=1)])
        w.flush()
    w.stage("trials", [trial_row("t1", CONFIG, "DONE", history), trial_row("t2", CONFIG, "ERROR", [], error="boom")])
    w.add_previews([{"trial_id": "t1", "dataset": "samples", "resolution": 32, "epoch": 2, "image_index": i,
                     "kind": "prediction", "png": b"png"} for i in range(2)])
    w.close()
    assert check_files(tmp_path) >= 4
    for name in contract.TABLES:
        check_shape(name, pd.read_parquet(tmp_path / f"results/{name}.parquet"))
        check_shape(name, read_table(str(tmp_path), name))
    trials = pq.read_table(tmp_path / "results/trials.parquet").to_pandas().set_index("trial_id")
    assert trials.error.fillna("-").to_dict() == {"t0": "-", "t1": "-", "t2": "boom"}
    assert trials.loc["t1", "precision_used"] == "bf16" and pd.isna(trials.loc["t0", "precision_used"])


def test_an_earlier_versions_all_null_columns_get_their_types_at_the_next_write(tmp_path):
    (tmp_path / "results").mkdir()
    old = pd.DataFrame([trial_row("t1", CONFIG, "DONE", [epoch(1)])])
    old["error"] = None   # written by pandas as Arrow's null type, as earlier versions did
    old.to_parquet(tmp_path / "results/trials.parquet")
    assert str(pq.read_schema(tmp_path / "results/trials.parquet").field("error").type) == "null"
    w = ResultsWriter(str(tmp_path))
    w.stage("trials", [trial_row("t2", CONFIG, "RUNNING", [])])
    w.close()
    check_files(tmp_path)
    check_shape("trials", pd.read_parquet(tmp_path / "results/trials.parquet"))


def test_the_config_columns_are_the_configs_own():
    config = {f.name for f in fields(TrialConfig)} | {"resolution"}
    row = trial_row("t", CONFIG, "RUNNING", [])
    assert config <= set(row) and not (config & set(contract.COLUMNS["trials"]))


def readme_columns() -> dict[str, set[str]]:
    """Each table's columns as README's Results section lists them ("Columns...:" in the table's item;
    ``{a,b}`` expands as a shell does)."""
    section = re.search(r"^## Results\n(.*?)^## ", (ROOT / "README.md").read_text(), re.S | re.M)[1]
    out = {}
    for item in re.split(r"^- ", section, flags=re.M)[1:]:
        item = item.split("\n\n")[0]
        name = re.match(r"`(\w+)`", item)[1]
        listed = re.search(r"Columns[^:]*:(.*)", item, re.S)
        assert listed, f"README: the {name} table's item has no Columns: list"
        out[name] = {expanded for word in re.findall(r"`([^`]+)`", listed[1]) for expanded in _braces(word)}
    return out


def _braces(word: str) -> list[str]:
    pieces = re.split(r"\{([^}]*)\}", word)
    options = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(pieces)]
    return ["".join(choice) for choice in itertools.product(*options)]


def test_the_readmes_column_list_is_the_contracts():
    listed = readme_columns()
    assert set(listed) == set(contract.TABLES)
    for name in contract.TABLES:
        want = set(contract.COLUMNS[name])
        assert listed[name] == want, (name, "README only:", sorted(listed[name] - want),
                                      "contract only:", sorted(want - listed[name]))
    assert _braces("{a,b}_x{1,2}") == ["a_x1", "a_x2", "b_x1", "b_x2"]
