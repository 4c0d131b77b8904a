"""The files of a study's results on a local disk or an object store: atomic writes, reads, listings, and
Parquet in the contract's types (``study.results.contract``).

Every Parquet file is written with an explicit Arrow schema (a column nobody has filled yet still has
its type: ``error`` is a string column, never Arrow's null type) and pandas' metadata, so
``pd.read_parquet`` gives the contract's pandas types (nullable ``Int64``) without the project.
"""
from __future__ import annotations

import functools
import io
import os
import re
import secrets
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from study.cli import ProjectError
from study.results.contract import COLUMNS, INTEGER_COLUMNS

ARROW_TYPES = {"str": pa.string(), "float": pa.float64(), "int": pa.int64(),
               "time": pa.timestamp("us", tz="UTC"), "bytes": pa.binary()}


class ResultsError(ProjectError, RuntimeError):
    """A study's results cannot be read or written; the message names the file and what to do."""
    exit_status = 2


class ResultsWriteError(ResultsError):
    # Raised mid-study: work was partly done (and kept), hence 1 rather than 2.
    exit_status = 1


class ResultsReadError(ResultsError):
    pass


def resolve(location: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local folder or a pyarrow URI such as s3://bucket/x; with ``filesystem``,
    the location is a path on it (a local one made absolute)."""
    location = str(location)
    if filesystem is not None:
        return filesystem, location if "://" in location else str(Path(location).resolve())
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def write_error(path: str, e: OSError, kept: str = "this file keeps its last good version") -> ResultsWriteError:
    parent = path.rsplit("/", 1)[0]
    return ResultsWriteError(
        f"cannot write {path}: {e.strerror or e}. The results written so far are kept ({kept}); free space or "
        f"make {parent} writable, then continue the study with --resume")


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes, make_parent: bool = True, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` at once: a reader sees the old bytes or the new, never part of them.
    ``make_parent=False``: its folder exists (or, on an object store, need not); ``sync=False``: on a disk,
    not flushed to it before the rename (a killed process still leaves it whole; a power loss may not)."""
    parent, base = path.rsplit("/", 1)
    try:
        if make_parent:
            fs.create_dir(parent, recursive=True)
        if is_local(fs):
            _write_local(parent, base, data, sync)
        else:  # An object store's PUT is atomic already.
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as e:
        raise write_error(path, e) from e


def _write_local(parent: str, base: str, data: bytes, sync: bool = True) -> None:
    # Written beside the target and renamed: readers never see a partial file. os.open with 0o666
    # lets the umask decide the mode (mkstemp would make it 0600: unreadable for the rest of a team).
    # The dot prefix hides the temporary from Parquet dataset readers.
    tmp = f"{parent}/.tmp-{secrets.token_hex(6)}-{base}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())  # a full disk shows here, before the old version is replaced
        os.replace(tmp, f"{parent}/{base}")
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:  # s3 raises OSError for a missing key in some versions
        if "does not exist" in str(e) or "NoSuchKey" in str(e) or "Path does not exist" in str(e):
            return None
        raise


def delete(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        if "does not exist" not in str(e) and "NoSuchKey" not in str(e):
            raise ResultsWriteError(f"cannot delete {path}: {e.strerror or e}; make its folder writable, then "
                                    f"continue the study with --resume") from e


def listing(fs: pafs.FileSystem, folder: str) -> dict[str, int]:
    """Name -> size of the files in ``folder`` (none when it does not exist)."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError as e:
        raise ResultsReadError(f"cannot list {folder}: {e.strerror or e}; it must be a folder of Parquet files "
                               f"(move away whatever is there)") from e
    return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}


def schema(name: str) -> pa.Schema:
    """The Arrow schema of a table whose columns are all the contract's (epochs, previews)."""
    return pa.schema([(col, ARROW_TYPES[kind]) for col, kind in COLUMNS[name].items()])


def parquet_bytes(name: str, table: pa.Table) -> bytes:
    """``table`` as Parquet, with pandas' metadata giving the contract's integer columns as ``Int64``."""
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(_pandas_metadata(name, table.schema.remove_metadata())), buf)
    return buf.getvalue()


@functools.lru_cache(maxsize=64)
def _pandas_metadata(name: str, arrow: pa.Schema) -> dict:
    empty = arrow.empty_table().to_pandas()
    for col in INTEGER_COLUMNS.get(name, ()):
        if col in empty:
            empty[col] = empty[col].astype("Int64")
    return pa.Schema.from_pandas(empty, preserve_index=False).metadata


def unreadable(path: str, e: Exception) -> ResultsReadError:
    # pyarrow names the in-memory buffer ('<Buffer>'), not the file: say which file it was.
    cause = re.sub(r"^.*'<Buffer>':\s*", "", str(e))
    return ResultsReadError(f"{path} is not a readable Parquet table ({cause}). Restore it from a copy, or move it "
                            f"aside to continue without the rows it held")


def read_parquet(fs: pafs.FileSystem, path: str, arrow: pa.Schema | None = None,
                 columns: list[str] | None = None) -> pa.Table | None:
    """One Parquet file (None when it is gone); with ``arrow``, a column the file lacks (written before the
    column existed) reads empty, and every column in the schema's type."""
    try:
        with fs.open_input_file(path) as f:   # random access: only the columns asked for are fetched
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            table = pf.read(columns=None if columns is None else [c for c in columns if c in names])
    except FileNotFoundError:
        return None
    except (pa.ArrowException, OSError) as e:
        if "does not exist" in str(e) or "NoSuchKey" in str(e):
            return None
        raise unreadable(path, e) from e
    if arrow is None:
        return table
    wanted = arrow if columns is None else pa.schema([arrow.field(c) for c in columns])
    cols = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
            for f in wanted]
    return pa.Table.from_arrays(cols, schema=wanted)
