"""Parquet footers read many at once: English Wikipedia has hundreds to thousands of shards, and
each footer is an open and two small reads that wait on a network file system's or object
store's latency (tens of milliseconds on gs:// or s3://), not on the GIL. One after another they
kept the launcher (the manifest) and every training rank (its check of the manifest) waiting."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable
from typing import TypeVar

FOOTER_READERS = 16  # footers read at once

T = TypeVar("T")
R = TypeVar("R")


def read_footers(read: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``read`` of every item, FOOTER_READERS at a time, in the items' order. The first item's
    exception in that order is the one raised, so a check names the same bad shard as a loop."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=FOOTER_READERS) as pool:
        return list(pool.map(read, items))
