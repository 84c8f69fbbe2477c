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
import logging
import os

from pipeline.finetuning.data import _NO_KEY, FinetuneDataError, _format_of, as_text, is_blank_text, iter_records

CHUNK_ROWS = 16_384  # rows a process holds at once: their texts, ids and vectors (50 MB at 768 dims)
ROW_COLUMN = "row"  # the id column when the input has none: the 0-based data row

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class InputScan:
    source: str
    rows: int
    text_column: str
    id_column: str | None  # the input's id column, or None: ROW_COLUMN numbers the rows
    id_type: str  # "row", or the Arrow type every id is written as: "int64", "double", "string", …

    @property
    def output_id_column(self) -> str:
        return self.id_column or ROW_COLUMN

    def chunks(self, chunk_rows: int = CHUNK_ROWS) -> int:
        return -(-self.rows // chunk_rows)


def _is_blank_id(value) -> bool:
    return value is None or value is _NO_KEY or (isinstance(value, str) and not value.strip())


def scan_inputs(path: str, text_column: str, id_column: str | None = None, chunk_rows: int = CHUNK_ROWS) -> InputScan:
    """Every check of the whole input, holding none of it. ``id_column`` None: ``id`` if the input
    has it, else the row number; a named one must exist. Ids of mixed types (jsonl's 3 and "a7")
    are all written as text."""
    import pyarrow as pa

    fixed_columns = os.path.isdir(path) or _format_of(path)[0] != "jsonl"  # a jsonl row may lack keys
    columns: dict[str, None] = {}
    rows, blank, first_blank = 0, 0, None
    id_name = id_column or "id"
    blank_id, id_types, pending = None, set(), []

    def settle_types():
        try:
            id_types.add(str(pa.array(pending).type))
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed within the chunk
            id_types.add("mixed")
        pending.clear()

    for record, where in iter_records(path):
        if rows == 0 and fixed_columns:  # every row has the columns of the first: fail at once
            _check_columns(path, record, text_column, id_column)
        columns.update(dict.fromkeys(record))
        rows += 1
        value = record.get(text_column, _NO_KEY)
        if is_blank_text(value):
            blank, first_blank = blank + 1, first_blank or where
            continue
        as_text(value, where, text_column)  # an unpaired surrogate: refused, naming the row
        identifier = record.get(id_name, _NO_KEY)
        if _is_blank_id(identifier):
            blank_id = blank_id or where
        else:
            pending.append(identifier)
            if len(pending) == chunk_rows:
                settle_types()
    if rows == 0:
        raise FinetuneDataError(f"{path}: the file has no rows")
    _check_columns(path, columns, text_column, id_column)
    if blank:
        raise FinetuneDataError(f"{first_blank}: column {text_column!r} is blank ({blank} row{'s' if blank > 1 else ''} "
                                f"in {path}); every row needs a text (remove such rows first: an embedding per input "
                                "row is the output's contract)")
    if id_column is None and "id" not in columns:
        return InputScan(path, rows, text_column, None, "row")
    if blank_id:
        raise FinetuneDataError(f"{blank_id}: column {id_name!r} (the id) is blank")
    if pending:
        settle_types()
    id_type = id_types.pop() if len(id_types) == 1 else ("double" if id_types == {"int64", "double"} else "mixed")
    if id_type == "mixed":
        log.warning("the ids mix types (such as 3 and \"a7\"): all written as text")
        id_type = "string"
    return InputScan(path, rows, text_column, id_name, id_type)


def _check_columns(path: str, columns, text_column: str, id_column: str | None) -> None:
    names = ", ".join(map(str, columns)) or "none"
    if text_column not in columns:
        raise FinetuneDataError(f"{path}: no column {text_column!r} (columns: {names}); set --text-column")
    if id_column is not None and id_column not in columns:
        raise FinetuneDataError(f"{path}: no column {id_column!r} (columns: {names}); set --id-column, or leave it "
                                "out to number the rows")


def input_chunks(scan: InputScan, chunk_rows: int = CHUNK_ROWS, take=lambda k: True):
    """(chunk number, ids, texts) for each chunk of ``chunk_rows`` rows that ``take(number)`` wants,
    in input order; the ids as the output writes them (the row numbers without an id column)."""
    ids, texts, k = [], [], 0
    for row, (record, where) in enumerate(iter_records(scan.source)):
        if take(k):
            if scan.id_column is None:
                ids.append(row)
            else:
                value = record[scan.id_column]
                ids.append(str(value) if scan.id_type == "string" and not isinstance(value, str) else value)
            texts.append(as_text(record[scan.text_column], where, scan.text_column))
        if (row + 1) % chunk_rows == 0:
            if take(k):
                yield k, ids, texts
            ids, texts, k = [], [], k + 1
    if texts:
        yield k, ids, texts
