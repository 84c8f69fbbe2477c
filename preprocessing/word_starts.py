"""Per-token word starts from a word segmenter, for whole-word masking of Chinese.

Chinese has no spaces, so a subword vocabulary's pieces say nothing about words: a
SentencePiece piece can hold part of a word or span two, and a WordPiece vocabulary
splits every Han character. BERT-wwm (Cui et al. 2019) masks all the pieces of a word
that a segmenter found. Here the segmenter is jieba (on PyPI, ships its dictionary, no
download at run time).

Alignment: a token continues a word when its first character lies strictly inside a
segmenter word; otherwise it starts one. A token that spans a word boundary belongs to
the word it starts in, so the groups stay contiguous runs of tokens, which is what the
masking step needs. Offsets come from the tokenizer (SentencePiece: UTF-8 bytes of the
input; Hugging Face tokenizers: characters).

Speed: jieba's default mode segments about 0.5-1 MB of Chinese per second per core, the
slowest step of a Chinese run with whole-word masking; without it nothing is segmented.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)
_JIEBA = None


def _jieba():
    global _JIEBA
    if _JIEBA is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)  # its "Building prefix dict" banner, once per worker
        tokenizer = jieba.Tokenizer()
        tokenizer.initialize()
        _JIEBA = tokenizer
    return _JIEBA


def inside_word(sentence: str, unit: str) -> np.ndarray:
    """bool per offset unit (``"byte"``: UTF-8 bytes, ``"char"``: characters) of
    ``sentence``: True where the unit lies inside a jieba word, after its first character."""
    inside = np.zeros(len(sentence.encode("utf-8")) if unit == "byte" else len(sentence), bool)
    at = 0
    for word in _jieba().cut(sentence, HMM=True):
        size = len(word.encode("utf-8")) if unit == "byte" else len(word)
        first = len(word[0].encode("utf-8")) if unit == "byte" else 1
        inside[at + first:at + size] = True
        at += size
    return inside


def word_starts(sentence: str, token_begins: Sequence[int], unit: str) -> np.ndarray:
    """bool per token: True where the token starts a jieba word (see the module docstring)."""
    inside = inside_word(sentence, unit)
    begins = np.asarray(token_begins, dtype=np.int64)
    starts = np.ones(len(begins), bool)
    within = begins < len(inside)
    starts[within] = ~inside[begins[within]]
    return starts
