"""The SentencePiece vocabulary and its Hugging Face tokenizer, on real text: Jane Austen's
novels and the Wikipedia dump sample."""

import bz2
import hashlib
import html
import json
import os
import re
import unicodedata

import numpy as np
import pytest
import sentencepiece

from preprocessing import subwords, vocab

from .conftest import AUSTEN

VOCAB_SIZE = 4000
# Not special-token strings, not found in the corpus as written: the cases a crude
# sentence split never produces (SentencePiece's whitespace rules, Unicode normalization,
# characters the vocabulary does not cover, which become [UNK]).
EDGE_CASES = [
    "", " ", "   ", "\t\n", "a", " a", "a ", "  Emma   Woodhouse,\thandsome,\n\nclever  ",
    "a\u00a0b\u3000c\u2009d", "ｆｕｌｌｗｉｄｔｈ　ＡＢＣ　１２３", "ﬁne ½ Ⅻ ㎏ ℃ №", "café naïve Ångström façade",
    unicodedata.normalize("NFD", "café naïve Ångström Tiếng Việt"), "cafe\u0301 x\u200by \u200b z",
    "“Quoted,” she said — ‘twice’ – «so» … 'plain' \"double\"", "1,234,567.89 £40 3.14159 2nd 1990s",
    "中文字符测试", "日本語のテキスト", "Привет, мир!", "Ἀριστοτέλης ἀρετή", "العربية", "😀 emoji 👍🏽 👨‍👩‍👧",
    "▁", "▁a", "a▁b", "a ▁ b", "x\u1680y", "\x00\x01control\x7f", "antidisestablishmentarianism" * 20,
    "word " * 400,
]


def austen_sentences():
    with bz2.open(AUSTEN, "rt", encoding="utf-8") as f:
        paragraphs = re.split(r"\n\s*\n", f.read())
    return [s.strip() for p in paragraphs for s in " ".join(p.split("\n")).split(". ") if s.strip()]


def wiki_sentences(xml: bytes):
    """Prose lines of the dump, crudely de-marked: refs, templates and link syntax dropped."""
    out = []
    for body in re.findall(r"<text[^>]*>(.*?)</text>", xml.decode("utf-8"), re.S):
        body = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", html.unescape(body), flags=re.S)
        for line in body.split("\n"):
            if len(line) < 20 or not line[0].isalpha():
                continue
            line = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", line)
            line = re.sub(r"\{\{[^{}]*\}\}", "", line).replace("'''", "").replace("''", "")
            out.extend(s for s in line.split(". ") if s.strip())
    return out


@pytest.fixture(scope="module")
def corpus(wiki_xml):
    """(training sentences, held-out sentences): 6,000 to train on, ~10,000 to compare."""
    austen, wiki = austen_sentences(), wiki_sentences(wiki_xml)
    train = austen[:3000] + wiki[:3000]
    held_out = austen[-4000:] + wiki[3000:9000]
    return train, held_out


@pytest.fixture(scope="module")
def protos(corpus):
    return {t: vocab.train_sentencepiece(corpus[0], VOCAB_SIZE, t) for t in vocab.MODEL_TYPES}


@pytest.fixture(scope="module")
def tokenizers(protos, tmp_path_factory):
    from transformers import AutoTokenizer

    loaded = {}
    for model_type, proto in protos.items():
        out = str(tmp_path_factory.mktemp(model_type) / "tokenizer")
        vocab.write_tokenizer(proto, out, max_seq_length=128)
        loaded[model_type] = (out, AutoTokenizer.from_pretrained(out),
                              sentencepiece.SentencePieceProcessor(model_proto=proto))
    return loaded


@pytest.mark.parametrize("model_type", vocab.MODEL_TYPES)
def test_special_tokens_have_fixed_ids(protos, model_type):
    sp = sentencepiece.SentencePieceProcessor(model_proto=protos[model_type])
    assert [sp.id_to_piece(i) for i in range(5)] == list(vocab.SPECIAL_TOKENS)
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, -1, -1)
    assert all(sp.is_control(i) for i in (2, 3, 4))
    # Control symbols: literal "[MASK]" in the corpus stays text, never the mask id.
    assert not {0, 2, 3, 4} & set(sp.encode("He typed [MASK] and [CLS] [SEP] [PAD]."))
    assert sp.get_piece_size() == VOCAB_SIZE


@pytest.mark.parametrize("model_type", vocab.MODEL_TYPES)
def test_training_is_deterministic(corpus, protos, model_type):
    again = vocab.train_sentencepiece(iter(corpus[0]), VOCAB_SIZE, model_type)
    assert again == protos[model_type]
    fingerprint = subwords.TokenizerModel(subwords.SENTENCEPIECE, again).fingerprint
    assert fingerprint == hashlib.sha256(again).hexdigest()
    assert fingerprint != subwords.TokenizerModel(subwords.SENTENCEPIECE, vocab.train_sentencepiece(
        corpus[0], VOCAB_SIZE - 1, model_type)).fingerprint


def test_a_small_corpus_gives_a_smaller_vocabulary(corpus):
    proto = vocab.train_sentencepiece(corpus[0][:300], 8000, "unigram")
    size = sentencepiece.SentencePieceProcessor(model_proto=proto).get_piece_size()
    assert 100 < size < 8000


def test_read_model_agrees_with_sentencepiece(protos):
    for model_type, proto in protos.items():
        sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        model = vocab.read_model(proto)
        assert model.model_type == model_type and model.unk_id == 1 and not model.byte_fallback
        assert list(model.pieces) == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        assert np.array_equal(np.float32(model.scores),
                              np.float32([sp.get_score(i) for i in range(sp.get_piece_size())]))
        assert [i for i, t in enumerate(model.types) if t == vocab.CONTROL] == [0, 2, 3, 4]
        assert len(model.precompiled_charsmap) > 100_000  # nmt_nfkc


@pytest.mark.parametrize("model_type", vocab.MODEL_TYPES)
def test_hf_tokenizer_gives_sentencepiece_ids(corpus, tokenizers, model_type):
    _, tok, sp = tokenizers[model_type]
    held_out = corpus[1]
    # What the held-out text covers: accents and other non-ASCII, quotes, digits; and
    # variants with runs of whitespace, and in NFD (decomposed accents).
    non_ascii = [s for s in held_out if not s.isascii()]
    assert len(held_out) > 9000 and len(non_ascii) > 300
    assert sum('"' in s or "“" in s for s in held_out) > 300
    assert sum(any(c.isdigit() for c in s) for s in held_out) > 1000
    spaced = [re.sub(" ", "  \t", s, count=3) + "  " for s in held_out[::10]]
    texts = held_out + spaced + [unicodedata.normalize("NFD", s) for s in non_ascii] + EDGE_CASES

    expected = sp.encode(texts)
    got = tok(texts, add_special_tokens=False)["input_ids"]
    differ = [(t, tok.convert_ids_to_tokens(g), [sp.id_to_piece(i) for i in e])
              for t, g, e in zip(texts, got, expected) if g != e]
    assert not differ, f"{len(differ)} of {len(texts)} texts differ, e.g. {differ[:3]}"
    # The comparison covered characters the vocabulary lacks (runs of them are one [UNK]).
    assert sum(1 in ids for ids in expected) > 20


@pytest.mark.parametrize("model_type", vocab.MODEL_TYPES)
def test_bert_input_format(tokenizers, model_type):
    _, tok, sp = tokenizers[model_type]
    a, b = "Emma Woodhouse, handsome, clever, and rich", "She was the youngest of the two daughters."
    single = tok(a)
    assert single["input_ids"] == [2, *sp.encode(a), 3]
    assert single["token_type_ids"] == [0] * len(single["input_ids"])
    pair = tok(a, b)
    len_a = len(sp.encode(a)) + 2
    assert pair["input_ids"] == [2, *sp.encode(a), 3, *sp.encode(b), 3]
    assert pair["token_type_ids"] == [0] * len_a + [1] * (len(sp.encode(b)) + 1)
    assert pair["attention_mask"] == [1] * len(pair["input_ids"])
    assert tok.model_max_length == 128 and len(tok("word " * 500, truncation=True)["input_ids"]) == 128
    batch = tok([a, "Short."], padding=True)
    assert batch["input_ids"][1][-1] == tok.pad_token_id == 0


@pytest.mark.parametrize("model_type", vocab.MODEL_TYPES)
def test_literal_special_tokens_map_to_their_ids(tokenizers, model_type):
    _, tok, sp = tokenizers[model_type]
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id,
            tok.mask_token_id) == (0, 1, 2, 3, 4)
    ids = tok("It is a truth universally [MASK] that a single man")["input_ids"]
    assert ids == [2, *sp.encode("It is a truth universally"), 4, *sp.encode("that a single man"), 3]
    assert tok("[CLS] x [SEP]", add_special_tokens=False)["input_ids"] == [2, *sp.encode("x"), 3]
    # After a mask, text goes on as pretraining showed it: "[MASK]." is the mask, then ".", where the
    # masked word stood; before, a stray "▁" came between them (a token pretraining never put there).
    assert tok("the [MASK].")["input_ids"] == [2, *sp.encode("the"), 4, sp.piece_to_id("."), 3]
    assert tok("the [MASK], as")["input_ids"] == [2, *sp.encode("the"), 4, sp.piece_to_id(","), *sp.encode("as"), 3]


@pytest.mark.parametrize("model_type", vocab.MODEL_TYPES)
def test_decode_gives_the_normalized_text(corpus, tokenizers, model_type):
    _, tok, sp = tokenizers[model_type]
    texts = [s for s in corpus[1][:3000] if 1 not in sp.encode(s)][:1000] + ["  Emma   was\tclever  ", "ﬁne ｆｕｌｌ"]
    for text in texts:
        normalized = sp.normalize(text).replace("▁", " ").strip()
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == normalized
        assert sp.decode(sp.encode(text)) == normalized


def test_tokenizer_files(protos, tokenizers):
    out, _, _ = tokenizers["unigram"]
    assert {"spm.model", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    with open(os.path.join(out, "spm.model"), "rb") as f:
        assert f.read() == protos["unigram"]
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        config = json.load(f)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["mask_token"], config["model_max_length"]) == ("[MASK]", 128)


def test_fill_mask_pipeline_uses_the_mask_token(tokenizers):
    from transformers import BertConfig, BertForMaskedLM, pipeline

    _, tok, _ = tokenizers["unigram"]
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64,
                                       max_position_embeddings=128))
    ids = tok("Emma was very [MASK] indeed.")["input_ids"]
    predictions = pipeline("fill-mask", model=model, tokenizer=tok, top_k=3)("Emma was very [MASK] indeed.")
    assert len(predictions) == 3
    for p in predictions:
        filled = [p["token"] if i == tok.mask_token_id else i for i in ids]
        assert p["sequence"] == tok.decode(filled, skip_special_tokens=True)
        assert p["sequence"].startswith("Emma was very") and p["sequence"].endswith(" indeed.")


def test_word_start_table(protos):
    proto = protos["unigram"]
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    table = vocab.word_start_table(proto)
    assert table.dtype == bool and table.shape == (sp.get_piece_size(),)
    assert table[:5].all()  # special pieces
    piece = {sp.id_to_piece(i): bool(table[i]) for i in range(sp.get_piece_size())}
    assert piece["▁the"] and piece["▁"] and piece[","] and piece["."]
    assert not piece["s"] and not piece["ing"]
    # Han and kana pieces start words; accented continuations of alphabetic words do not
    # (ALBERT's every-non-ASCII-piece rule broke "▁Gemüse hä nd ler" at "hä")
    assert all(start for p, start in piece.items() if any("\u4e00" <= c <= "\u9fff" for c in p))
    from preprocessing.language import UNSPACED_SCRIPT as _UNSPACED_SCRIPT

    assert _UNSPACED_SCRIPT.search("東京") and _UNSPACED_SCRIPT.search("ひら") and _UNSPACED_SCRIPT.search("ไทย")
    assert not any(_UNSPACED_SCRIPT.search(p) for p in ("hä", "ü", "ого", "ال", "ες", "한국"))
    # Grouping pieces by the table recovers the words of plain text.
    for text in ["Emma Woodhouse handsome clever and rich with a comfortable home",
                 "the misunderstanding was unaccountable and disagreeable"]:
        starts = table[sp.encode(text)]
        assert starts.sum() == len(text.split())
    assert table[sp.encode("Mr. Knightley, however")].sum() == 5  # Mr . Knightley , however


def test_bad_settings_are_clear_errors(corpus):
    with pytest.raises(vocab.VocabError, match=r"--vocab-size 40 is too small for this corpus: .* need \d+ ids"):
        vocab.train_sentencepiece(corpus[0], 40, "unigram")
    with pytest.raises(ValueError, match="--model-type must be one of unigram, bpe, got 'char'"):
        vocab.train_sentencepiece(corpus[0], 1000, "char")
    with pytest.raises(ValueError, match="no sentences"):
        vocab.train_sentencepiece(iter([]), 1000, "bpe")
    with pytest.raises(ValueError, match="no sentences"):
        vocab.train_sentencepiece(["", "   "], 1000, "unigram")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        vocab.read_model(b"\x0a\xff")


@pytest.fixture(scope="module")
def unspaced_corpus():
    """(training lines, held-out lines) of the Chinese poems, with English lines mixed in, as a
    zhwiki article quotes English."""
    from .conftest import REPO

    with bz2.open(os.path.join(REPO, "preprocessing", "sample_data", "chinese-poetry.txt.bz2"), "rt") as f:
        poems = [line.strip() for line in f if line.strip()]
    english = austen_sentences()
    return poems[:20000] + english[:1000], poems[-3000:] + english[-300:]


def test_a_language_without_spaces_gets_no_dummy_prefix(unspaced_corpus, tmp_path):
    """No "▁" before every sentence of Chinese: 7.5% of the tokens were that piece alone, a target
    as easy as [SEP]. The Hugging Face tokenizer still gives SentencePiece's ids, spaces still
    become "▁", and decoding restores the text."""
    from transformers import AutoTokenizer

    from preprocessing.language import written_without_spaces

    assert written_without_spaces("zh") and written_without_spaces("zh-Hant") and written_without_spaces("ja")
    assert not written_without_spaces("en") and not written_without_spaces("ko") and not written_without_spaces("de")
    train, held_out = unspaced_corpus
    bare = {}
    for prefix in (True, False):
        proto = vocab.train_sentencepiece(train, 8000, "unigram", character_coverage=0.9995, add_dummy_prefix=prefix)
        sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        pieces = [p for text in held_out[:3000] for p in sp.encode(text, out_type=str)]
        bare[prefix] = pieces.count("▁") / len(pieces)
    assert bare[True] > 0.05 and bare[False] < 0.005, bare
    assert not vocab.read_model(proto).add_dummy_prefix

    vocab.write_tokenizer(proto, str(tmp_path), max_seq_length=128)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    mixed = ["使用Python 3.11语言编写", "他说：“Hello world！”然后走了。", "  前后有空格  ", "東京タワー と 富士山"]
    texts = held_out + mixed + EDGE_CASES
    expected = sp.encode(texts)
    got = tok(texts, add_special_tokens=False)["input_ids"]
    differ = [(t, g, e) for t, g, e in zip(texts, got, expected) if g != e]
    assert not differ, f"{len(differ)} of {len(texts)} texts differ, e.g. {differ[:3]}"
    assert not sp.encode("Python 3", out_type=str)[0].startswith("▁")  # no prefix at the start ...
    assert any(p.startswith("▁") for p in sp.encode("Python 3", out_type=str)[1:])  # ... a space is one
    # A corpus without a single space still gets a "▁" piece: a space in later text is no [UNK].
    spaceless = vocab.train_sentencepiece([t.replace(" ", "") for t in train[:20000]], 6000, "unigram",
                                          character_coverage=0.995, add_dummy_prefix=False)
    plain = sentencepiece.SentencePieceProcessor(model_proto=spaceless)
    assert plain.piece_to_id("▁") != plain.unk_id()
    assert plain.encode("他说 你好", out_type=str) == ["他", "说", "▁", "你", "好"]
    # Whole-word masking by the vocabulary's word starts: a sentence's first token starts a word even
    # without a "▁" (a Latin word or a digit there would join the previous sentence's last word).
    import collections

    from preprocessing import subwords, transforms
    from preprocessing.documents import SentenceDocument

    encoder = subwords.Encoder(subwords.TokenizerModel(subwords.SENTENCEPIECE, proto))
    assert encoder.prefixless
    doc = transforms.tokenize(SentenceDocument("d", ("春眠不觉晓。", "Python 3 很好。", "2024年。")), encoder,
                              collections.Counter(), "pieces")
    firsts = [sp.id_to_piece(int(s[0])) for s in doc.sentences]
    assert not encoder.info.word_start[sp.piece_to_id(firsts[1])] or not encoder.info.word_start[
        sp.piece_to_id(firsts[2])], firsts  # the table alone misses one of them
    assert all(starts[0] for starts in doc.word_starts)
    assert [list(starts[1:]) for starts in doc.word_starts] == [
        list(encoder.info.word_start[s[1:]]) for s in doc.sentences]
    # Unmasked (dynamic) rows carry these starts to the trainer's loader, which sees no sentences;
    # masked (static) rows need not.
    from preprocessing import examples

    other = transforms.tokenize(SentenceDocument("e", ("夜来风雨声。", "花落知多少。")), encoder,
                                collections.Counter(), "pieces")
    dynamic = examples.ExampleConfig(max_seq_length=64, masking="dynamic", whole_word_mask=True)
    batch = examples.create_instances([doc, other], 0, 1, dynamic, encoder.info)
    table_starts = encoder.info.word_start[batch.input_ids]
    assert (batch.word_starts >= table_starts).all() and (batch.word_starts > table_starts).any()
    table = batch.to_arrow()
    assert table.schema == examples.SCHEMA_WITH_WORD_STARTS
    assert np.array_equal(examples.InstanceBatch.from_arrow(table).word_starts, batch.word_starts)
    static = examples.ExampleConfig(max_seq_length=64, whole_word_mask=True)
    assert examples.create_instances([doc, other], 0, 1, static, encoder.info).word_starts is None
    for text in held_out[:500] + mixed:
        if 1 in sp.encode(text):
            continue
        normalized = sp.normalize(text).replace("▁", " ").strip()
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == normalized == sp.decode(sp.encode(text))


def test_a_stop_signal_ends_the_vocabulary_training_at_once():
    """SentencePiece trains in C++ for minutes on a real sample; a Ctrl-C (or run_beam.py's SIGTERM,
    also a KeyboardInterrupt) used to wait for its end, since Python runs handlers between its own
    instructions only. A training of several seconds, interrupted after 1 s, ends within 0.5 s of it,
    and as soon when interrupted while it loads its sentences."""
    import subprocess
    import sys

    script = r"""
import random, signal, sys, time
from preprocessing import vocab
random.seed(0)
words = ["".join(random.choice("abcdefghij") for _ in range(random.randint(2, 9))) for _ in range(20000)]
sentences = [" ".join(random.choice(words) for _ in range(30)) for _ in range(60000)]
def stop(signum, frame):
    raise KeyboardInterrupt
signal.signal(signal.SIGALRM, stop)
start = time.monotonic()
def slowly():  # about 3 s of loading
    for sentence in sentences:
        time.sleep(0.00005)
        yield sentence
if sys.argv[1] != "whole":
    signal.setitimer(signal.ITIMER_REAL, 1.0 if sys.argv[1] == "training" else 0.3)
try:
    vocab.train_sentencepiece(slowly() if sys.argv[1] == "loading" else sentences, 8000, "unigram")
except KeyboardInterrupt:
    print(f"stopped {time.monotonic() - start:.2f}")
    sys.exit(130)
print(f"trained {time.monotonic() - start:.2f}")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(mode):
        done = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, cwd=root,
                              timeout=300)
        return done.returncode, done.stdout.split()

    code, (word, stopped) = run("training")
    assert code == 130 and word == "stopped" and float(stopped) < 1.5
    # Stopped while SentencePiece still pulls the sentences from Python: a thread left calling into
    # a shutting-down interpreter aborted the process (exit 134)
    code, (word, loading) = run("loading")
    assert code == 130 and word == "stopped" and float(loading) < 2.5
    code, (word, whole) = run("whole")  # the control: the training itself lasts several seconds
    assert code == 0 and word == "trained" and float(whole) > 2 * float(stopped), (stopped, whole)
