"""The tables' shape is the contract's (study.results.contract.COLUMNS) from their first write, with what each
epoch computed in (precision) and each trial's precision_used. A real Ray study's tables are checked
with ``check_shape`` by tests/test_study.py::test_smoke_study_end_to_end."""
from dataclasses import fields

import pandas as pd

from study.config.trial import TrialConfig
from study.results import contract
from study.results.store import ResultsWriter, epoch_row, read_table, trial_row


def kind_of(series: pd.Series) -> str:
    dt = series.dtype
    if isinstance(dt, pd.DatetimeTZDtype):
        return "time"
    if isinstance(dt, pd.Int64Dtype):
        return "int"
    if pd.api.types.is_float_dtype(dt):
        return "float"
    values = series.dropna()
    if len(values) and isinstance(values.iloc[0], bytes):
        return "bytes"
    return "str" if dt == object or pd.api.types.is_string_dtype(dt) else str(dt)


CONFIG_COLUMNS = {f.name for f in fields(TrialConfig)} | {"resolution"}


def check_shape(name: str, df: pd.DataFrame) -> None:
    want = contract.COLUMNS[name]
    extra = set(df.columns) - set(want) - (CONFIG_COLUMNS if name == "trials" else set())
    assert not extra, f"{name}: columns outside the contract: {sorted(extra)}"
    missing = set(want) - set(df.columns)
    assert not missing, f"{name}: contract columns missing: {sorted(missing)}"
    wrong = {c: (kind_of(df[c]), k) for c, k in want.items() if kind_of(df[c]) != k and df[c].notna().any()}
    assert not wrong, f"{name}: (got, contract) kinds differ: {wrong}"
    for c, k in want.items():   # an all-missing column still has the contract's dtype where it has one
        if k in ("int", "time", "float"):
            assert kind_of(df[c]) == k, (name, c, df[c].dtype)


def test_tables_have_every_contract_column_from_their_first_write(tmp_path):
    cfg = TrialConfig(dataset="samples", resolution=32)
    config = {**cfg.to_dict(), "resolution": cfg.image_size}
    writer = ResultsWriter(str(tmp_path))
    writer.upsert("trials", [trial_row("t1", config, "RUNNING", [])])   # before its first epoch
    trials = read_table(str(tmp_path), "trials")
    check_shape("trials", trials)
    assert trials.best_val_psnr.isna().all() and trials.best_epoch.isna().all()
    row = {"epoch": 1, "seconds": 1.0, "precision": "fp32", **{m: 20.0 for m in contract.EPOCH_METRICS}}
    writer.add_epochs("t1", [epoch_row("t1", row)])
    epochs = read_table(str(tmp_path), "epochs")
    check_shape("epochs", epochs)
    assert epochs.precision.tolist() == ["fp32"]


def test_missing_epoch_files_are_found():
    from study.driver.checks import missing_epochs

    trials = pd.DataFrame({"trial_id": ["a", "b", "c"], "epochs_run": pd.array([3, 2, None], dtype="Int64")})
    epochs = pd.DataFrame({"trial_id": ["a", "a", "b", "b"], "epoch": [1, 3, 1, 2]})
    assert missing_epochs(trials, epochs) == {"a": [2]}
    assert missing_epochs(trials, epochs.iloc[:1]) == {"a": [2, 3], "b": [1, 2]}



def _missing_one_by_one(trials, epochs) -> dict[str, list[int]]:
    """The rule itself, trial by trial: every epoch from 1 to the larger of what the row says it ran and the
    trial's highest epoch that the epochs table lacks."""
    have = {} if epochs is None else epochs.groupby("trial_id")["epoch"].apply(set).to_dict()
    out = {}
    for row in trials.itertuples():
        got = have.get(row.trial_id, set())
        last = max([0 if pd.isna(row.epochs_run) else int(row.epochs_run), *got])
        gone = [e for e in range(1, last + 1) if e not in got]
        if gone:
            out[row.trial_id] = gone
    return out


def test_missing_epochs_agree_with_the_rule_over_random_studies():
    import random

    from study.driver.checks import missing_epochs

    rng = random.Random(7)
    for case in range(200):
        ids = [f"t{i}" for i in range(rng.randint(1, 12))]
        ran = [rng.choice([None, 0, 1, 2, 3, 5]) for _ in ids]
        trials = pd.DataFrame({"trial_id": ids, "epochs_run": pd.array(ran, dtype="Int64")})
        # rows with gaps, repeats, epochs past what the row says, the -1 of an error report, other trials' rows
        rows = [(rng.choice(ids + ["stray"]), rng.choice([-1, 1, 1, 2, 3, 4, 6])) for _ in range(rng.randint(0, 30))]
        epochs = pd.DataFrame(rows, columns=["trial_id", "epoch"]) if rows or rng.random() < 0.5 else None
        if epochs is not None:
            epochs = epochs.astype({"epoch": "int64"})
        want = _missing_one_by_one(trials, None if epochs is None else epochs[epochs.epoch >= 1])
        assert missing_epochs(trials, epochs) == want, (case, trials, epochs)
