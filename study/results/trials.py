"""The trials table in the writer's memory: the table as last written (Arrow) plus the rows changed since.

A change costs one row's typing (``contract.coerce_row``, as the row comes); writing costs the changed
rows' Arrow arrays, a filter and a sort of the rest, and the Parquet encoding: nothing is rebuilt from
Python rows. The contract's columns have their types from the first write (``files.ARROW_TYPES``); a
configuration column takes the type of its values (an int column that meets a float becomes float; one
that meets text becomes text).
"""
from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from study.results.contract import COLUMNS, coerce, kinds
from study.results.files import ARROW_TYPES

KINDS = kinds("trials")


def _array(values: list, kind: str | None) -> pa.Array:
    if kind is not None:
        return pa.array(values, ARROW_TYPES[kind])
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):   # mixed values: kept as text
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def rows_table(rows: list[dict]) -> pa.Table:
    """Rows (in the contract's plain values) as a table: their columns in the order first seen, then the
    contract's columns they lack, empty and typed."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    names += [c for c in COLUMNS["trials"] if c not in names]
    return pa.table({name: _array([row.get(name) for row in rows], KINDS.get(name)) for name in names})


def concat(first: pa.Table, second: pa.Table) -> pa.Table:
    """Both tables' rows, columns unified (ints meeting floats become floats; clashing types become text)."""
    try:
        return pa.concat_tables([first, second], promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        clash = [f.name for f in first.schema if f.name in second.column_names
                 and second.schema.field(f.name).type != f.type]
        return pa.concat_tables([_as_text(first, clash), _as_text(second, clash)], promote_options="permissive")


def _as_text(table: pa.Table, names: list[str]) -> pa.Table:
    for name in names:
        values = table[name].to_pylist()
        table = table.set_column(table.column_names.index(name), name,
                                 pa.array([None if v is None else str(v) for v in values], pa.string()))
    return table


def conform(table: pa.Table) -> pa.Table:
    """A trials table of any version with every contract column in its type (an earlier version wrote an
    all-missing column, such as ``error``, with Arrow's null type)."""
    table = table.replace_schema_metadata(None)
    for name, kind in KINDS.items():
        want = ARROW_TYPES[kind]
        if name not in table.column_names:
            if name in COLUMNS["trials"]:
                table = table.append_column(pa.field(name, want), pa.nulls(len(table), want))
        elif table.schema.field(name).type != want:
            try:
                table = table.set_column(table.column_names.index(name), name, table[name].cast(want))
            except (pa.ArrowException, ValueError):   # not castable (a foreign file): left as it is
                pass
    return table


def combine(written: pa.Table | None, changed: dict[str, dict]) -> pa.Table | None:
    """The table ``written`` with the ``changed`` rows (by trial id) in place, sorted by trial id."""
    if not changed:
        return written
    new = rows_table(list(changed.values()))
    if written is not None:
        ids = pa.array(list(changed), pa.string())
        new = concat(written.filter(pc.invert(pc.is_in(written["trial_id"], value_set=ids))), new)
    return new.sort_by("trial_id")


class TrialsTable:
    """The trials table: ``put`` a changed row, ``get`` one, the whole ``table()`` or ``frame()`` now.
    ``take()`` hands the changes to a write (made with ``combine``, possibly in another thread); until
    ``written()`` gets its table they stay visible here."""

    def __init__(self, written: pa.Table | None):
        self._written = conform(written) if written is not None else None
        self._changed: dict[str, dict] = {}
        self._writing: dict[str, dict] = {}   # taken by a write not yet done
        self._table: pa.Table | None = None   # the whole table now, built on demand
        self._frame: pd.DataFrame | None = None
        self._index: dict[str, int] | None = None

    @property
    def dirty(self) -> bool:
        return bool(self._changed)

    def put(self, row: dict) -> None:
        self._changed[row["trial_id"]] = row
        self._table = self._frame = None

    def get(self, trial_id: str) -> dict | None:
        for rows in (self._changed, self._writing):
            if trial_id in rows:
                return dict(rows[trial_id])
        if self._written is None:
            return None
        if self._index is None:
            self._index = {t: i for i, t in enumerate(self._written["trial_id"].to_pylist())}
        i = self._index.get(trial_id)
        return None if i is None else self._written.slice(i, 1).to_pylist()[0]

    def table(self) -> pa.Table | None:
        """The whole table now, sorted by trial id (None while it has no row)."""
        if self._table is None:
            self._table = combine(self._written, {**self._writing, **self._changed})
        return self._table

    def frame(self) -> pd.DataFrame | None:
        if self._frame is None and self.table() is not None:
            self._frame = coerce("trials", self.table().to_pandas())
        return None if self._frame is None else self._frame.copy()

    def take(self) -> tuple[pa.Table | None, dict[str, dict]] | None:
        """(the table as last written, the rows changed since) for a write; None when nothing changed."""
        if not self._changed:
            return None
        self._writing, self._changed = self._changed, {}
        return self._written, self._writing

    def written(self, table: pa.Table | None, ok: bool = True) -> None:
        """The write of the last ``take`` is done (``table``: what it wrote); not ``ok``: it failed, and its
        changes wait for the next."""
        if ok and table is not None:
            self._written, self._index = table, None
        elif not ok:
            self._changed = {**self._writing, **self._changed}
        self._writing = {}
