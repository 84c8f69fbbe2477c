"""What a corpus's language decides: sentence rules, word segmentation for whole-word
masking, script conversion, and the vocabulary's character coverage.

A language is data, not code: ``--language`` (default: the ``xml:lang`` of the first
MediaWiki dump among the inputs, else ``en``) selects tables; the choices are recorded
in the manifest so that a data dir says how it was made.
"""

from __future__ import annotations

import dataclasses
import re

CHINESE = ("zh", "zho", "chi", "cmn", "yue", "wuu", "gan", "hsn", "lzh")
# Languages written without spaces between words (ISO 639-1 and -3 codes): Chinese, Japanese,
# Thai, Lao, Myanmar, Khmer, Tibetan. Korean is written with spaces.
UNSPACED_LANGUAGES = (*CHINESE, "ja", "jpn", "th", "tha", "lo", "lao", "my", "mya", "bur", "km", "khm",
                      "bo", "bod", "tib")
# OpenCC's conversions (opencc on PyPI ships their tables; all of these since 1.1.6, the oldest
# release allowed): Traditional → Simplified and back, the regional variants to and from
# Traditional, and Japanese shinjitai to and from Traditional.
CONVERSIONS = ("t2s", "s2t", "tw2s", "hk2s", "s2tw", "s2hk", "t2tw", "t2hk", "tw2sp", "s2twp", "tw2t", "hk2t",
               "t2jp", "jp2t")
WHOLE_WORD_CHOICES = ("none", "auto", "pieces", "jieba")


def canonical_code(code: str) -> str:
    """BCP 47's spelling of a code given as ``zh_tw``, ``ZH-hant`` or ``de-ch``: ``zh-TW``,
    ``zh-Hant``, ``de-CH`` (language lower, script title, region upper), as the manifest and the
    model card's ``language:`` record it; the tables read it case-blind."""
    parts = code.strip().replace("_", "-").split("-")
    out = [parts[0].lower()]
    for part in parts[1:]:
        if len(part) == 4 and part.isalpha():
            out.append(part.title())
        elif len(part) == 2 and part.isalpha() or len(part) == 3 and part.isdigit():
            out.append(part.upper())
        else:
            out.append(part.lower())
    return "-".join(out)


def base_language(code: str) -> str:
    """``zh-hans`` → ``zh``, ``de-CH`` → ``de``: the part the rule tables are keyed by."""
    return code.replace("_", "-").split("-", 1)[0].lower()


# Scripts written without spaces between words: Thai, Lao, Tibetan, Myanmar, Khmer, CJK radicals
# and punctuation, kana, Bopomofo, Han, Yi, full-width forms (Hangul is spaced: Korean is not here).
# Whole-word masking makes each of their pieces a word start; wrapped lines of them join without a space.
UNSPACED_SCRIPT = re.compile(r"[\u0e00-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff\u2e80-\u2fdf"
                             r"\u3000-\u31ff\u3400-\u4dbf\u4e00-\u9fff\ua000-\ua4cf\uf900-\ufaff"
                             r"\uff00-\uffef\U00020000-\U0003ffff]")


def written_without_spaces(code: str) -> bool:
    """Whether the vocabulary is trained without SentencePiece's dummy prefix: a "▁" before
    every sentence marks a word boundary where spaces separate words; where none do, it is
    a token of its own before most sentences (7.5% of the Chinese sample's tokens, and as
    many trivial masked targets), never a word boundary."""
    return base_language(code) in UNSPACED_LANGUAGES


def default_segmenter(code: str) -> str:
    """What ``--whole-word-mask`` (without a value) means for a language: jieba words for
    Chinese, as BERT-wwm (Cui et al. 2019) does; the vocabulary's own word starts
    (pieces that begin with "▁" or "##" mark) for languages written with spaces."""
    return "jieba" if base_language(code) in CHINESE else "pieces"


@dataclasses.dataclass(frozen=True)
class Converter:
    """Script conversion with OpenCC, loaded once per worker process (its tables take
    ~50 ms to load) and picklable for Beam: only the config name travels."""

    name: str

    def __post_init__(self):
        if self.name not in CONVERSIONS:
            raise ValueError(f"--convert must be one of {', '.join(CONVERSIONS)}, got {self.name!r}")

    def __call__(self, text: str) -> str:
        return _opencc(self.name).convert(text)


_CONVERTERS: dict = {}


def _opencc(name: str):
    if name not in _CONVERTERS:
        try:
            import opencc
        except ImportError as err:  # pragma: no cover - a declared dependency
            raise RuntimeError("--convert needs OpenCC: pip install opencc") from err
        _CONVERTERS[name] = opencc.OpenCC(name)
    return _CONVERTERS[name]
