"""Batches of rows of similar length, in a random order: what both trainers batch by.

A batch is padded to its longest row, so a random batch of short and long rows computes
mostly padding: 53% of the tokens of the bundled reviews' fine-tuning batches of 32. Sorting
windows of rows by length, cutting them into batches and shuffling the batches keeps most of
the order's randomness (which window a row falls in, where its batch comes in the epoch) while
a batch's rows are alike in length. NVIDIA's BERT and Hugging Face's ``group_by_length`` do the
same with windows of their own.
"""

from __future__ import annotations

import numpy as np

WINDOW_BATCHES = 64  # batches per sorted window


def length_grouped(rows: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                   window: int = WINDOW_BATCHES) -> np.ndarray:
    """(len(rows) // batch_size, batch_size): ``rows`` (a random order, a multiple of
    ``batch_size`` long) cut into windows of ``window`` batches, each sorted by length (stable:
    equal lengths keep their random order) and cut into batches, then all the batches put in
    ``rng``'s order."""
    windows = np.arange(len(rows)) // (window * batch_size)
    rows = rows[np.lexsort((lengths[rows], windows))]  # by window, then by length
    batches = rows.reshape(-1, batch_size)
    return batches[rng.permutation(len(batches))]
