"""The SentencePiece vocabulary: training, the Hugging Face tokenizer files, word starts.

One serialized SentencePiece model (``spm.model``) is the vocabulary of record. The
preprocessing tokenizes with SentencePiece itself; fine-tuning and ``pipeline("fill-mask")``
load the same vocabulary through ``AutoTokenizer.from_pretrained(OUTPUT/tokenizer)``, a fast
(``tokenizers``) tokenizer built here from the model's own pieces, scores and normalization
table. It gives SentencePiece's ids for text without special token strings, with one
measured exception: a unigram segmentation that ties exactly ("111" as 1+11 or 11+1) is
decided by SentencePiece's float32 rounding, tokenizers sums in float64. On the bundled
samples: 0 of 51,036 prose sentences differ, 9 of 60,000 raw wikitext lines (digit tables,
runs of dashes); BPE: none. tests/test_vocab.py checks this on real text.

Every model has ``SPECIAL_TOKENS`` at ids 0..4. [CLS], [SEP] and [MASK] are SentencePiece
*control* symbols: SentencePiece never produces them from text, so a literal "[MASK]" in
the corpus stays text in the training data. The Hugging Face tokenizer, like BERT's,
does map a typed "[MASK]" (or "[CLS]", ...) to its special id: that is how fill-mask
input is written.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import os
import re
import string
import threading
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import sentencepiece

from preprocessing.language import UNSPACED_SCRIPT

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD, UNK, CLS, SEP, MASK = SPECIAL_TOKENS
MODEL_TYPES = ("unigram", "bpe")
SPM_MODEL_FILE = "spm.model"

# Unigram training sums per-thread expected counts, so its pieces depend on the number of
# threads (measured: 1, 2, 4 and 16 threads give four different vocabularies; the same
# count gives identical bytes on every run). The default is therefore a fixed number, not
# os.cpu_count(), so that the same sample gives the same vocabulary on any machine. BPE
# pieces do not depend on it; the count is recorded in the model's trainer_spec either way.
DEFAULT_NUM_THREADS = 8
# SentencePiece skips training sentences longer than this (its default is 4192 bytes,
# shorter than some Wikipedia sentences, e.g. long lists split on no full stop).
MAX_SENTENCE_BYTES = 1 << 16
CHARACTER_COVERAGE = 0.9995


class VocabError(ValueError):
    """Training input or settings SentencePiece cannot use; the message names the flag."""


# ---------------------------------------------------------------------------- training
TRAINING_THREAD = "sentencepiece-training"


def _stoppable(train: Callable[[Iterator[str]], None], sentences: Iterator[str]) -> None:
    """``train(sentences)`` in a thread that the caller waits on. SentencePiece trains in C++ for
    minutes with the GIL released, but Python runs a signal's handler in the main thread only,
    between two of its own instructions: called there directly, a Ctrl-C or run_beam.py's SIGTERM
    waited for the training's end. The thread is a daemon, left to the process's exit, but not
    while SentencePiece still pulls sentences: a thread that calls into Python while the
    interpreter shuts down aborts the process (exit 134). So a stop makes the next pull raise,
    which ends the loading at once, and waits for that."""
    if threading.current_thread() is not threading.main_thread():
        train(sentences)  # no handler runs here anyway (a Beam worker's thread)
        return
    stopping, loaded = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    def feed() -> Iterator[str]:
        for sentence in sentences:
            if stopping.is_set():
                raise KeyboardInterrupt("stopped while loading the vocabulary's sentences")
            yield sentence
        loaded.set()

    def run() -> None:
        try:
            train(feed())
        except BaseException as err:  # noqa: BLE001 - raised again in the caller's thread
            failure.append(err)
        finally:
            loaded.set()  # no more pulls: a failure, or the end

    thread = threading.Thread(target=run, name=TRAINING_THREAD, daemon=True)
    thread.start()
    try:
        thread.join()  # a lock wait: a signal's handler runs, and its exception ends the wait
    except BaseException:
        stopping.set()
        loaded.wait(timeout=30)  # one more pull at most, then SentencePiece gives up
        raise
    if failure:
        raise failure[0]


def train_sentencepiece(sentences: Iterable[str], vocab_size: int, model_type: str,
                        num_threads: int = DEFAULT_NUM_THREADS,
                        character_coverage: float = CHARACTER_COVERAGE, add_dummy_prefix: bool = True) -> bytes:
    """Trains a SentencePiece model in memory and returns the serialized model proto.

    ``add_dummy_prefix=False`` for languages written without spaces
    (``language.written_without_spaces``): no "▁" is put before each sentence.

    ``sentences`` is used in full and in order (SentencePiece's own sampling and shuffling
    are off: the caller passes a deterministic sample), so the same sentences, size, type
    and ``num_threads`` give identical bytes. ``vocab_size`` is an upper bound: a corpus
    too small for it gives fewer pieces; read the size from the model.
    """
    if model_type not in MODEL_TYPES:
        raise VocabError(f"--model-type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise VocabError(f"--vocab-size {vocab_size} is too small: the {len(SPECIAL_TOKENS)} special "
                         "tokens alone take that many ids")
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    too_long = [0]
    remaining = _fitting(sentences, too_long)
    # SentencePiece skips empty lines; one non-empty sentence is needed to train at all.
    first = next((s for s in remaining if s.strip()), None)
    if first is None and too_long[0]:
        raise VocabError(f"no sentences to train the vocabulary on: all {too_long[0]:,} are longer than "
                         f"{MAX_SENTENCE_BYTES // 1024} KiB (text without sentence punctuation, such as one "
                         "document a line with no full stops?)")
    if first is None:
        raise VocabError("no sentences to train the vocabulary on: the input has no text "
                         "(check --input and the documents-read counters)")

    model = io.BytesIO()
    try:
        _stoppable(lambda feed: sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=feed,
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            pad_id=0, pad_piece=PAD,
            unk_id=1, unk_piece=UNK,
            bos_id=-1, eos_id=-1,
            control_symbols=[CLS, SEP, MASK],  # ids 2, 3, 4: the next free ids, in order
            character_coverage=character_coverage,
            byte_fallback=False,
            add_dummy_prefix=add_dummy_prefix,
            # Without the prefix, "▁" enters training only where the text has spaces: below
            # --character-coverage, a space would become [UNK] and fuse its neighbours into one.
            required_chars="" if add_dummy_prefix else "▁",
            max_sentence_length=MAX_SENTENCE_BYTES,
            input_sentence_size=0,  # 0 = every sentence, no reservoir sampling
            shuffle_input_sentence=False,
            num_threads=num_threads,
            minloglevel=1,  # warnings and errors only: its INFO log is thousands of lines
        ), itertools.chain([first], remaining))
    except RuntimeError as err:
        raise VocabError(_explain_training_error(str(err), vocab_size, character_coverage)) from err
    if too_long[0]:
        log.warning("%s sentence(s) of the vocabulary sample are longer than %d KiB and were left out of "
                    "the vocabulary's training (text without sentence punctuation?); the examples keep "
                    "them", f"{too_long[0]:,}", MAX_SENTENCE_BYTES // 1024)
    return model.getvalue()


def _fitting(sentences: Iterable[str], too_long: list[int]) -> Iterator[str]:
    """The sentences SentencePiece trains on: it drops one over MAX_SENTENCE_BYTES with a
    warning of its own only, which left a corpus of such sentences with an empty error."""
    for sentence in sentences:
        if len(sentence) * 4 > MAX_SENTENCE_BYTES and len(sentence.encode("utf-8")) > MAX_SENTENCE_BYTES:
            too_long[0] += 1
            continue
        yield sentence


def _explain_training_error(message: str, vocab_size: int, coverage: float = CHARACTER_COVERAGE) -> str:
    # SentencePiece's text: "INTERNAL: src/trainer_interface.cc(638) [<the failed check>]
    # Vocabulary size is smaller than required_chars. 40 vs 63. Increase vocab_size or ..."
    reason = message.rsplit("] ", 1)[-1].strip() or message.strip()
    sizes = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", reason)
    if sizes:
        return (f"--vocab-size {vocab_size} is too small for this corpus: the special tokens and "
                f"the characters that cover {coverage:.2%} of its text (--character-coverage) need "
                f"{sizes.group(2)} ids; raise --vocab-size to at least that")
    return f"SentencePiece could not train the vocabulary (--vocab-size {vocab_size}): {reason}"


# ---------------------------------------------------------------------------- reading the model
# Piece types and model types of sentencepiece_model.proto.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2


@dataclasses.dataclass(frozen=True)
class SpmModel:
    """The fields of a serialized SentencePiece ModelProto that the tokenizer files need."""

    pieces: tuple[str, ...]
    scores: tuple[float, ...]
    types: tuple[int, ...]
    model_type: str
    unk_id: int
    byte_fallback: bool
    precompiled_charsmap: bytes
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool


def read_model(model_proto: bytes) -> SpmModel:
    """Parses the model proto's wire format directly.

    Not through ``sentencepiece_model_pb2``: the one in the sentencepiece 0.2.3 wheel is
    generated for a newer protobuf runtime than many environments have (here 6.33: it
    raises VersionError on import, and so does transformers' SentencePiece converter,
    which imports it first). The handful of fields needed here is 30 lines to read.
    """
    pieces, scores, types = [], [], []
    trainer: dict = {}
    normalizer: dict = {}
    try:
        for field, value in _fields(model_proto):
            if field == 1:  # repeated SentencePiece {piece = 1; score = 2; type = 3}
                piece = dict(_fields(value))
                pieces.append(piece.get(1, b"").decode("utf-8"))
                scores.append(float(np.frombuffer(piece.get(2, b"\0\0\0\0"), "<f4")[0]))
                types.append(piece.get(3, NORMAL))
            elif field == 2:
                trainer = dict(_fields(value))
            elif field == 3:
                normalizer = dict(_fields(value))
    except (IndexError, TypeError, ValueError) as err:  # truncated or not a protobuf at all
        raise VocabError(f"not a SentencePiece model: {err}") from err
    model_type = {_UNIGRAM: "unigram", _BPE: "bpe"}.get(trainer.get(3, _UNIGRAM))
    if model_type is None or not pieces:
        raise VocabError(f"not a unigram or BPE SentencePiece model (model_type={trainer.get(3)}, "
                         f"{len(pieces)} pieces)")
    return SpmModel(
        pieces=tuple(pieces), scores=tuple(scores), types=tuple(types), model_type=model_type,
        unk_id=trainer.get(40, 0), byte_fallback=bool(trainer.get(35, 0)),
        precompiled_charsmap=normalizer.get(2, b""),
        add_dummy_prefix=bool(normalizer.get(3, 1)),
        remove_extra_whitespaces=bool(normalizer.get(4, 1)),
        escape_whitespaces=bool(normalizer.get(5, 1)))


def _fields(buf: bytes):
    """(field number, value) pairs of a protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield field, value


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return result, pos
        shift += 7


# ---------------------------------------------------------------------------- word starts
_PUNCTUATION = frozenset(string.punctuation)


def word_start_table(model_proto: bytes) -> np.ndarray:
    """bool[vocab_size]: True where a piece starts a new word (for whole-word masking).

    ALBERT's rule for SentencePiece vocabularies, made multilingual: a piece starts a word
    if it begins with "▁" or "<", is punctuation, or holds a character of a script written
    without spaces (Han, kana, Thai, …: no "▁" to go by); special, control and unknown
    pieces count as starts. A word is then a start piece plus the non-start pieces that
    follow it. ALBERT made every non-ASCII piece a start, which broke words of alphabetic
    scripts at each accented or non-Latin piece ("▁Gemüse hä nd ler": "hä" began a word) and
    made whole-word masking a no-op for Cyrillic, Greek or Arabic.
    """
    model = read_model(model_proto)
    table = np.zeros(len(model.pieces), dtype=bool)
    for i, (piece, kind) in enumerate(zip(model.pieces, model.types)):
        table[i] = (kind != NORMAL
                    or piece.startswith(("▁", "<"))
                    or all(c in _PUNCTUATION for c in piece)
                    or UNSPACED_SCRIPT.search(piece) is not None)
    return table


# ---------------------------------------------------------------------------- Hugging Face files
def build_backend_tokenizer(model_proto: bytes):
    """A ``tokenizers.Tokenizer`` that encodes text to SentencePiece's ids.

    SentencePiece normalizes the whole text (its precompiled NFKC table, then: drop leading
    and trailing spaces, collapse runs of spaces, prepend "▁" unless the model was trained
    without that dummy prefix, spaces to "▁") and then
    segments it. The same steps here, as a normalizer, so that they also apply to each
    piece of text between special tokens. The Metaspace pre-tokenizer only splits at "▁":
    no piece has "▁" inside (split_by_whitespace), so segmenting word by word gives
    SentencePiece's segmentation of the whole string.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE, Unigram

    model = read_model(model_proto)
    if model.byte_fallback or not (model.remove_extra_whitespaces and model.escape_whitespaces):
        raise VocabError("the SentencePiece model must use byte_fallback=false and the default "
                         "whitespace handling (add_dummy_prefix may be off); train it with train_sentencepiece")
    ids = {piece: i for i, piece in enumerate(model.pieces)}
    if tuple(ids.get(t) for t in SPECIAL_TOKENS) != tuple(range(len(SPECIAL_TOKENS))):
        raise VocabError(f"the SentencePiece model must have {', '.join(SPECIAL_TOKENS)} at ids 0-4")

    if model.model_type == "unigram":
        backend = Tokenizer(Unigram(list(zip(model.pieces, model.scores)), unk_id=model.unk_id,
                                    byte_fallback=False))
    else:
        backend = Tokenizer(BPE(ids, _bpe_merges(model), unk_token=model.pieces[model.unk_id],
                                fuse_unk=True, byte_fallback=False, dropout=None))

    # NFC first: tokenizers applies the charsmap per grapheme with a shortest-prefix match
    # and drops the rest of the grapheme (huggingface/tokenizers#2116, #2334), which loses
    # accents of decomposed (NFD) text. Composed first, the charsmap sees single code
    # points, where it agrees with SentencePiece on all 1,112,064 of them, and on the NFD
    # form of every sample sentence (without NFC: 6 of 22,130 differ). Still different:
    # made-up stacks of 2+ combining marks on one letter (zalgo text), which no setting fixes.
    steps = [normalizers.NFC(), normalizers.Precompiled(model.precompiled_charsmap)] \
        if model.precompiled_charsmap else []
    # SentencePiece's add_dummy_prefix puts "▁" before the text, not before each piece of it after a
    # special token: "the [MASK]." gave "[MASK]", "▁", "." (an extra token pretraining never showed
    # after a mask) with a "▁" prepended to every piece. So the pre-tokenizer prepends it, to the
    # first piece only, and a piece after a special token keeps its leading space ("[MASK] city":
    # " city", "▁city"); a first piece begins with none (stripped), so it gets exactly one.
    backend.normalizer = normalizers.Sequence(steps + [
        normalizers.Replace(Regex(" {2,}"), " "),
        normalizers.Replace(Regex(r"\A +| +\z" if not model.add_dummy_prefix else r" +\z"), ""),
        normalizers.Replace(" ", "▁"),
    ])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if model.add_dummy_prefix else "never", split=True)
    # "always" drops the "▁" the normalizer put before the text; without one, nothing is dropped.
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always" if model.add_dummy_prefix
                                         else "never", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0",
        pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, ids[CLS]), (SEP, ids[SEP])],
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return backend


def _bpe_merges(model: SpmModel) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose concatenation is the piece with the
    highest score; as a merge list: every split of every piece into two pieces, ordered by
    the score of the result (then by id, as SentencePiece's training added them)."""
    ids = {piece: i for i, piece in enumerate(model.pieces)}
    ranked = []
    for i, (piece, kind) in enumerate(zip(model.pieces, model.types)):
        if kind != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids \
                    and model.types[ids[left]] == NORMAL and model.types[ids[right]] == NORMAL:
                ranked.append((-model.scores[i], i, ids[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def write_tokenizer(model_proto: bytes, out_dir: str, max_seq_length: int) -> None:
    """Writes ``spm.model`` and the Hugging Face tokenizer files into the local ``out_dir``.

    ``AutoTokenizer.from_pretrained(out_dir)`` then loads a fast tokenizer with BERT's
    input format ([CLS] A [SEP] B [SEP], token_type_ids 0/1) and special tokens, and
    ``model_max_length = max_seq_length``.
    """
    from transformers import PreTrainedTokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_backend_tokenizer(model_proto),
        pad_token=PAD, unk_token=UNK, cls_token=CLS, sep_token=SEP, mask_token=MASK,
        model_max_length=max_seq_length,
        # transformers 5 returns only input_ids and attention_mask unless told otherwise.
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        # The Metaspace decoder restores SentencePiece's spacing; "clean-up" would then
        # remove real spaces before punctuation ("a ." -> "a.").
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(out_dir)
    make_tokenizer_config_portable(out_dir)
    with open(os.path.join(out_dir, SPM_MODEL_FILE), "wb") as f:
        f.write(model_proto)


def make_tokenizer_config_portable(out_dir: str) -> None:
    """Rewrites what transformers 5's ``save_pretrained`` put in ``tokenizer_config.json`` that
    transformers 4 cannot load or that says where it was loaded from: the class recorded as
    "TokenizersBackend", a name 4 cannot resolve ("PreTrainedTokenizerFast", an alias of it in 5,
    loads the same in both), and ``is_local``/``local_files_only`` of a tokenizer read from a folder."""
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
