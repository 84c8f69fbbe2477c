"""Fine-tuning data: labelled text tables from csv/tsv/jsonl/parquet or a saved ``datasets`` dir.

Every row keeps where it came from (``file:line N`` for csv/tsv/jsonl, the physical line
its record starts on; ``file: row N`` for parquet and saved datasets), so that a bad cell
is reported by file and line: a byte that is not UTF-8, a missing column (or jsonl key),
an empty file, a blank label, a label in validation/test that train never saw, a
regression target that is not a number. Nothing is dropped silently: ``--drop-label``
rows (``--drop-label ""``: the blank ones) are counted per split.

Splits come from ``--train/--validation/--test`` files, from a saved ``DatasetDict``'s
splits (by name, or those ``--validation-split/--test-split`` name), or, for what is missing, from a seeded stratified split of the training rows
(per class for classification, per target quantile for regression), so that the same
file and seed give the same split on any machine and any number of processes.
"""

from __future__ import annotations

import bz2
import collections
import csv
import dataclasses
import gzip
import json
import logging
import lzma
import math
import os
import re
import zlib
from collections.abc import Sequence

import numpy as np

from pipeline.engine import EngineConfig
from pipeline.finetuning.config import FinetuneConfig, prediction_name

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")


def _zstd_open(path: str, mode: str, **text):
    """A .zst file as text, frame after frame, a cut one an EOFError (preprocessing's reader)."""
    import io

    from preprocessing.zstd_reader import ZstdReader

    return io.TextIOWrapper(io.BufferedReader(ZstdReader(open(path, "rb"), close_raw=True)), **text)


_OPENERS = {".bz2": bz2.open, ".gz": gzip.open, ".xz": lzma.open, ".zst": _zstd_open}


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a truncated or corrupt compressed file (or one named as one that is not) raises."""
    import zstandard

    return (EOFError, OSError, lzma.LZMAError, zlib.error, zstandard.ZstdError)


class FinetuneDataError(ValueError):
    """Data that cannot be used; the message names the file and the line or row."""


class _NoKey:
    """The cell of a jsonl row that lacks a key other rows have; told apart from null, a blank cell."""

    def __repr__(self) -> str:
        return "(no key)"


_NO_KEY = _NoKey()


@dataclasses.dataclass
class Table:
    """Rows of one source: ``columns[name][i]`` is row i's cell, ``where[i]`` says where it was read."""

    source: str
    columns: dict[str, list]
    where: list[str]
    class_names: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # a ClassLabel's, in id order

    def __len__(self) -> int:
        return len(self.where)

    def take(self, indices: Sequence[int], source: str | None = None) -> Table:
        return Table(source or self.source, {k: [v[i] for i in indices] for k, v in self.columns.items()},
                     [self.where[i] for i in indices], self.class_names)


@dataclasses.dataclass
class Examples:
    """One split, ready to tokenize: texts, optional pair texts, labels (ids or floats)."""

    texts: list[str]
    pairs: list[str] | None
    labels: np.ndarray
    where: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, rows: np.ndarray) -> Examples:
        return Examples([self.texts[i] for i in rows], [self.pairs[i] for i in rows] if self.pairs else None,
                        self.labels[rows], [self.where[i] for i in rows])


@dataclasses.dataclass
class TaskData:
    task: str  # "classification" | "regression"
    labels: list[str]  # classification: id → label, sorted; regression: []
    splits: dict[str, Examples]
    dropped: dict[str, int]  # rows skipped by --drop-label, per split
    split_from: dict[str, str]  # per split: the file it was read from, or "train (seeded split)"
    # A ClassLabel's classes that train has no row of (dropped, or absent): the model's ids then
    # skip them, and differ from the ClassLabel's own (what --predict-as id must not claim).
    classes_left_out: list[str] = dataclasses.field(default_factory=list)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


# ---------------------------------------------------------------------------- reading files
def _format_of(path: str) -> tuple[str, str | None]:
    """(format, compression) from the file name: data.csv.bz2 → ("csv", ".bz2")."""
    root, ext = os.path.splitext(path.lower())
    compression = None
    if ext in _OPENERS:
        compression, (root, ext) = ext, os.path.splitext(root)
    formats = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
    if ext not in formats:
        raise FinetuneDataError(f"{path}: unknown format {ext or '(no extension)'!r}: use .csv, .tsv or .jsonl "
                                "(optionally .gz/.bz2/.xz/.zst), .parquet, or a datasets.save_to_disk dir")
    if formats[ext] == "parquet" and compression:  # Parquet compresses inside the file
        raise FinetuneDataError(f"{path}: a compressed .parquet file is not read: Parquet compresses its own "
                                "columns; decompress it")
    return formats[ext], compression


def _open_text(path: str, compression: str | None):
    # utf-8-sig: a byte-order mark (Excel, Notepad) is not part of the first column's name.
    # surrogateescape: a bad byte decodes to a marker instead of failing the whole chunk being
    # read, so that _utf8_lines can name the line it is on.
    opener = _OPENERS.get(compression, open)
    return opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="")


def _utf8_lines(path: str, f):
    """The physical lines of ``f``; the first one holding a byte that is not UTF-8 stops the read."""
    for line_no, line in enumerate(f, 1):
        if not line.isascii():
            try:
                line.encode("utf-8")  # only surrogateescape's markers (U+DC80..U+DCFF) fail
            except UnicodeEncodeError as err:
                byte = ord(line[err.start]) - 0xDC00  # the marker of byte b is U+DC00 + b
                raise FinetuneDataError(f"{path}:{line_no}: not valid UTF-8 (byte 0x{byte:02x} at column "
                                        f"{err.start + 1}); save the file as UTF-8") from None
        yield line


def _delimited_rows(path: str, compression: str | None, delimiter: str):
    """Yields the header (a list of names), then (cells, where) for each row, checked."""
    csv.field_size_limit(1 << 24)
    with _open_text(path, compression) as f:
        # fed physical lines, the reader's line_num counts them, not records. A tab-separated
        # file's cells are taken as they are, quotes included (GLUE's TSVs, which Hugging Face
        # reads with QUOTE_NONE too): under csv's quoting, a sentence that starts with a quote
        # would lose its quotes, or swallow the lines after it up to the next one.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        # strict: csv's default reads a quote never closed as one cell holding every line after it,
        # and the rows in them were lost without a word.
        reader = csv.reader(_utf8_lines(path, f), delimiter=delimiter, quoting=quoting, strict=True)
        try:
            header = next(reader)
        except StopIteration:
            raise FinetuneDataError(f"{path}: the file is empty (no header line, no rows)") from None
        except csv.Error as err:
            raise FinetuneDataError(f"{path}:1: cannot read the header: {_csv_problem(err)}") from None
        if not header:
            raise FinetuneDataError(f"{path}:1: the first line is blank; the header (the column names) must be "
                                    "the first line")
        if len(header) == 1 and delimiter != "\t":
            # else "no column 'text' (columns: text;label)": the column seems to be there
            for mark, name, fix in (("\t", "tabs", "name the file .tsv"),
                                    (";", "semicolons", "save it with commas as the separator")):
                if mark in header[0]:
                    raise FinetuneDataError(f"{path}:1: the header is one column, {header[0]!r}: the file looks "
                                            f"separated by {name}, not commas; {fix}")
        # (unnamed columns, as a spreadsheet's trailing empty ones, may repeat: nothing reads them)
        repeated = sorted({name for name in header if name.strip() and header.count(name) > 1})
        if repeated:  # the cells of two columns of one name would interleave under it
            raise FinetuneDataError(f"{path}:1: the header names column{'s' if len(repeated) > 1 else ''} "
                                    f"{', '.join(map(repr, repeated))} more than once; rename them")
        yield header
        while True:
            start = reader.line_num + 1  # a quoted cell may span lines: report where the row starts
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise FinetuneDataError(f"{path}:{start}: {_csv_problem(err)}") from None
            if not row:
                continue  # a blank line is no row (csv's own convention)
            if len(row) != len(header):
                hint = ("; a .tsv cell holding a tab or a line break needs csv quoting: save the file as .csv"
                        if quoting == csv.QUOTE_NONE else "")
                raise FinetuneDataError(f"{path}:{start}: {len(row)} fields, but the header has {len(header)} "
                                        f"({', '.join(header)}){hint}")
            if quoting == csv.QUOTE_NONE:
                _refuse_csv_quoting(path, start, row)
            yield row, f"{path}:{start}"


def _csv_problem(err: csv.Error) -> str:
    """csv's error in words that say what to fix in the file."""
    if "unexpected end of data" in str(err):
        return f"a quote opened in this row is never closed ({err})"
    if "expected after" in str(err):
        return (f"a quoted cell has more after its closing quote ({err}); a quote inside a quoted cell is "
                "written twice (\"\"), so a cell that begins with a quotation is quoted whole")
    return str(err)


def _read_delimited(path: str, compression: str | None, delimiter: str) -> Table:
    rows = _delimited_rows(path, compression, delimiter)
    header = next(rows)
    columns: dict[str, list] = {name: [] for name in header}
    where = []
    for cells, at in rows:
        for name, cell in zip(header, cells):
            columns[name].append(cell)
        where.append(at)
    return Table(path, columns, where)


def _refuse_csv_quoting(path: str, line: int, row: list[str]) -> None:
    """A .tsv written with csv quoting (pandas' ``to_csv(sep="\\t")``, Python's csv module) wraps a
    cell holding a quote in quotes and doubles it: read as it is, the text would keep them all."""
    for cell in row:
        if len(cell) > 2 and cell[0] == cell[-1] == '"' and '""' in cell[1:-1]:
            raise FinetuneDataError(f"{path}:{line}: the cell {cell[:40]!r}{'…' if len(cell) > 40 else ''} looks "
                                    "csv-quoted, but .tsv cells are read as they are (GLUE's convention): save a "
                                    "file written with csv quoting (pandas' to_csv) as .csv or .jsonl")


def _jsonl_rows(path: str, compression: str | None):
    """(object, where) for each line holding one."""
    with _open_text(path, compression) as f:
        for line_no, line in enumerate(_utf8_lines(path, f), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                hint = ("; a JSON array is not read: write one JSON object per line (JSON Lines)"
                        if line_no == 1 and line.lstrip().startswith("[") else "")
                raise FinetuneDataError(f"{path}:{line_no}: not valid JSON ({err.msg}){hint}") from None
            if not isinstance(row, dict):
                hint = "; a JSON array is not read: write one JSON object per line (JSON Lines)" if line_no == 1 else ""
                raise FinetuneDataError(f"{path}:{line_no}: a JSON object per line is expected, got "
                                        f"{type(row).__name__}{hint}")
            yield row, f"{path}:{line_no}"


def _read_jsonl(path: str, compression: str | None) -> Table:
    rows, where = [], []
    for row, at in _jsonl_rows(path, compression):
        rows.append(row)
        where.append(at)
    if len(rows) == 1 and len(rows[0]) > 1 and all(isinstance(v, dict) for v in rows[0].values()):
        raise FinetuneDataError(f"{path}: one JSON object of columns (pandas' to_json default), not one object a "
                                "row: write JSON Lines, e.g. df.to_json(path, orient='records', lines=True)")
    names = list(dict.fromkeys(k for row in rows for k in row))
    return Table(path, {n: [row.get(n, _NO_KEY) for row in rows] for n in names}, where)


def _read_parquet(path: str) -> Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise FinetuneDataError(f"{path}: not a readable Parquet file ({err})") from None
    where = [f"{path}: row {i + 1}" for i in range(table.num_rows)]
    columns = table.to_pydict()
    for field in table.schema:
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            # strings written without Parquet's UTF8 annotation (Spark, Hive): their Python spelling
            # ("b'pos'") would be trained on
            columns[field.name] = [_utf8(value) for value in columns[field.name]]
    return Table(path, columns, where)


def _utf8(value: bytes | None) -> str | bytes | None:
    """A binary cell as text where it is UTF-8; other bytes (a hash, an embedding) stay bytes,
    refused only where read as a text or a label (as_text, _check_scalar_labels)."""
    try:
        return None if value is None else value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def _not_utf8(value: bytes, where: str, column: str) -> FinetuneDataError:
    try:
        value.decode("utf-8")
        reason = "binary"
    except UnicodeDecodeError as err:
        reason = f"byte {err.start}: {err.reason}"
    return FinetuneDataError(f"{where}: column {column!r} is binary and not UTF-8 text ({reason})")


def _class_names(feature, values: list) -> list:
    """A ClassLabel column's names, not its ids, so that the model's id2label says "positive"; -1
    is the datasets convention for an unlabelled row (GLUE's test splits): blank."""
    return [None if value is None or value < 0 else feature.int2str(value) for value in values]


def _dataset_table(dataset, source: str) -> Table:
    import datasets

    columns, class_names = dataset.to_dict(), {}
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.ClassLabel):
            # The labels kept in the dataset's id order (f1_binary scores id 1: GLUE's positive
            # class in MRPC, QQP).
            columns[name] = _class_names(feature, columns[name])
            class_names[name] = list(feature.names)
    return Table(source, columns, [f"{source}: row {i + 1}" for i in range(len(dataset))], class_names)


def check_input_path(path: str) -> None:
    """A path that exists and is a file or a saved dataset's folder; a pipe would block the run
    for ever, read before it is written (and it is read more than once)."""
    if not os.path.exists(path):
        raise FinetuneDataError(f"{path}: no such file or directory")
    if not (os.path.isdir(path) or os.path.isfile(path)):
        raise FinetuneDataError(f"{path}: not a regular file (a pipe, socket or device): save the rows to a file "
                                "first")


def read_table(path: str) -> Table:
    check_input_path(path)
    if os.path.isdir(path):
        tables = read_saved_dataset(path)
        if list(tables) != ["train"]:
            raise FinetuneDataError(f"{path}: a saved DatasetDict with splits {', '.join(tables)}: pass it as "
                                    "--data, not as one split's file")
        return tables["train"]
    fmt, compression = _format_of(path)
    if fmt == "parquet":
        return _read_parquet(path)
    try:
        if fmt == "jsonl":
            return _read_jsonl(path, compression)
        return _read_delimited(path, compression, "," if fmt == "csv" else "\t")
    except _read_errors() as err:
        # a truncated or corrupt .gz/.bz2/.xz/.zst, or a file whose name says it is one and is not
        what = f"a readable {compression} file" if compression else "readable"
        raise FinetuneDataError(f"{path}: not {what} ({err})") from None


def _load_saved(path: str):
    import datasets

    try:
        return datasets.load_from_disk(path)
    except FileNotFoundError as err:
        raise FinetuneDataError(f"{path}: not a datasets.save_to_disk dir ({err})") from None


_SPLIT_ALIASES = {"dev": "validation", "valid": "validation", "val": "validation"}


def _split_roles(path: str, loaded, validation_split: str | None, test_split: str | None) -> dict[str, str]:
    """Which split of a saved ``DatasetDict`` plays which role: {"train": "train", "validation":
    "validation_matched", …}. A split the flags do not name plays the role its name says (dev is
    validation); with no flag given, a split that plays none is refused (MNLI's five splits need
    the flags), since dropping it silently could drop the one meant for testing. A saved
    ``Dataset`` (no splits) is {"train": ""}."""
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        if validation_split or test_split:
            raise FinetuneDataError(f"--{'validation' if validation_split else 'test'}-split: {path} is one "
                                    "Dataset, without splits to name")
        return {"train": ""}
    roles = {role: name for role, name in (("validation", validation_split), ("test", test_split)) if name}
    for role, name in roles.items():
        if name not in loaded:
            raise FinetuneDataError(f"--{role}-split {name}: {path} has no such split (splits: {', '.join(loaded)})")
    named = dict(roles)
    for name in loaded:
        role = _SPLIT_ALIASES.get(name, name)
        if role not in SPLITS or role in named or name in roles.values():
            continue
        if role in roles:
            raise FinetuneDataError(f"{path}: splits {roles[role]!r} and {name!r} would both be the {role} split; "
                                    f"name the one to use with --{role}-split")
        roles[role] = name
    if "train" not in roles:
        raise FinetuneDataError(f"{path}: the DatasetDict has no train split (it has {', '.join(loaded)})")
    unused = [name for name in loaded if name not in roles.values()]
    if unused and not named:
        raise FinetuneDataError(f"{path}: split {unused[0]!r} is not one of {', '.join(SPLITS)} (or dev, valid, val): name the "
                                "splits to validate and test on with --validation-split / --test-split (and "
                                "write predictions for others with --predict SPLIT)")
    # A split whose name gives it a role, displaced by a flag: said, since rows change roles.
    for name in loaded:
        role = _SPLIT_ALIASES.get(name, name)
        if role not in SPLITS or roles.get(role) == name:
            continue
        if name in unused:
            log.warning("%s: split %r is not used: --%s-split named %r as the %s split", path, name, role,
                        named[role], role)
        elif role not in roles:
            taker = next(r for r, n in roles.items() if n == name)
            log.warning("%s: split %r is the %s split (--%s-split): the %s split is cut from train", path, name,
                        taker, taker, role)
    others = [name for name in unused if _SPLIT_ALIASES.get(name, name) not in SPLITS]
    if others:
        log.info("%s: split%s %s not used for training or scoring", path, "s" * (len(others) > 1), ", ".join(others))
    return roles


def iter_records(path: str, batch_rows: int = 4096):
    """Every row of a file or a saved ``Dataset`` as ({column: cell}, where), one at a time and
    checked as ``read_table`` checks it, holding a batch of rows at most: for inputs too big to
    hold (embed.py). A jsonl row lacks the keys it lacks; a csv row has every header column."""
    check_input_path(path)
    if os.path.isdir(path):
        import datasets

        dataset = _load_saved(path)
        if isinstance(dataset, datasets.DatasetDict):  # as read_table: one whose only split is train
            if list(dataset) != ["train"]:
                raise FinetuneDataError(f"{path}: a saved DatasetDict with splits {', '.join(dataset)}: save the "
                                        "split to read as a Dataset of its own")
            dataset = dataset["train"]
        # A class-label column gives its names, as _dataset_table does
        names = {name: feature for name, feature in dataset.features.items()
                 if isinstance(feature, datasets.ClassLabel)}
        for start in range(0, len(dataset), batch_rows):
            batch = dataset[start:start + batch_rows]
            for name, feature in names.items():
                batch[name] = _class_names(feature, batch[name])
            for i, row in enumerate(zip(*batch.values())):
                yield dict(zip(batch, row)), f"{path}: row {start + i + 1}"
        return
    fmt, compression = _format_of(path)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        def unreadable(err):  # pyarrow raises several types for a corrupt file
            return FinetuneDataError(f"{path}: not a readable Parquet file ({err})")

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
        except Exception as err:
            raise unreadable(err) from None
        row = 0
        while True:
            try:
                batch = next(batches, None)
            except Exception as err:
                raise unreadable(err) from None
            if batch is None:
                return
            binary = [f.name for f in batch.schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
            for record in batch.to_pylist():
                row += 1
                for name in binary:  # as _read_parquet: text, not its Python spelling
                    record[name] = _utf8(record[name])
                yield record, f"{path}: row {row}"
    try:
        if fmt == "jsonl":
            yield from _jsonl_rows(path, compression)
            return
        rows = _delimited_rows(path, compression, "," if fmt == "csv" else "\t")
        header = next(rows)
        for cells, at in rows:
            yield dict(zip(header, cells)), at
    except _read_errors() as err:
        what = f"a readable {compression} file" if compression else "readable"
        raise FinetuneDataError(f"{path}: not {what} ({err})") from None


def read_saved_dataset(path: str, validation_split: str | None = None,
                       test_split: str | None = None) -> dict[str, Table]:
    """A ``datasets.save_to_disk`` dir: a ``Dataset`` (→ {"train": …}) or a ``DatasetDict``'s
    splits by role (``saved_split_names``)."""
    loaded = _load_saved(path)
    roles = _split_roles(path, loaded, validation_split, test_split)
    if roles == {"train": ""}:
        return {"train": _dataset_table(loaded, path)}
    return {role: _dataset_table(loaded[name], f"{path}[{name}]") for role, name in roles.items()}


# ---------------------------------------------------------------------------- columns and labels
def _check_table(table: Table, needed: Sequence[str]) -> None:
    if len(table) == 0:
        raise FinetuneDataError(f"{table.source}: the file has no rows")
    for column in needed:
        if column not in table.columns:
            # "review, sentiment" as a CSV header names a column " sentiment"
            spaced = [name for name in table.columns if str(name).strip() == column]
            # A file without a header: its first row named the columns, and a row would be lost to
            # --label-column set to one of its cells.
            as_data = [name for name, values in table.columns.items()
                       if any(isinstance(v, str) and v == name for v in values)]
            raise FinetuneDataError(f"{table.source}: no column {column!r} (columns: "
                                    f"{', '.join(map(str, table.columns)) or 'none'}); "
                                    + (f"column {spaced[0]!r} has spaces around its name: remove them from the "
                                       "header" if spaced else
                                       f"the first line looks like a row ({as_data[0]!r} is also a value below it): "
                                       "add a header line naming the columns" if as_data else
                                       "set the matching --text-column / --text-pair-column / --label-column"))
        for value, where in zip(table.columns[column], table.where):
            if value is _NO_KEY:
                raise FinetuneDataError(f"{where}: no key {column!r} in this row (other rows have it)")
    # Checked once the columns are found (a headerless file's first row may recur as data): a row
    # that repeats the header would be a class named like the label column.
    names = list(table.columns)
    for i, where in enumerate(table.where):
        if all(isinstance(table.columns[name][i], str) and table.columns[name][i] == name for name in names):
            raise FinetuneDataError(f"{where}: the header line again, inside the data (files joined with cat?); "
                                    "remove it")


def _is_container(value) -> bool:
    """A list or object cell (jsonl, parquet): its Python spelling is neither a text nor a label."""
    return isinstance(value, (list, tuple, dict, np.ndarray))


def _check_scalar_labels(table: Table, column: str) -> None:
    """A list or object label (multi-label data) would become one class per spelling ("['a', 'b']")."""
    for value, where in zip(table.columns[column], table.where):
        if _is_container(value):
            raise FinetuneDataError(f"{where}: column {column!r} holds a {type(value).__name__}, not a label; "
                                    "multi-label data is not supported: one label a row")
        if isinstance(value, bytes):
            raise _not_utf8(value, where, column)


def _check_no_blank_labels(table: Table, column: str) -> None:
    """A blank label would become a class "" (or turn a regression target column into classes)."""
    blank = [where for value, where in zip(table.columns[column], table.where) if _label_key(value) == ""]
    if blank:
        rows = f"{len(blank)} row{'s' if len(blank) > 1 else ''} in {table.source}"
        raise FinetuneDataError(f"{blank[0]}: column {column!r} is blank ({rows}); fill in the labels, or skip "
                                "such rows with --drop-label ''")


def _label_key(value) -> str:
    """One spelling per label: 1, 1.0 and "1" from csv, jsonl or parquet are the same class, and
    so are a boolean and its text as pandas writes it to a csv ("True": "true"); blank (empty,
    spaces, null, NaN) is ""."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    if text.lower() in ("true", "false"):
        return text.lower()
    if _WHOLE_DECIMAL.fullmatch(text):  # "1.0" in a csv is the 1.0 of a jsonl: "1"
        return str(int(text.split(".")[0]))
    return text


# As a float prints: no leading zero or plus. Other spellings are kept, since a label may be a
# code ("01", "250.10") whose spelling is its name.
_WHOLE_DECIMAL = re.compile(r"-?(0|[1-9]\d*)\.0*")


def _is_number(value) -> bool:
    return _parses_as_float(value) and math.isfinite(float(value))


# How a missing score is written in a spreadsheet export.
MISSING_SCORE = frozenset({"n/a", "na", "#n/a", "?", "-", "--", "none", "null", "nil", "missing", "unknown", "x"})


def _check_no_stray_non_finite(table: Table, column: str) -> None:
    """A column of numbers but for "nan" or "inf", or for a few words (at most a tenth of the rows;
    a placeholder such as "N/A", in fewer than half) where some numbers are not whole, read as classes (one of them "nan" or "n/a"): a regression
    target with a hole in it, refused naming the row, unless --task says what the column is."""
    values = table.columns[column]
    finite = [_is_number(v) for v in values]
    if all(finite) or not any(finite):
        return
    odd = [i for i, ok in enumerate(finite) if not ok]
    # "nan"/"inf", or a few words ("n/a", "?") among numbers of which some are not whole: read as
    # classes, every distinct score would become a class of its own and the task a classification.
    fractional = any(ok and not float(v).is_integer() for v, ok in zip(values, finite))
    # Beyond a tenth of the rows, only a placeholder for a missing score ("N/A" every sixth row:
    # before, the scores became a class each): codes such as ICD's 250.00 beside V58.67 are classes.
    placeholders = all(_label_key(values[i]).lower() in MISSING_SCORE for i in odd)
    if all(_parses_as_float(values[i]) for i in odd) or (
            fractional and (len(odd) * 10 <= len(values) or (placeholders and len(odd) * 2 < len(values)))):
        raise FinetuneDataError(f"{table.where[odd[0]]}: label {values[odd[0]]!r} in column {column!r}, a column "
                                f"of numbers ({len(odd)} such row{'s' if len(odd) > 1 else ''}): fix or drop those "
                                "rows, or pass --task classification to make each value a class")


def _parses_as_float(value) -> bool:
    try:
        float(value)
        return not isinstance(value, bool)
    except (TypeError, ValueError):
        return False


def infer_task(values: Sequence) -> str:
    """Regression when every label is a number and some are not whole; classification otherwise."""
    if values and all(_is_number(v) for v in values):
        if any(not float(v).is_integer() for v in values):
            return "regression"
    return "classification"


def _sort_labels(keys) -> list[str]:
    keys = set(keys)
    if all(_is_number(k) for k in keys):
        return sorted(keys, key=lambda k: (float(k), k))  # "01" and "1": in one order in every process
    return sorted(keys)


def is_blank_text(value) -> bool:
    """No text in the cell: null, NaN, a missing jsonl key, or empty or spaces."""
    return value is None or value is _NO_KEY or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and not value.strip())


def as_text(value, where: str, column: str) -> str:
    """``value`` as a string; one holding a lone surrogate (JSON's "\\ud800", which json.loads
    accepts) is refused naming the row: tokenizers fail on it with a TypeError. So is a list or
    an object (jsonl, parquet), whose Python spelling ("['a', 'b']") would be trained on as text."""
    if _is_container(value):
        raise FinetuneDataError(f"{where}: column {column!r} holds a {type(value).__name__}, not text; join its "
                                "parts into one string first")
    if isinstance(value, bytes):
        raise _not_utf8(value, where, column)
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise FinetuneDataError(f"{where}: column {column!r} holds an unpaired surrogate escape "
                                f"(\\u{ord(text[err.start]):04x}), which is not text") from None
    return text


def _texts(table: Table, column: str) -> list[str]:
    """The column's texts; a row without one (null, NaN, empty or spaces) is refused, naming it: an
    empty text trained as "[CLS] [SEP]" with whatever label the row had."""
    out, blank = [], []
    for value, where in zip(table.columns[column], table.where):
        if is_blank_text(value):
            blank.append(where)
            continue
        out.append(as_text(value, where, column))
    if blank:
        rows = f"{len(blank)} row{'s' if len(blank) > 1 else ''} in {table.source}"
        raise FinetuneDataError(f"{blank[0]}: column {column!r} is empty ({rows}); every row needs a text "
                                "(remove such rows first)")
    return out


def stratified_split(keys: Sequence, fractions: Sequence[float], seed: int, keep_one: bool = True) -> list[np.ndarray]:
    """Row indices for each fraction, then the rest, drawn per key (class) with ``seed``.

    Part k holds round(fraction_k · n) rows in all; each key gets its share of them,
    floor(fraction_k · n_key) plus one for the keys with the largest remainders, so class
    shares are kept as closely as whole rows allow. With ``keep_one`` every key keeps at least
    one row in the rest (the train split): a class with no train row would get an output unit it
    never trains on, its rows scored as errors (regression's strata, target deciles, need not).
    Indices come back sorted.
    """
    keys = np.asarray([str(k) for k in keys])
    rng = np.random.default_rng(seed)
    names = sorted(set(keys.tolist()))
    rows = {key: rng.permutation(np.flatnonzero(keys == key)) for key in names}
    left = {key: len(rows[key]) for key in names}
    taken = {key: 0 for key in names}
    kept = 1 if keep_one else 0
    tie_break = dict(zip(names, rng.permutation(len(names))))  # equal remainders: a seeded draw, not key order
    parts = []
    for fraction in fractions:
        quota = {key: fraction * len(rows[key]) for key in names}
        counts = {key: min(int(quota[key]), left[key] - kept) for key in names}
        extra = int(round(fraction * len(keys))) - sum(counts.values())
        for key in sorted(names, key=lambda k: (counts[k] - quota[k], tie_break[k])):  # largest remainder first
            if extra <= 0:
                break
            if left[key] - counts[key] > kept:
                counts[key] += 1
                extra -= 1
        part = []
        for key in names:
            part.append(rows[key][taken[key]:taken[key] + counts[key]])
            taken[key] += counts[key]
            left[key] -= counts[key]
        parts.append(np.sort(np.concatenate(part)))
    parts.append(np.sort(np.concatenate([rows[key][taken[key]:] for key in names])))
    return parts


def _quantile_bins(values: np.ndarray, bins: int = 10) -> np.ndarray:
    """Regression strata: the target's deciles."""
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    return np.searchsorted(edges, values, side="right")


# The fine-tuner's defaults (its flags'), one home: FinetuneConfig's and EngineConfig's fields.
_DEFAULTS = {f.name: f.default for f in (*dataclasses.fields(FinetuneConfig), *dataclasses.fields(EngineConfig))
             if f.default is not dataclasses.MISSING}


def load_task_data(*, data: str | None = None, train: str | None = None, validation: str | None = None,
                   test: str | None = None, validation_split: str | None = None, test_split: str | None = None,
                   text_column: str = _DEFAULTS["text_column"],
                   text_pair_column: str | None = None, label_column: str = _DEFAULTS["label_column"],
                   task: str | None = None, drop_labels: Sequence[str] = (),
                   validation_fraction: float = _DEFAULTS["validation_fraction"],
                   test_fraction: float = _DEFAULTS["test_fraction"], seed: int = _DEFAULTS["seed"]) -> TaskData:
    """Reads the splits, drops ``drop_labels`` rows (counted), makes missing splits, maps labels."""
    if (data is None) == (train is None):
        raise FinetuneDataError("give either --data (one file or a saved datasets dir) or --train "
                                "[--validation] [--test]")
    if data is not None:
        if os.path.isdir(data):
            tables = read_saved_dataset(data, validation_split, test_split)
        elif validation_split or test_split:
            raise FinetuneDataError(f"--validation-split/--test-split: --data {data} is a file, not a saved "
                                    "DatasetDict with splits to name")
        else:
            tables = {"train": read_table(data)}
        sources = {name: data for name in tables}
    else:
        for flag, path in (("--validation", validation), ("--test", test)):
            if path and os.path.realpath(path) == os.path.realpath(train):
                raise FinetuneDataError(f"{flag} {path} is the --train file: its rows would be trained on, and the "
                                        "scores would not measure held-out data; give a held-out file, or leave "
                                        f"{flag} out for a seeded split of train")
        tables = {name: read_table(path) for name, path in (("train", train), ("validation", validation),
                                                            ("test", test)) if path}
        sources = {name: t.source for name, t in tables.items()}
    needed = [text_column, label_column] + ([text_pair_column] if text_pair_column else [])
    dropped = {}
    drop = {_label_key(v) for v in drop_labels}
    original = {}
    for name, table in list(tables.items()):
        _check_table(table, needed)
        values = table.columns[label_column]
        # -1.0 as a float only: a ClassLabel's -1 is blank already (_class_names), and an int column's
        # -1 may be a class
        if data is not None and name != "train" and (all(_label_key(v) == "" for v in values)
                                                     or all(isinstance(v, float) and v == -1 for v in values)):
            # A saved DatasetDict's unlabelled split (GLUE's test splits hold -1, or -1.0 for STS-B's
            # scores): nothing to score on, so it is made from train as if it were absent, and said.
            split_name = table.source[len(data) + 1:-1]  # "DIR[test]" → "test"
            if {"validation": validation_split, "test": test_split}[name]:
                raise FinetuneDataError(f"--{name}-split {split_name}: the split has no labels (column "
                                        f"{label_column!r} is blank or -1 in all {len(table)} rows); name a labelled "
                                        f"split, and write predictions for this one with --predict {split_name}")
            log.warning("%s: the %s split has no labels (column %r is blank in all %d rows): using a seeded "
                        "split of train as %s instead (--predict %s writes predictions for it)", table.source, name,
                        label_column, len(table), name, split_name)
            del tables[name]
            continue
        original[name] = table
        _check_scalar_labels(table, label_column)
        keep = [i for i, v in enumerate(table.columns[label_column]) if _label_key(v) not in drop]
        dropped[name] = len(table) - len(keep)
        if dropped[name]:
            table = tables[name] = table.take(keep)
        if not len(table):
            raise FinetuneDataError(f"{table.source}: no rows left after --drop-label "
                                    f"{', '.join(map(repr, sorted(drop)))}")
        _check_no_blank_labels(table, label_column)
    # The labelled splits' labels, before the drop; '' (blank) is a safeguard, fine with none to drop.
    present = {_label_key(v) for t in original.values() for v in t.columns[label_column]}
    unknown = drop - present - {""}
    if unknown:  # a typo ("Neutral" for "neutral") dropped nothing and said nothing
        shown = sorted(present - {""})
        raise FinetuneDataError(f"--drop-label {', '.join(map(repr, sorted(unknown)))}: no row has that label in "
                                f"column {label_column!r} (labels: {', '.join(map(repr, shown[:20]))}"
                                f"{', …' if len(shown) > 20 else ''})")

    if task is None:
        task = infer_task(tables["train"].columns[label_column])
        _check_no_stray_non_finite(tables["train"], label_column)
    labels: list[str] = []
    left_out: list[str] = []
    if task == "classification":
        trained = {_label_key(v) for v in tables["train"].columns[label_column]}
        # A ClassLabel's order (its ids), less the classes train has no row of: a class that is
        # never trained would be predicted never, yet scored, and a dropped one would stay a class.
        named = tables["train"].class_names.get(label_column)
        labels = [n for n in named if _label_key(n) in trained] if named else _sort_labels(trained)
        left_out = [n for n in named or () if _label_key(n) not in trained]
        if left_out:
            log.warning("%s: %d of the ClassLabel's %d classes have no train row (%s): the model has the other %d, "
                        "whose ids differ from the ClassLabel's", tables["train"].source, len(left_out), len(named),
                        ", ".join(map(repr, left_out[:10])) + (", …" if len(left_out) > 10 else ""), len(labels))
        if len(labels) < 2:
            raise FinetuneDataError(f"{tables['train'].source}: column {label_column!r} has "
                                    f"{f'one label ({labels[0]!r})' if labels else 'no label'}; classification needs "
                                    "two or more")
        _warn_of_stray_classes(tables["train"], label_column, labels)
    mapping = {_label_key(label): i for i, label in enumerate(labels)}  # as _examples looks a row's label up
    splits = {name: _examples(table, task, mapping, text_column, text_pair_column, label_column)
              for name, table in tables.items()}

    missing = [s for s in ("validation", "test") if s not in splits]
    if missing:
        whole = splits["train"]
        strata = whole.labels if task == "classification" else _quantile_bins(whole.labels)
        fractions = [validation_fraction if s == "validation" else test_fraction for s in missing]
        parts = stratified_split(strata, fractions, seed, keep_one=task == "classification")
        for split, rows in zip(missing, parts):
            splits[split] = whole.take(rows)
            sources[split] = f"{sources['train']} (seeded split)"
            dropped[split] = 0
        if data is None and "validation" in tables and missing == ["test"]:  # a dev file, and train rows held out
            log.warning("no --test file: %d of the %d --train rows are held out as the test split (--test-fraction "
                        "%g, seed %d); pass --test DEV_FILE to train on every row and test on a dev set",
                        len(splits["test"]), len(whole), test_fraction, seed)
        splits["train"] = whole.take(parts[-1])
        for split, fraction in zip(missing, fractions):
            if not len(splits[split]) and round(fraction * len(whole)) and task == "classification":
                raise FinetuneDataError(f"{tables['train'].source}: no class has a row to spare for the {split} "
                                        f"split ({len(labels)} classes in {len(whole)} rows; each keeps one in "
                                        f"train): give a --{split} file")
        for split in ("train", *missing):
            if not len(splits[split]):
                raise FinetuneDataError(f"{tables['train'].source}: too few rows ({len(whole)}) to split off "
                                        f"{', '.join(missing)} and keep a train split")
        if task == "classification":
            _warn_of_classes_left_out(splits, missing, labels)
    return TaskData(task, labels, {name: splits[name] for name in SPLITS}, dropped, sources, left_out)


# A class of at most this many train rows, beside one of ten times as many, reads as a typo
# ("postive") or a stray value ("n/a") rather than a class.
STRAY_CLASS_ROWS = 2
_DECIMAL_COMMA = re.compile(r"[+-]?\d+,\d+")


def _warn_of_stray_classes(train: Table, column: str, labels: Sequence[str]) -> None:
    """One line when the train split's classes look like something else: a class for nearly every
    row (a score read as classes), or a class of a row or two beside large ones (a typo)."""
    counts = collections.Counter(_label_key(v) for v in train.columns[column])
    rows = sum(counts.values())
    if len(labels) * 5 > rows:  # most classes hold a row or two: nothing to learn them from
        keys = list(counts)
        if all(_DECIMAL_COMMA.fullmatch(k) for k in keys):
            hint = ("the labels are numbers written with commas (decimal commas, e.g. '0,5', or thousands "
                    "separators), read as words: write them as plain numbers with decimal points for --task "
                    "regression")
        elif all(_is_number(k) for k in keys):
            hint = "if the column is a score, pass --task regression"
        else:
            hint = "check that --label-column names the label"
        log.warning("%s: %d classes in %d train rows of column %r, %.1f rows a class: %s", train.source,
                    len(labels), rows, column, rows / len(labels), hint)
        return
    largest = max(counts.values())
    stray = [key for key in labels if counts[_label_key(key)] <= STRAY_CLASS_ROWS]
    if stray and largest >= 10 * STRAY_CLASS_ROWS:
        shown = ", ".join(f"{key!r} ({counts[_label_key(key)]} row{'s' * (counts[_label_key(key)] > 1)})"
                          for key in stray[:10]) + (", …" if len(stray) > 10 else "")
        log.warning("%s: %d of the %d classes in column %r have at most %d train rows, beside %d of the largest: "
                    "%s; a typo or a stray value is a class of its own: fix those rows, or leave them out with "
                    "--drop-label", train.source, len(stray), len(labels), column, STRAY_CLASS_ROWS, largest, shown)


def _warn_of_classes_left_out(splits: dict, cut: Sequence[str], labels: Sequence[str]) -> None:
    """One line naming the classes too rare for a split cut from train to hold a row of them: they
    are trained on, not scored there."""
    for split in cut:
        absent = sorted(set(range(len(labels))) - set(splits[split].labels.tolist()))
        if absent:
            names = ", ".join(repr(labels[i]) for i in absent[:10]) + (", …" if len(absent) > 10 else "")
            log.warning("%d of the %d classes have too few rows for the seeded %s split to hold one (%s): they are "
                        "trained on but not scored there", len(absent), len(labels), split, names)


def _examples(table: Table, task: str, mapping: dict[str, int], text_column: str, text_pair_column: str | None,
              label_column: str) -> Examples:
    values = []
    for value, where in zip(table.columns[label_column], table.where):
        if task == "classification":
            key = _label_key(value)
            if key not in mapping:
                scores = _is_number(key) and all(_is_number(k) and float(k).is_integer() for k in mapping)
                raise FinetuneDataError(f"{where}: label {key!r} in column {label_column!r} does not occur "
                                        f"in the train split (labels: {', '.join(mapping)})"
                                        + ("; if the column is a score, pass --task regression (train's whole "
                                           "numbers read as classes)" if scores else ""))
            values.append(mapping[key])
        else:
            if not _is_number(value):
                raise FinetuneDataError(f"{where}: regression target {value!r} in column {label_column!r} "
                                        "is not a finite number")
            values.append(float(value))
    return Examples(_texts(table, text_column), _texts(table, text_pair_column) if text_pair_column else None,
                    np.asarray(values, dtype=np.int64 if task == "classification" else np.float32), table.where)


def load_prediction_inputs(specs: Sequence[str], *, data: str | None, task: str, text_column: str,
                           text_pair_column: str | None) -> dict[str, Examples]:
    """The ``--predict`` inputs by output name (``prediction_name``): a file, or a split of the
    saved DatasetDict given as ``--data`` (a name that is both is refused). Only the text columns
    are read: labels, if any, are ignored; a blank text is refused as in training."""
    inputs = {}
    saved = _load_saved(data) if specs and data is not None and os.path.isdir(data) else None
    splits = list(saved) if hasattr(saved, "keys") else []
    for spec in specs:
        if spec in splits:
            if os.path.exists(spec):
                raise FinetuneDataError(f"--predict {spec}: both a split of --data {data} and a path here; pass the "
                                        f"path as ./{spec} (or its full path) or rename it")
            table = _dataset_table(saved[spec], f"{data}[{spec}]")
        elif os.path.exists(spec):
            try:
                table = read_table(spec)
            except FinetuneDataError as err:
                raise FinetuneDataError(f"--predict {spec}: {err}") from None
        else:
            where = f", nor a split of --data {data} (splits: {', '.join(splits) or 'none, it is one Dataset'})" \
                if saved is not None else ""
            raise FinetuneDataError(f"--predict {spec}: no such file{where}")
        try:
            _check_table(table, [text_column] + ([text_pair_column] if text_pair_column else []))
            texts = _texts(table, text_column)
            pairs = _texts(table, text_pair_column) if text_pair_column else None
        except FinetuneDataError as err:
            raise FinetuneDataError(f"--predict {spec}: {err}") from None
        labels = np.zeros(len(table), dtype=np.int64 if task == "classification" else np.float32)
        inputs[prediction_name(spec)] = Examples(texts, pairs, labels, table.where)
    return inputs
