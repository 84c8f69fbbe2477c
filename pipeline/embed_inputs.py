"""embed.py's input, streamed: a checking pass, then the rows in chunks.

An input of any size is read twice and never held: ``scan_inputs`` reads every row once and
keeps counts (rows, the first blank text, the id column's types), so that a blank text in
the last line fails the run before any embedding, naming its line; ``input_chunks`` then
gives the rows ``chunk_rows`` at a time, each chunk numbered, for a process to embed and
write. The rows are read with fine-tuning's readers (csv/tsv/jsonl/parquet, optionally
compressed, or a saved ``Dataset``), so bad input fails the same way, naming the file and
line. A blank or null text is an error, not a skip: a missing row would silently shift
whatever the table is joined to.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from pipeline.finetuning.data import (_NO_KEY, FinetuneDataError, _format_of, as_text, check_input_path,
                                      is_blank_text, iter_records)

CHUNK_ROWS = 16_384  # rows a process holds at once: texts, token ids, vectors (~70 MB at 768 dims, 128 tokens)
ROW_COLUMN = "row"  # the id column when the input has none: the 0-based data row

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class InputScan:
    source: str
    rows: int
    text_column: str
    id_column: str | None  # the input's id column, or None: ROW_COLUMN numbers the rows
    id_type: object = None  # the pyarrow type every id is written as (None: the row numbers, int64)

    @property
    def output_id_column(self) -> str:
        return self.id_column or ROW_COLUMN

    def chunk_size(self, chunk_rows: int = CHUNK_ROWS, world_size: int = 1) -> int:
        """Rows per chunk: at most ``chunk_rows``, and at most rows / processes rounded up, so that
        a small input is spread over the processes, not embedded by rank 0 alone (9 rows on 4
        processes: chunks of 3, one process idle). The same on every rank: all scan alike."""
        return max(1, min(chunk_rows, -(-self.rows // world_size)))

    def chunks(self, size: int) -> list[int]:
        """The rows of each chunk of ``size`` rows, in order."""
        return [min(size, self.rows - start) for start in range(0, self.rows, size)]


def _is_blank_id(value) -> bool:
    return value is None or value is _NO_KEY or (isinstance(value, str) and not value.strip())


def check_first_row(path: str, text_column: str, id_column: str | None = None) -> None:
    """The cheap checks, before a model is loaded: the input exists, has a known format and a
    row, and (csv, tsv, parquet: every row has the first's columns) the columns asked for."""
    check_input_path(path)
    first = next(iter_records(path), None)
    if first is None:
        raise FinetuneDataError(f"{path}: the file has no rows")
    if _fixed_columns(path):
        _check_columns(path, first[0], text_column, id_column)


def _fixed_columns(path: str) -> bool:
    return os.path.isdir(path) or _format_of(path)[0] != "jsonl"  # a jsonl row may lack keys


def _declared_type(path: str, column: str):
    """The id column's type where the input declares one (parquet, a saved Dataset; a class-label
    column reads as its names), else None: jsonl's is guessed from the values, csv's are text."""
    import pyarrow as pa

    if os.path.isdir(path):
        import datasets

        from pipeline.finetuning.data import _load_saved

        dataset = _load_saved(path)
        dataset = dataset["train"] if isinstance(dataset, datasets.DatasetDict) else dataset
        feature = dataset.features.get(column)
        if isinstance(feature, datasets.ClassLabel):
            return pa.string()
        return dataset.features.arrow_schema.field(column).type if feature is not None else None
    if _format_of(path)[0] == "parquet":
        import pyarrow.parquet as pq

        schema = pq.ParquetFile(path).schema_arrow
        return schema.field(column).type if column in schema.names else None
    if _format_of(path)[0] in ("csv", "tsv"):
        return pa.string()
    return None


# Above this, an int id does not survive a double: such ids beside floats are written as text.
_EXACT_IN_DOUBLE = 2 ** 53


class _IdTypes:
    """The type of jsonl ids, guessed from their values a block at a time and merged so that the
    result does not depend on the block size: ints beside floats as doubles unless one is past
    2^53; ints past int64 as uint64 unless one is negative; lists and objects, or any other mix
    (3 and "a7"), as text."""

    def __init__(self, block: int):
        self.block, self.pending, self.types = block, [], set()
        self.big_int = self.negative_int = self.structured = False

    def add(self, value) -> None:
        if isinstance(value, int):
            self.big_int = self.big_int or abs(value) > _EXACT_IN_DOUBLE
            self.negative_int = self.negative_int or value < 0
        elif isinstance(value, (list, dict)):  # a type guessed per block would vary with the block
            self.structured = True
            return
        self.pending.append(value)
        if len(self.pending) == self.block:
            self._settle()

    def _settle(self) -> None:
        import pyarrow as pa

        try:
            self.types.add(pa.array(self.pending).type)
        except OverflowError:  # an int past int64: unsigned 64-bit ids (hashes), or text
            try:
                self.types.add(pa.array(self.pending, type=pa.uint64()).type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                self.types.add(None)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed within the block
            self.types.add(None)
        self.pending.clear()

    def result(self):
        import pyarrow as pa

        if self.pending:
            self._settle()
        if self.structured:
            log.warning("some ids are lists or objects: all ids written as their JSON text")
            return pa.string()
        if len(self.types) == 1 and None not in self.types:
            return next(iter(self.types))
        if self.types == {pa.int64(), pa.float64()} and not self.big_int:
            return pa.float64()
        if self.types == {pa.int64(), pa.uint64()} and not self.negative_int:
            return pa.uint64()
        log.warning("the ids mix types (such as 3 and \"a7\"): all written as text")
        return pa.string()


def scan_inputs(path: str, text_column: str, id_column: str | None = None, chunk_rows: int = CHUNK_ROWS) -> InputScan:
    """Every check of the whole input, holding none of it. ``id_column`` None: ``id`` if the input
    has it, else the row number; a named one must exist. Ids keep the type the input declares
    (parquet, a saved Dataset; csv's are text); jsonl's are typed by ``_IdTypes``, the same for
    any ``chunk_rows``."""
    check_first_row(path, text_column, id_column)
    columns: dict[str, None] = {}
    rows, blank, first_blank, blank_id, no_key = 0, 0, None, None, None
    id_name = id_column or "id"
    declared = _declared_type(path, id_name)
    guess = _IdTypes(chunk_rows) if declared is None else None  # jsonl only: the others declare theirs
    for record, where in iter_records(path):
        columns.update(dict.fromkeys(record))
        rows += 1
        value = record.get(text_column, _NO_KEY)
        if value is _NO_KEY:  # a jsonl row without the key: not "blank" (refused below, if others have it)
            no_key = no_key or where
            continue
        if is_blank_text(value):
            blank, first_blank = blank + 1, first_blank or where
            continue
        as_text(value, where, text_column)  # an unpaired surrogate: refused, naming the row
        identifier = record.get(id_name, _NO_KEY)
        if _is_blank_id(identifier):
            blank_id = blank_id or where
        elif guess:
            guess.add(identifier)
    _check_columns(path, columns, text_column, id_column)
    if no_key:
        raise FinetuneDataError(f"{no_key}: no key {text_column!r} in this row (other rows have it)")
    if blank:
        raise FinetuneDataError(f"{first_blank}: column {text_column!r} is blank ({blank} row{'s' if blank > 1 else ''} "
                                f"in {path}); every row needs a text (remove such rows first: an embedding per input "
                                "row is the output's contract)")
    if (id_column is None and "id" not in columns) or _numbers_rows(id_column, columns):
        return InputScan(path, rows, text_column, None)
    if blank_id:
        raise FinetuneDataError(f"{blank_id}: column {id_name!r} (the id) is blank; fill it in, or pass "
                                f"--id-column {ROW_COLUMN} to number the rows instead")
    return InputScan(path, rows, text_column, id_name, declared if declared is not None else guess.result())


def _numbers_rows(id_column: str | None, columns) -> bool:
    """--id-column row on an input without such a column: the row numbers, also where it has an id."""
    return id_column == ROW_COLUMN and ROW_COLUMN not in columns


def _check_columns(path: str, columns, text_column: str, id_column: str | None) -> None:
    names = ", ".join(map(str, columns)) or "none"
    if text_column not in columns:
        raise FinetuneDataError(f"{path}: no column {text_column!r} (columns: {names}); set --text-column")
    if id_column is not None and id_column not in columns and not _numbers_rows(id_column, columns):
        raise FinetuneDataError(f"{path}: no column {id_column!r} (columns: {names}); set --id-column, or leave it "
                                "out to number the rows")


def input_chunks(scan: InputScan, chunk_rows: int = CHUNK_ROWS, take=lambda k: True):
    """(chunk number, ids, texts) for each chunk of ``chunk_rows`` rows that ``take(number)`` wants,
    in input order; the ids as the output writes them (the row numbers without an id column)."""
    import pyarrow as pa

    as_text_ids = scan.id_type is not None and pa.types.is_string(scan.id_type)
    ids, texts, k = [], [], 0
    for row, (record, where) in enumerate(iter_records(scan.source)):
        if take(k):
            if scan.id_column is None:
                ids.append(row)
            else:
                value = record[scan.id_column]
                if as_text_ids and not isinstance(value, str):
                    value = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
                ids.append(value)
            texts.append(as_text(record[scan.text_column], where, scan.text_column))
        if (row + 1) % chunk_rows == 0:
            if take(k):
                yield k, ids, texts
            ids, texts, k = [], [], k + 1
    if texts:
        yield k, ids, texts
