"""Chinese whole-word masking: jieba words aligned to tokens, and masking by those words."""

import numpy as np
import pytest

from preprocessing import examples as ex
from preprocessing import language, word_starts

SENTENCE = "我来到北京清华大学，举头望明月。"


def test_inside_word_marks_word_interiors_in_bytes_and_chars():
    import jieba

    words = list(jieba.cut(SENTENCE, HMM=True))
    assert "清华大学" in words  # jieba's dictionary ships with it: no download
    chars = word_starts.inside_word(SENTENCE, "char")
    at = 0
    for word in words:
        assert not chars[at] and chars[at + 1:at + len(word)].all()
        at += len(word)
    nbytes = word_starts.inside_word(SENTENCE, "byte")
    assert len(nbytes) == len(SENTENCE.encode()) and nbytes.sum() > chars.sum()  # 3 bytes a character


def test_traditional_text_is_segmented_into_the_words_of_its_simplified_copy():
    """jieba's dictionary is Simplified: Traditional text was cut 臺/灣是 and 半導/體/製/造/業."""
    traditional = "臺灣是位於東亞的島嶼，半導體製造業發達。"
    simplified = language.Converter("t2s")(traditional)
    assert simplified == "台湾是位于东亚的岛屿，半导体制造业发达。"
    for unit in ("char", "byte"):
        assert (word_starts.inside_word(traditional, unit) == word_starts.inside_word(simplified, unit)).all()
    chars = word_starts.inside_word(traditional, "char")
    for word in ("臺灣", "半導體", "製造業"):
        at = traditional.index(word)
        assert not chars[at] and chars[at + 1:at + len(word)].all() and not chars[at + len(word)], word


def test_tokens_inside_a_word_continue_it_and_spanning_tokens_start_where_they_begin():
    # Character tokens (WordPiece splits every Han character): 清华大学 is one word of four.
    begins = list(range(len(SENTENCE)))
    starts = word_starts.word_starts(SENTENCE, begins, "char")
    i = SENTENCE.index("清华大学")
    assert starts[i] and not starts[i + 1:i + 4].any()
    assert starts[SENTENCE.index("，")] and starts[0]
    # A token covering "京清" begins inside 北京: it continues that word.
    assert not word_starts.word_starts(SENTENCE, [SENTENCE.index("京")], "char")[0]
    # Offsets past the end (a zero-width piece at the end) count as starts.
    assert word_starts.word_starts(SENTENCE, [len(SENTENCE)], "char")[0]


def test_sentencepiece_byte_offsets_align_with_jieba(tmp_path):
    from preprocessing import subwords, vocab

    text = [SENTENCE, "长城是中国古代的军事防御工程。", "北京大学和清华大学都在北京。"] * 40
    proto = vocab.train_sentencepiece(text, 120, "unigram")
    encoder = subwords.Encoder(subwords.TokenizerModel(subwords.SENTENCEPIECE, proto))
    (ids, begins), = encoder.encode_with_begins([SENTENCE])
    assert ids == encoder.encode([SENTENCE])[0]
    starts = word_starts.word_starts(SENTENCE, begins, encoder.offset_unit)
    pieces = [encoder._sp.id_to_piece(i) for i in ids]
    # Rebuild the words from the groups: every group lies inside one jieba word or
    # starts at a word boundary, so joining a group's pieces never splits a word start.
    encoded = SENTENCE.encode()
    boundaries = {0}
    at = 0
    import jieba
    for word in jieba.cut(SENTENCE, HMM=True):
        at += len(word.encode())
        boundaries.add(at)
    for piece, begin, start in zip(pieces, begins, starts):
        first_char_at = begin if not encoded[begin:begin + 1].isspace() else begin + 1
        assert start == (first_char_at in boundaries or begin in boundaries), (piece, begin)


def _docs_with_word_starts(n_docs=6, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(n_docs):
        sentences, starts = [], []
        for _ in range(8):
            length = int(rng.integers(6, 20))
            sentences.append(rng.integers(10, 90, length).astype(np.int32))
            # Words of 1 to 4 tokens.
            s = np.zeros(length, bool)
            at = 0
            while at < length:
                s[at] = True
                at += int(rng.integers(1, 5))
            starts.append(s)
        docs.append(ex.Document(key=1000 + d, sentences=sentences, word_starts=starts))
    return docs


def test_masking_takes_whole_segmenter_words():
    docs = _docs_with_word_starts()
    # The vocabulary's own table says every piece starts a word: the document's starts must win.
    info = ex.VocabInfo(vocab_size=100, cls_id=2, sep_id=3, mask_id=4, special_ids=(0, 1, 2, 3, 4),
                        word_start=np.ones(100, bool))
    config = ex.ExampleConfig(max_seq_length=48, whole_word_mask=True, masked_lm_prob=0.2)
    bucket = ex.Bucket(docs)
    plan = ex.plan_segments(bucket, 0, 7, config)
    batch = ex.mask_instances(plan, config, info)
    assert len(batch) > 10
    # Per-token word starts of each instance, rebuilt like the instance's tokens.
    whole = partial = 0
    for row in range(len(batch)):
        a = slice(plan.a_start[row], plan.a_end[row])
        b = slice(plan.b_start[row], plan.b_end[row])
        starts = np.concatenate([[True], bucket.word_starts[a], [True], bucket.word_starts[b], [True]])
        # A segment cut by truncation may begin inside a word: its first token starts a group.
        starts[1] = starts[plan.a_end[row] - plan.a_start[row] + 2] = True
        masked = np.zeros(len(starts), bool)
        positions = batch.masked_lm_positions[batch.masked_offsets[row]:batch.masked_offsets[row + 1]]
        masked[positions] = True
        # Every masked run starts at a word start (or right after [CLS]/[SEP]) and
        # runs to the next word start: whole words only.
        word_id = np.cumsum(starts)
        for w in np.unique(word_id[masked]):
            in_word = word_id == w
            if masked[in_word].all():
                whole += 1
            else:
                partial += 1
    assert whole > 50 and partial == 0


def test_a_bucket_may_not_mix_segmented_and_plain_documents():
    docs = _docs_with_word_starts(2)
    plain = ex.Document(key=5, sentences=docs[0].sentences)
    with pytest.raises(ValueError, match="mixes"):
        ex.Bucket([docs[1], plain])


def test_language_codes_are_recorded_as_bcp_47_spells_them():
    assert [language.canonical_code(c) for c in ("zh_tw", "ZH-hant", "de-ch", "zh-Hant-TW", "es-419", "en", " de ")] == [
        "zh-TW", "zh-Hant", "de-CH", "zh-Hant-TW", "es-419", "en", "de"]


def test_whole_word_default_by_language():
    assert language.default_segmenter("zh") == "jieba"
    assert language.default_segmenter("zh-hans") == "jieba"
    assert language.default_segmenter("de") == "pieces"
    assert language.default_segmenter("cmn") == language.default_segmenter("zho") == "jieba"  # as the sentence rules read them
    assert language.default_segmenter("en") == "pieces"
    assert language.Converter("t2s")("舉頭望明月，低頭思故鄉。") == "举头望明月，低头思故乡。"
    with pytest.raises(ValueError, match="--convert"):
        language.Converter("x2y")


@pytest.mark.parametrize("name", language.CONVERSIONS)
def test_every_listed_conversion_loads_and_converts(name):
    # OpenCC's tables ship with the wheel; a name listed here but missing there failed mid-pipeline.
    # (a name without its table raises here); a character for a character, as the offsets assume
    text = "臺灣的軟體與網絡，台湾的软件与网络。"
    converted = language.Converter(name)(text)
    assert len(converted) == len(text) and converted[8] == "，" and converted[-1] == "。", (name, converted)
    assert converted != text or name in ("t2tw", "tw2t", "t2hk", "hk2t", "t2jp", "jp2t"), name
