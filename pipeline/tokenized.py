"""Tokenized texts held as flat arrays, for fine-tuning's splits and for embeddings.

Python lists of token ids cost about 7 KB a row of 40 tokens (each id its own object), on
every rank for a whole run: 14 GB a rank for a 2M-row table. Here a row is a slice of one
int32 array (int8 for the segment ids), about 5 bytes a token, and the tokenizer's own
lists live for one chunk of rows only.
"""

from __future__ import annotations

import itertools

import numpy as np

CHUNK = 20_000  # rows tokenized at once


class Ragged:
    """Rows of unequal length in one flat array: row i is ``values[offsets[i]:offsets[i + 1]]``."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        self.values, self.offsets = values, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def tokenize(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int
             ) -> tuple[Ragged, Ragged, int]:
    """(token ids, segment ids, rows cut) of ``texts`` (with ``pairs``) cut at ``max_length``.

    A row of exactly ``max_length`` tokens lost nothing (all at the limit were counted as cut): a
    fast tokenizer says which rows it cut (``Encoding.overflowing``); with a slow one, rows at the
    limit are tokenized again, one token further."""
    ids, types, lengths, truncated = [], [], [], 0
    for start in range(0, len(texts), CHUNK):
        chunk = texts[start:start + CHUNK]
        chunk_pairs = pairs[start:start + CHUNK] if pairs is not None else None
        enc = tokenizer(chunk, chunk_pairs, truncation=True, max_length=max_length, return_token_type_ids=True)
        ids.append(np.fromiter(itertools.chain.from_iterable(enc["input_ids"]), dtype=np.int32))
        types.append(np.fromiter(itertools.chain.from_iterable(enc["token_type_ids"]), dtype=np.int8))
        lengths.extend(len(row) for row in enc["input_ids"])
        if getattr(enc, "encodings", None) is not None:
            truncated += sum(1 for encoding in enc.encodings if encoding.overflowing)
            continue
        at_limit = [k for k, row in enumerate(enc["input_ids"]) if len(row) >= max_length]
        if at_limit:
            longer = tokenizer([chunk[k] for k in at_limit], [chunk_pairs[k] for k in at_limit] if chunk_pairs
                               else None, truncation=True, max_length=max_length + 1)["input_ids"]
            truncated += sum(len(row) > max_length for row in longer)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat_ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    flat_types = np.concatenate(types) if types else np.zeros(0, np.int8)
    return Ragged(flat_ids, offsets), Ragged(flat_types, offsets), truncated
