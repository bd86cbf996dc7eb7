"""Where `--data` rows come from: a JSONL file, a parquet file, a `datasets.save_to_disk` folder, or a
folder of JSONL/parquet shards.

Every source is turned into the same list of plain dicts that :func:`jpeft.train.data.load_jsonl` returns
(one of the three shapes, validated, one shape per source), so the same rows give bit-identical training
whatever file they came in. Parquet needs ``pyarrow`` and ``save_to_disk`` folders need ``datasets``; both
are the optional extra ``pip install 'jpeft[data]'``, imported only when such a source is given.

Arrow tables have one schema for all rows, so a column that a row does not use holds ``null``; those
top-level nulls are dropped before validation (a ``{"text": ..., "prompt": null}`` row is a ``text`` row).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jpeft.errors import DataError, MissingDependencyError
from jpeft.train.data import load_jsonl, validate_example

__all__ = ["load_examples", "DATA_HELP", "SHARD_SUFFIXES"]

#: File types a shard folder may hold (read in file-name order).
SHARD_SUFFIXES = (".jsonl", ".parquet")
#: Column sets of the three example shapes (any one is enough; extra columns are ignored).
_SHAPE_COLUMNS = ({"text"}, {"prompt", "completion"}, {"messages"})
#: Files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write.
_DATASET_MARKERS = ("state.json", "dataset_info.json")
_DATASET_DICT_MARKER = "dataset_dict.json"

DATA_HELP = ("examples as a .jsonl file, a .parquet file, a datasets.save_to_disk folder, or a folder of "
             ".jsonl/.parquet shards; rows are {text} | {prompt, completion} | {messages}")
_INSTALL = "pip install 'jpeft[data]'"


def _need(module: str, path: Path, what: str) -> Any:
    """Import an optional dependency or raise MissingDependencyError naming the file and the install command."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise MissingDependencyError(
            f"{path}: reading {what} needs the optional package '{module.split('.')[0]}', which is not "
            f"installed; fix: {_INSTALL} (or convert the data to JSONL)") from None


def _check_columns(path: Path, columns: Iterable[str]) -> None:
    """Fail on a table that has none of the shapes' columns, naming what it has and what is needed."""
    have = set(columns)
    if not any(need <= have for need in _SHAPE_COLUMNS):
        raise DataError(
            f"{path}: columns {sorted(have)} hold none of the example shapes; fix: name the columns 'text', "
            "or 'prompt' and 'completion', or 'messages' (a list of {role, content})")


def _rows_checked(path: Path, rows: list[dict]) -> list[dict]:
    """Drop top-level nulls, validate every row and insist on one shape (as `load_jsonl` does per line)."""
    out: list[dict] = []
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        row = {k: v for k, v in row.items() if v is not None}
        shape = validate_example(row, f"{path}: row {i}")
        first.setdefault(shape, i)
        if len(first) > 1:
            (s0, r0), (s1, r1) = sorted(first.items(), key=lambda kv: kv[1])[:2]
            raise DataError(f"{path}: row {r1}: mixed shapes: row {r0} is '{s0}' but row {r1} is '{s1}'; "
                            "fix: use a single shape per data set")
        out.append(row)
    if not out:
        raise DataError(f"{path}: no rows; fix: give at least one example")
    return out


def _read_parquet(path: Path) -> list[dict]:
    pq = _need("pyarrow.parquet", path, "parquet files")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e}); fix: rewrite it, e.g. "
                        "with pandas.DataFrame.to_parquet or datasets.Dataset.to_parquet") from None
    _check_columns(path, table.column_names)
    return _rows_checked(path, table.to_pylist())


def _read_saved_dataset(path: Path) -> list[dict]:
    if (path / _DATASET_DICT_MARKER).is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(f"{path}: a DatasetDict with splits {splits}; fix: pass one split's folder, e.g. "
                        f"--data {path / (splits[0] if splits else 'train')}")
    datasets = _need("datasets", path, "a datasets.save_to_disk folder")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: datasets.load_from_disk failed ({type(e).__name__}: {e}); fix: save it again "
                        "with Dataset.save_to_disk") from None
    _check_columns(path, ds.column_names)
    return _rows_checked(path, ds.to_list())


def _read_file(path: Path) -> list[dict]:
    return _read_parquet(path) if path.suffix == ".parquet" else load_jsonl(path)


def _read_shards(path: Path) -> list[dict]:
    named = sorted(p for p in path.iterdir() if p.suffix in SHARD_SUFFIXES)
    broken = [p for p in named if p.is_symlink() and not p.exists()]
    if broken:
        raise DataError(f"{broken[0]}: a shard that is a symlink to {os.readlink(broken[0])}, which does not exist"
                        f"{f' ({len(broken)} such shards)' if len(broken) > 1 else ''}; its rows would be missing: "
                        "fix the link or remove it from the folder")
    shards = [p for p in named if p.is_file()]
    if not shards:
        raise DataError(f"{path}: a folder with no {' or '.join(SHARD_SUFFIXES)} shards and no datasets "
                        "save_to_disk files (state.json); fix: point --data at a data file or such a folder")
    rows: list[dict] = []
    first_shape: tuple[str, Path] | None = None
    for shard in shards:
        part = _read_file(shard)
        shape = validate_example(part[0], f"{shard}: row 0")
        if first_shape is None:
            first_shape = (shape, shard)
        elif shape != first_shape[0]:
            raise DataError(f"{shard}: mixed shapes: {first_shape[1].name} is '{first_shape[0]}' but "
                            f"{shard.name} is '{shape}'; fix: use a single shape in all shards")
        rows.extend(part)
    return rows


def load_examples(path: str | Path) -> list[dict]:
    """The validated examples of a `--data` source (see the module docstring), in file/row order.

    Raises:
        DataError: the path is missing, a file is malformed, a table has none of the needed columns,
            or shapes are mixed (the message names the file, row or column and the fix).
        MissingDependencyError: a parquet file or datasets folder without ``pyarrow`` / ``datasets``.
    """
    path = Path(path)
    if path.is_dir():
        if any((path / m).is_file() for m in (*_DATASET_MARKERS, _DATASET_DICT_MARKER)):
            return _read_saved_dataset(path)
        return _read_shards(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; fix: check the path")
    return _read_file(path)
