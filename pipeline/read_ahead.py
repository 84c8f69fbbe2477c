"""Reads a batch's rows from disk all at once, before the gather faults them in one by one.

The loader gathers each batch from memory-mapped flat arrays at random rows, a few hundred
bytes per row from each of several arrays. Where those pages are not in the page cache (a
corpus's first epoch, a corpus larger than the node's memory, a cache on a network file
system) every page fault waits for its own read, and numpy's gather takes them one after
another, about nine a row: on this project's 2-core VM one process gathered 3,600 rows/s from
a cold cache, less than one GPU trains BERT-base on. ``posix_fadvise(POSIX_FADV_WILLNEED)``
queues the reads of a byte range and returns, so asking for every range of the next batch
first puts all of its reads in flight together, and the gather then finds the pages in memory:
30,000 rows/s there (``python benchmarks/data_loader.py --replicate 100 --cold --batch-size 256
--sequences 20000``). Where the pages are already cached the calls cost about 1.5 µs a row, in
the loader's background thread (docs/PRETRAINING.md, "Data loading").

The arrays indexed by row (offsets, lengths, NSP labels: 19 bytes a row, 11 under dynamic
masking, which reads no stored masks) are advised whole when the dataset opens: a node draws
many rows from each of their pages in an epoch, so every page is read anyway, and one
sequential read is cheaper than their random faults.

Opening a dataset queues the row-indexed arrays' reads (0.17 s for 1 GB on this VM; longer on
a slow disk). Linux only (``os.posix_fadvise``); elsewhere this does nothing and the gather
reads as before. Each file's descriptor is opened right after its map: should a newer cache
replace the files in between, only the advice misses.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Callable, Iterable, Iterator

import numpy as np

log = logging.getLogger(__name__)

WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)
# Linux reads at most a device's readahead window for one call (128 KiB by default; 8 MiB on
# this project's VM): a whole file is asked for in pieces no larger.
CHUNK_BYTES = 128 << 10


class ReadAhead:
    """``posix_fadvise(WILLNEED)`` on row spans of the ``.npy`` files ``add`` names."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and WILLNEED is not None
        self._files: dict[str, tuple[int, int, int]] = {}  # name -> (fd, data offset, itemsize)
        self._fds: list[int] = []
        weakref.finalize(self, _close, self._fds)

    def add(self, name: str, mapped: np.memmap) -> None:
        """The file ``mapped`` maps (its header is ``mapped.offset`` bytes), as array ``name``."""
        if self.enabled:
            fd = os.open(mapped.filename, os.O_RDONLY)
            self._fds.append(fd)
            self._files[name] = (fd, mapped.offset, mapped.itemsize)

    def whole(self, names: Iterable[str]) -> None:
        for name in names:
            if not self.enabled:
                return
            size = os.fstat(self._files[name][0]).st_size
            self._advise(name, ((begin, min(CHUNK_BYTES, size - begin)) for begin in range(0, size, CHUNK_BYTES)))

    def spans(self, names: Iterable[str], starts: np.ndarray, stops: np.ndarray) -> None:
        """Elements ``starts[i]:stops[i]`` of each array in ``names``."""
        starts, stops = np.asarray(starts, np.int64), np.asarray(stops, np.int64)
        for name in names:
            if not self.enabled:
                return
            _, offset, itemsize = self._files[name]
            begins, lengths = offset + starts * itemsize, (stops - starts) * itemsize
            self._advise(name, zip(begins[lengths > 0].tolist(), lengths[lengths > 0].tolist()))

    def _advise(self, name: str, ranges: Iterable[tuple[int, int]]) -> None:
        fd = self._files[name][0]
        try:
            for begin, length in ranges:
                os.posix_fadvise(fd, begin, length, WILLNEED)
        except OSError as err:  # a file system that refuses the advice: the gather still reads the rows
            self.enabled = False
            log.warning("read-ahead of the flat arrays is off: posix_fadvise on %s.npy failed (%s); batches are "
                        "read as they are gathered", name, err)


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def one_batch_ahead(read_ahead: Callable[[np.ndarray], None], items: Iterable,
                    rows: Callable[[object], np.ndarray] = lambda item: item) -> Iterator:
    """``items`` delayed by one: each item's ``rows(item)`` go to ``read_ahead`` before the
    previous item is handed on, so their reads run while that one's rows are gathered."""
    pending = missing = object()
    for item in items:
        read_ahead(rows(item))
        if pending is not missing:
            yield pending
        pending = item
    if pending is not missing:
        yield pending
