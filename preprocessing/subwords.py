"""The tokenizer the examples are made with: a SentencePiece model this pipeline trains,
or a published BERT's WordPiece vocabulary given with ``--tokenizer``.

``TokenizerModel`` is what travels through the pipeline (a Beam side input): its kind and
the serialized model (``spm.model`` bytes, or a Hugging Face ``tokenizer.json``). Each
worker turns it into an ``Encoder`` once. Both kinds give a data dir whose
``tokenizer/`` loads with ``AutoTokenizer.from_pretrained``, and whose manifest records
the vocabulary size, the special ids and the fingerprint (``TokenizerModel.fingerprint``)
that training and fine-tuning check.

WordPiece is there to continue pretraining a published BERT (``bert-base-chinese``,
multilingual BERT, ``bert-base-cased``) on a new corpus: its ids must be the model's, so
the tokenizer is used as given, casing and Chinese-character splitting included.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os

import numpy as np

from preprocessing import examples, vocab
from preprocessing.text_formats import InputError

SENTENCEPIECE, WORDPIECE = "sentencepiece", "wordpiece"
log = logging.getLogger(__name__)
WORDPIECE_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class TokenizerModel:
    kind: str
    data: bytes

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of what decides the ids: the ``spm.model`` bytes, or for WordPiece the
        tokenizer.json's vocabulary, added tokens, model settings, normalizer and pre-tokenizer.
        Not the whole file: saving it through ``BertTokenizerFast`` (a data dir's ``tokenizer/``,
        an export) rewrites its post-processor, and the same vocabulary got another fingerprint."""
        if self.kind != WORDPIECE:
            return hashlib.sha256(self.data).hexdigest()
        spec = json.loads(self.data)
        model = dict(spec.get("model") or {})
        ids = sorted((model.pop("vocab", None) or {}).items(), key=lambda kv: kv[1])
        identity = {"model": model, "vocab": ids, "added_tokens": spec.get("added_tokens"),
                    "normalizer": spec.get("normalizer"), "pre_tokenizer": spec.get("pre_tokenizer")}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()

    @functools.cached_property
    def prefixless(self) -> bool:
        """A SentencePiece model trained without the dummy prefix (a language written without
        spaces): no "▁" marks a sentence's first word, so ``transforms.tokenize`` marks it."""
        return self.kind == SENTENCEPIECE and not vocab.read_model(self.data).add_dummy_prefix


# ---------------------------------------------------------------------------- loading --tokenizer
def load_given(path: str) -> TokenizerModel:
    """``--tokenizer PATH``: an ``spm.model`` file or a directory holding one (another
    run's ``OUTPUT/tokenizer``), or a BERT WordPiece tokenizer: a directory with
    ``tokenizer.json`` or ``vocab.txt`` (a downloaded model's dir), or either file."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    def read(p: str) -> bytes:
        with FileSystems.open(p, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return f.read()

    is_dir = not os.path.splitext(path)[1]
    spm = path if path.endswith(".model") else FileSystems.join(path, vocab.SPM_MODEL_FILE) if is_dir else None
    if spm and FileSystems.exists(spm):
        return _checked_sentencepiece(read(spm), spm)
    if path.endswith((".json", ".txt")) or is_dir and (
            FileSystems.exists(FileSystems.join(path, WORDPIECE_FILE))
            or FileSystems.exists(FileSystems.join(path, "vocab.txt"))):
        return TokenizerModel(WORDPIECE, _wordpiece_json(path))
    raise InputError(f"--tokenizer {path}: no tokenizer there (give an spm.model file or a directory holding "
                     "one, or a BERT tokenizer: a directory with tokenizer.json or vocab.txt, or one of those files)")


def _checked_sentencepiece(proto: bytes, where: str) -> TokenizerModel:
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_proto=proto)
    except RuntimeError as err:
        raise InputError(f"--tokenizer {where}: not a SentencePiece model ({err})") from None
    return TokenizerModel(SENTENCEPIECE, proto)


def _wordpiece_json(path: str) -> bytes:
    """The ``tokenizer.json`` of a BERT WordPiece tokenizer, made from ``vocab.txt`` when
    that is all there is (casing from ``tokenizer_config.json``'s ``do_lower_case``, or,
    without one, from the vocabulary: a vocabulary with capitalized words is cased)."""
    from tokenizers import BertWordPieceTokenizer, Tokenizer

    local = _local_copy(path)
    try:
        if local.endswith(".json"):
            backend = Tokenizer.from_file(local)
        else:
            folder = local if os.path.isdir(local) else os.path.dirname(local)
            if os.path.isfile(os.path.join(folder, WORDPIECE_FILE)) and not local.endswith(".txt"):
                backend = Tokenizer.from_file(os.path.join(folder, WORDPIECE_FILE))
            else:
                vocab_file = local if local.endswith(".txt") else os.path.join(folder, "vocab.txt")
                with open(vocab_file, encoding="utf-8", newline="") as f:
                    # As the tokenizers library reads it: lines end at \n, each token trimmed at its end.
                    lines = [line.rstrip() for line in f.read().split("\n")]
                if lines and lines[-1] == "":
                    lines.pop()  # the last line's \n
                _warn_of_repeated_tokens(vocab_file if local == path else path, lines)
                _check_special_tokens(path, set(lines))
                lower = _do_lower_case(folder, vocab_file)
                # BERT's own pipeline (clean text, split CJK characters, strip accents when
                # lowercasing), as BertTokenizerFast builds it from a vocab.txt.
                backend = BertWordPieceTokenizer(vocab_file, lowercase=lower)._tokenizer
    except InputError:
        raise
    except Exception as err:  # tokenizers raises plain Exception subclasses on bad files
        raise InputError(f"--tokenizer {path}: not a readable BERT tokenizer ({err})") from None
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "WordPiece":
        raise InputError(f"--tokenizer {path}: a {model.get('type')} tokenizer.json; only WordPiece (BERT) "
                         "tokenizers are read this way, SentencePiece models as spm.model")
    _check_special_tokens(path, backend.get_vocab(with_added_tokens=True))
    words = [t for t in backend.get_vocab(with_added_tokens=False) if t not in vocab.SPECIAL_TOKENS]
    if not words:  # what a BertTokenizerFast(vocab_file=...) may save: it failed in a Beam worker, a traceback
        raise InputError(f"--tokenizer {path}: its tokenizer.json holds the special tokens alone, no vocabulary"
                         + ("; pass the vocab.txt beside it" if os.path.isdir(local) and os.path.isfile(
                             os.path.join(local, "vocab.txt")) else ""))
    backend.no_truncation()
    backend.no_padding()
    return backend.to_str().encode("utf-8")


def _warn_of_repeated_tokens(path: str, lines: list[str]) -> None:
    """A vocab.txt gives each token its line's number as id; a token on two lines keeps the later id,
    and the earlier is never produced (published vocabularies have such lines: the multilingual
    uncased BERT's). The ids then reach past the count of distinct tokens, so the vocabulary's size
    is taken from the largest id (``Encoder``), as the model's embeddings have that many rows."""
    seen: dict[str, int] = {}
    repeated = []
    for number, token in enumerate(lines, 1):
        if token in seen:
            repeated.append((number, token, seen[token]))
        seen[token] = number
    if repeated:
        number, token, first = repeated[0]
        log.warning("--tokenizer %s: %d token(s) on two lines, e.g. %r on lines %d and %d; the later line's id "
                    "is used, the earlier id is never produced", path, len(repeated), token, first, number)


def _check_special_tokens(path: str, tokens) -> None:
    missing = [t for t in vocab.SPECIAL_TOKENS if t not in tokens]
    if missing:
        raise InputError(f"--tokenizer {path}: the vocabulary has no {', '.join(missing)}; BERT's special "
                         f"tokens {', '.join(vocab.SPECIAL_TOKENS)} are needed")


def _local_copy(path: str) -> str:
    """A local path for ``path`` (tokenizers reads local files only)."""
    if "://" not in path:
        return path
    import tempfile

    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    local = tempfile.mkdtemp(prefix="tokenizer-")
    names = [path] if os.path.splitext(path)[1] else [
        FileSystems.join(path, n) for n in (WORDPIECE_FILE, "vocab.txt", "tokenizer_config.json")]
    for name in names:
        if FileSystems.exists(name):
            with FileSystems.open(name, compression_type=CompressionTypes.UNCOMPRESSED) as src, \
                    open(os.path.join(local, os.path.basename(name)), "wb") as dst:
                dst.write(src.read())
    return os.path.join(local, os.path.basename(path)) if os.path.splitext(path)[1] else local


def _do_lower_case(folder: str, vocab_file: str) -> bool:
    config = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            value = json.load(f).get("do_lower_case")
        if value is not None:
            return bool(value)
    with open(vocab_file, encoding="utf-8") as f:
        return not any(line[:1].isupper() and not line.startswith("[") for line in f)


# ---------------------------------------------------------------------------- encoding
class Encoder:
    """Encodes sentences to ids with a ``TokenizerModel``; built once per worker process."""

    def __init__(self, model: TokenizerModel):
        self.model = model
        if model.kind == SENTENCEPIECE:
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_proto=model.data)
            ids = {t: self._sp.piece_to_id(t) for t in vocab.SPECIAL_TOKENS}
            size = self._sp.get_piece_size()
            word_start = vocab.word_start_table(model.data)
            self.offset_unit = "byte"
        else:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(model.data.decode("utf-8"))
            ids = {t: self._tok.token_to_id(t) for t in vocab.SPECIAL_TOKENS}
            # The largest id + 1, not the count of distinct tokens: a vocab.txt with a token on two lines
            # leaves an id unused, and a published model's embeddings have a row for every line.
            size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
            word_start = wordpiece_word_starts(self._tok.get_vocab(with_added_tokens=True), size)
            self.offset_unit = "char"
        self.prefixless = model.prefixless
        self.special_ids = ids
        self.unk_id = ids[vocab.UNK]
        self.info = examples.VocabInfo(
            vocab_size=size, cls_id=ids[vocab.CLS], sep_id=ids[vocab.SEP], mask_id=ids[vocab.MASK],
            special_ids=tuple(sorted(ids.values())), word_start=word_start)

    def encode(self, sentences: list[str]) -> list[list[int]]:
        if self.model.kind == SENTENCEPIECE:
            # One call per document: SentencePiece's batch encode is ~20% faster than a loop.
            return self._sp.encode(sentences, num_threads=1)
        # encode_batch_fast skips the character offsets: 12-15% less CPU, the same ids.
        return [e.ids for e in self._tok.encode_batch_fast(sentences, add_special_tokens=False)]

    def encode_with_begins(self, sentences: list[str]) -> list[tuple[list[int], list[int]]]:
        """(ids, where each token begins in its sentence, in ``offset_unit``) per sentence."""
        if self.model.kind == SENTENCEPIECE:
            return [([p.id for p in t.pieces], [p.begin for p in t.pieces])
                    for t in self._sp.encode(sentences, return_type="proto", num_threads=1)]
        return [(e.ids, [start for start, _ in e.offsets])
                for e in self._tok.encode_batch(sentences, add_special_tokens=False)]


def wordpiece_word_starts(token_ids: dict[str, int], size: int) -> np.ndarray:
    """bool[size]: a WordPiece token starts a word unless it is a "##" continuation."""
    table = np.ones(size, bool)
    for token, i in token_ids.items():
        if token.startswith("##") and len(token) > 2:
            table[i] = False
    return table


def manifest_fields(model: TokenizerModel, model_type: str) -> dict:
    """The manifest's ``tokenizer`` fields other than its path."""
    encoder = Encoder(model)
    fields = {
        "kind": model.kind,
        "fingerprint": model.fingerprint,
        "vocab_size": encoder.info.vocab_size,
        "model_type": model_type if model.kind == SENTENCEPIECE else "wordpiece",
        "special_ids": {t.strip("[]").lower(): i for t, i in encoder.special_ids.items()},
    }
    if model.kind == WORDPIECE:
        fields["lowercase"] = lowercases(json.loads(model.data)["normalizer"])
    return fields


def lowercases(normalizer: dict | None) -> bool:
    """Whether a tokenizer.json's normalizer lowercases: BERT's own (``BertNormalizer``,
    ``lowercase``), or a ``Lowercase`` step, alone or in a ``Sequence`` (the layout of the
    tokenizers library's BERT recipe, NFD + Lowercase + StripAccents), which was read as cased:
    the data dir's tokenizer then did not lowercase what the data was encoded lowercased."""
    if not normalizer:
        return False
    if normalizer.get("type") == "Lowercase":
        return True
    if normalizer.get("type") == "Sequence":
        return any(lowercases(step) for step in normalizer.get("normalizers") or ())
    return bool(normalizer.get("lowercase", False))


# ---------------------------------------------------------------------------- writing
def write_files(model: TokenizerModel, out_dir: str, max_seq_length: int) -> None:
    """Writes the tokenizer files into the local ``out_dir``: SentencePiece's (see
    ``vocab.write_tokenizer``), or for WordPiece a ``BertTokenizerFast`` (tokenizer.json,
    vocab.txt, configs), which loads as the published model's own tokenizer does."""
    if model.kind == SENTENCEPIECE:
        vocab.write_tokenizer(model.data, out_dir, max_seq_length)
        return
    from tokenizers import Tokenizer
    from transformers import BertTokenizerFast

    backend = Tokenizer.from_str(model.data.decode("utf-8"))
    lowercase = lowercases(json.loads(model.data)["normalizer"])
    tokenizer = BertTokenizerFast(tokenizer_object=backend, do_lower_case=lowercase,
                                  model_max_length=max_seq_length, unk_token=vocab.UNK, pad_token=vocab.PAD,
                                  cls_token=vocab.CLS, sep_token=vocab.SEP, mask_token=vocab.MASK)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        by_id = sorted(backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        f.writelines(token + "\n" for token, _ in by_id)
