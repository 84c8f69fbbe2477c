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

Traditional characters: jieba's dictionary is Simplified, and Traditional text split into
wrong words (臺/灣是, 半導/體/製/造/業). Each sentence is segmented through its Simplified copy
(OpenCC t2s, which leaves Simplified text as it is), whose words map back character for
character; a sentence whose copy changes length (no such case in the bundled sample) is
segmented as it is.

Speed: jieba's default mode segments about 0.2-0.5 MB of Chinese per second per core, the
slowest step of a Chinese run with whole-word masking (the t2s copy costs about 1% of it);
without it nothing is segmented.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from preprocessing.language import Converter

log = logging.getLogger(__name__)
_JIEBA = None
_TO_SIMPLIFIED = Converter("t2s")  # its OpenCC tables load on the first sentence, once per process


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
    simplified = _TO_SIMPLIFIED(sentence)
    segmented = simplified if len(simplified) == len(sentence) else sentence
    at = char = 0
    for word in _jieba().cut(segmented, HMM=True):
        original = sentence[char:char + len(word)]  # the sentence's own characters: their bytes differ
        char += len(word)
        size = len(original.encode("utf-8")) if unit == "byte" else len(original)
        first = len(original[0].encode("utf-8")) if unit == "byte" else 1
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
