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


class TrialsTable:
    """The trials table: ``put`` a changed row, ``get`` one, the whole ``table()`` or ``frame()`` now;
    ``written()`` once it is on disk."""

    def __init__(self, written: pa.Table | None):
        self._written = conform(written) if written is not None else None
        self._changed: dict[str, dict] = {}
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
        if trial_id in self._changed:
            return dict(self._changed[trial_id])
        if self._written is None:
            return None
        if self._index is None:
            self._index = {t: i for i, t in enumerate(self._written["trial_id"].to_pylist())}
        i = self._index.get(trial_id)
        return None if i is None else self._written.slice(i, 1).to_pylist()[0]

    def table(self) -> pa.Table | None:
        """The whole table now, sorted by trial id (None while it has no row)."""
        if self._table is None and (self._written is not None or self._changed):
            table = self._written
            if self._changed:
                new = rows_table(list(self._changed.values()))
                if table is not None:
                    ids = pa.array(list(self._changed), pa.string())
                    table = concat(table.filter(pc.invert(pc.is_in(table["trial_id"], value_set=ids))), new)
                else:
                    table = new
            self._table = table.sort_by("trial_id")
        return self._table

    def frame(self) -> pd.DataFrame | None:
        if self._frame is None and self.table() is not None:
            self._frame = coerce("trials", self.table().to_pandas())
        return None if self._frame is None else self._frame.copy()

    def written(self) -> None:
        """The table as it is now was written."""
        self._written, self._changed, self._index = self.table(), {}, None
