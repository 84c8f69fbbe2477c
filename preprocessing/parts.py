"""Part files and the equal-size shards assembled from them; no Beam here.

Each read task writes its examples, bucket after bucket, to one *part file*
(``OUTPUT/parts/task-NNNNNN.parquet``) while it reads, so no step ever gathers the
corpus. Once every part is written their row counts fix the output: the rows of all
parts in task order are one global sequence, cut into ``num_shards`` contiguous ranges
of equal size (±1 row). Each shard is then assembled on its own by reading only its
slices of the parts (whole row groups, sliced), shuffled within the shard from the seed,
and written under a temporary name that is renamed when complete. Memory per step is
bounded by one bucket (writing) or one shard of at most ``SHUFFLE_IN_MEMORY_ROWS`` rows
(assembling), whatever the corpus size: a larger shard (a fixed --num-shards over a big
corpus) is shuffled through buckets on the worker's local disk.

Every file goes through Beam's FileSystems, so the same code writes local paths, gs://
or s3://.
"""

from __future__ import annotations

import dataclasses
import io
import math
import uuid
import os
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems

from preprocessing.examples import SCHEMA, InstanceBatch

PARTS_DIR = "parts"
COUNTERS_FILE = "counters.json"
# Rows per Parquet row group in part files and shards. A shard's assembly reads whole
# row groups of the parts it overlaps, so this bounds what it reads beyond its slice.
ROW_GROUP_ROWS = 8192
# A shard of up to this many rows is shuffled in memory, at about 2 KB a row more at the peak
# (benchmarks/shard_shuffle.py; the default --rows-per-shard is half of it). A larger one goes
# through buckets on local disk (``write_shard``), so that a worker's memory does not grow with it.
SHUFFLE_IN_MEMORY_ROWS = 131072
SCRATCH_BUCKETS = 512


@dataclasses.dataclass(frozen=True)
class PartInfo:
    """One read task's written part: where it is and how many examples it holds."""

    task_index: int
    path: str
    rows: int


def part_name(task_index: int) -> str:
    return f"task-{task_index:06d}.parquet"


def shard_name(index: int, num_shards: int) -> str:
    return f"part-{index:05d}-of-{num_shards:05d}.parquet"


def write_atomically(output_path: str, data: bytes) -> None:
    """Writes ``data`` under a temporary name, then renames it: a reader never sees half a
    file, and a retried task simply replaces it."""
    temp = _temporary_name(output_path)
    with FileSystems.create(temp) as f:
        f.write(data)
    _replace(temp, output_path)


def _temporary_name(path: str) -> str:
    """A name of this attempt's own: two attempts of one task may run at once (Spark's speculative
    execution, a Dataflow work item that lost its lease and runs on); with one shared name, the
    later one's rename found its file renamed away by the first, after deleting the first's output."""
    directory, name = path.rsplit("/", 1)
    return f"{directory}/.{name}.{uuid.uuid4().hex[:16]}.inprogress"


def _replace(temp: str, path: str) -> None:
    """Renames over ``path`` (local, gs:// and s3:// renames replace it), so that at no moment is a
    finished file missing, which another attempt of the same task may have written; a file system
    that refuses to rename over a file (HDFS) gets it deleted first."""
    try:
        FileSystems.rename([temp], [path])
    except BeamIOError:
        if not (FileSystems.exists(temp) and FileSystems.exists(path)):
            raise
        FileSystems.delete([path])
        FileSystems.rename([temp], [path])


class PartWriter:
    """Collects one task's instance batches and writes them as one Parquet part file.

    Batches are buffered until a row group is full, then encoded and streamed to a
    temporary file, so memory holds at most a row group of instances. ``close`` renames
    the file into place: a part that exists is complete, and a retried task replaces it.
    """

    def __init__(self, path: str, row_group_rows: int = ROW_GROUP_ROWS):
        self.path, self.row_group_rows = path, row_group_rows
        self.rows = 0
        self._pending: list[InstanceBatch] = []
        self._pending_rows = 0
        self._temp = _temporary_name(path)
        self._sink = FileSystems.create(self._temp)
        self._writer: pq.ParquetWriter | None = None  # opened with the first rows' schema (word_starts or not)

    def add(self, batch: InstanceBatch) -> None:
        if not len(batch):
            return
        self._pending.append(batch)
        self._pending_rows += len(batch)
        self.rows += len(batch)
        if self._pending_rows >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            table = InstanceBatch.concat(self._pending).to_arrow()
            if self._writer is None:
                self._writer = pq.ParquetWriter(self._sink, table.schema, compression="zstd")
            self._writer.write_table(table, row_group_size=self.row_group_rows)
            self._pending, self._pending_rows = [], 0

    def close(self) -> int:
        self._flush()
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._sink, SCHEMA, compression="zstd")
        self._writer.close()
        self._sink.close()
        _replace(self._temp, self.path)
        return self.rows


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """The parts in task order and the shards cut from their concatenated rows."""

    parts: tuple[PartInfo, ...]
    num_shards: int

    @staticmethod
    def plan(parts: Sequence[PartInfo], num_shards: int, rows_per_shard: int) -> ShardLayout:
        ordered = tuple(sorted(parts, key=lambda p: p.task_index))
        total = sum(p.rows for p in ordered)
        if total == 0:
            return ShardLayout(ordered, 0)
        num_shards = min(num_shards, total)  # not empty shards; the summary says so (driver.shards_warning)
        return ShardLayout(ordered, num_shards or max(1, math.ceil(total / rows_per_shard)))

    @property
    def total(self) -> int:
        return sum(p.rows for p in self.parts)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Global rows [start, stop) of ``shard``: sizes differ by at most one row."""
        return shard * self.total // self.num_shards, (shard + 1) * self.total // self.num_shards

    def slices(self, shard: int) -> list[tuple[PartInfo, int, int]]:
        """(part, first row, stop row) within each part that ``shard`` takes rows from."""
        start, stop = self.shard_range(shard)
        result, offset = [], 0
        for part in self.parts:
            lo, hi = max(start, offset), min(stop, offset + part.rows)
            if lo < hi:
                result.append((part, lo - offset, hi - offset))
            offset += part.rows
        return result


def read_part_rows(path: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a part file, reading only the row groups that hold them."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        parquet = pq.ParquetFile(f)
        groups, first_row, row = [], None, 0
        for g in range(parquet.num_row_groups):
            n = parquet.metadata.row_group(g).num_rows
            if row < stop and row + n > start:
                groups.append(g)
                first_row = row if first_row is None else first_row
            row += n
        if not groups:
            return SCHEMA.empty_table()
        table = parquet.read_row_groups(groups)
    return table.slice(start - first_row, stop - start)


def iter_part_rows(path: str, start: int, stop: int) -> Iterator[pa.Table]:
    """Rows [start, stop) of a part file, a row group at a time."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        parquet, row = pq.ParquetFile(f), 0
        for g in range(parquet.num_row_groups):
            n = parquet.metadata.row_group(g).num_rows
            if row < stop and row + n > start:
                lo = max(start - row, 0)
                yield parquet.read_row_group(g).slice(lo, min(stop - row, n) - lo)
            row += n


def assemble_shard(layout: ShardLayout, shard: int, seed: int) -> pa.Table:
    """The rows of ``shard``, shuffled by a permutation drawn from (seed, shard)."""
    pieces = [read_part_rows(part.path, lo, hi) for part, lo, hi in layout.slices(shard)]
    table = pa.concat_tables(pieces) if pieces else rows_schema(layout).empty_table()
    order = np.random.default_rng([seed, shard]).permutation(table.num_rows)
    return table.take(pa.array(order)).combine_chunks()


def rows_schema(layout: ShardLayout) -> pa.Schema:
    """The schema the run's rows were written with (``SCHEMA``, or with word_starts): an empty
    shard (more shards than rows) gets it too, so that every shard of a data dir agrees."""
    for part in layout.parts:
        if part.rows:
            with FileSystems.open(part.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                return pq.ParquetFile(f).schema_arrow
    return SCHEMA


def write_shard(layout: ShardLayout, shard: int, seed: int, path: str,
                in_memory_rows: int = SHUFFLE_IN_MEMORY_ROWS) -> int:
    """Writes ``shard``, shuffled from (seed, shard), to ``path``; its rows. Up to
    ``in_memory_rows`` rows it is assembled and shuffled in memory; a larger one is
    scattered row group by row group into buckets of about half that many rows on local
    disk, each row to a random bucket, then each bucket shuffled in memory and appended:
    a uniformly random order too, in the memory of one bucket."""
    start, stop = layout.shard_range(shard)
    if stop - start <= in_memory_rows:
        table = assemble_shard(layout, shard, seed)
        write_atomically(path, encode_shard(table))
        return table.num_rows
    rng = np.random.default_rng([seed, shard])
    # at most SCRATCH_BUCKETS files open at once: a bucket grows past in_memory_rows / 2 only for
    # a shard of over 33M rows (--num-shards 1 over a big corpus)
    count = min(math.ceil(2 * (stop - start) / in_memory_rows), SCRATCH_BUCKETS)
    with tempfile.TemporaryDirectory(prefix="shard-shuffle-") as scratch:
        names, writers = [os.path.join(scratch, f"{b}.parquet") for b in range(count)], [None] * count
        for part, lo, hi in layout.slices(shard):
            for group in iter_part_rows(part.path, lo, hi):
                bucket = rng.integers(count, size=group.num_rows)
                for b in range(count):
                    if writers[b] is None:  # the parts' schema: with word_starts or not
                        writers[b] = pq.ParquetWriter(names[b], group.schema, compression="zstd")
                    writers[b].write_table(group.take(pa.array(np.flatnonzero(bucket == b))))
        for writer in writers:
            writer.close()
        temp = _temporary_name(path)
        with FileSystems.create(temp) as sink:
            with pq.ParquetWriter(sink, writers[0].schema, compression="zstd") as out:
                for name in names:
                    table = pq.read_table(name)
                    out.write_table(table.take(pa.array(rng.permutation(table.num_rows))),
                                    row_group_size=ROW_GROUP_ROWS)
                    os.remove(name)  # the scratch space falls as the shard grows
        _replace(temp, path)
    return stop - start


def encode_shard(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return buffer.getvalue()
