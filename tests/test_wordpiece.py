"""``run_beam.py --tokenizer`` with a published BERT's WordPiece vocabulary: the data's ids
are that vocabulary's, so the model can be continued from its weights."""

import bz2
import json
import logging
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.conftest import AUSTEN, REPO, TABLE_SAMPLE, set_one_process_world

SCRIPT = os.path.join(REPO, "preprocessing", "run_beam.py")
# BERT's layout: [PAD] 0, [unused*], then [UNK] [CLS] [SEP] [MASK] at 100-103.
SPECIAL_IDS = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}


@pytest.fixture(scope="module")
def bert_vocab_dir(tmp_path_factory) -> str:
    """A cased WordPiece vocabulary in bert-base-cased's layout, trained on Austen:
    just ``vocab.txt``, as a downloaded model directory holds it."""
    from tokenizers import BertWordPieceTokenizer

    with bz2.open(AUSTEN, "rt", encoding="utf-8") as f:
        text = f.read(600_000).split("\n\n")
    trainer = BertWordPieceTokenizer(lowercase=False)
    trainer.train_from_iterator(text, vocab_size=3000, special_tokens=[], show_progress=False)
    learned = [t for t, _ in sorted(trainer.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + learned
    out = tmp_path_factory.mktemp("bert-cased")
    (out / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return str(out)


@pytest.fixture(scope="module")
def wordpiece_data(bert_vocab_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("wp") / "data")
    subprocess.run([sys.executable, SCRIPT, "--input", TABLE_SAMPLE, AUSTEN, "--output", out,
                    "--tokenizer", bert_vocab_dir, "--dupe-factor", "1", "--whole-word-mask",
                    "--num-shards", "1", "--no-mlflow"], check=True, capture_output=True, text=True)
    return out


def test_manifest_records_the_given_vocabulary(wordpiece_data, bert_vocab_dir):
    with open(os.path.join(wordpiece_data, "manifest.json")) as f:
        manifest = json.load(f)
    tok = manifest["tokenizer"]
    assert tok["kind"] == "wordpiece" and tok["model_type"] == "wordpiece" and tok["given"] is True
    assert tok["special_ids"] == SPECIAL_IDS
    with open(os.path.join(bert_vocab_dir, "vocab.txt"), encoding="utf-8") as f:
        assert tok["vocab_size"] == len(f.read().splitlines())
    assert tok["lowercase"] is False  # capitalized words in the vocabulary: cased
    assert manifest["masking"]["word_segmenter"] == "pieces" and manifest["language"] == "en"


def test_the_written_tokenizer_and_the_export_keep_the_vocabularys_fingerprint(wordpiece_data, bert_vocab_dir):
    """A phase 2 or a continued run preprocessed with --tokenizer DATA/tokenizer (or the export's
    folder) must match the checkpoint's fingerprint: hashing the whole tokenizer.json, rewritten on
    saving (its post-processor), refused them."""
    from preprocessing import subwords

    with open(os.path.join(wordpiece_data, "manifest.json")) as f:
        recorded = json.load(f)["tokenizer"]["fingerprint"]
    assert subwords.load_given(bert_vocab_dir).fingerprint == recorded
    written = subwords.load_given(os.path.join(wordpiece_data, "tokenizer"))
    assert written.fingerprint == recorded and written.data != subwords.load_given(bert_vocab_dir).data
    other = json.loads(written.data)
    other["model"]["vocab"]["Emma"], other["model"]["vocab"]["[unused0]"] = (other["model"]["vocab"]["[unused0]"],
                                                                           other["model"]["vocab"]["Emma"])
    assert subwords.TokenizerModel(subwords.WORDPIECE, json.dumps(other).encode()).fingerprint != recorded
    # An added token changes the ids (and the size): another fingerprint, and another cached encoder.
    from tokenizers import Tokenizer

    from preprocessing import transforms

    backend = Tokenizer.from_str(written.data.decode("utf-8"))
    backend.add_tokens(["newtok"])
    grown = subwords.TokenizerModel(subwords.WORDPIECE, backend.to_str().encode("utf-8"))
    assert grown.fingerprint != recorded
    assert transforms.load_model(grown).info.vocab_size == transforms.load_model(written).info.vocab_size + 1


def test_the_encoder_gives_the_vocabularys_ids_with_and_without_offsets(bert_vocab_dir):
    """Both of the preprocessing encoder's calls (ids alone, the default path; ids with where
    each token begins, for whole-word masking) give what BERT's own tokenizer gives."""
    from tokenizers import BertWordPieceTokenizer

    from preprocessing import subwords

    encoder = subwords.Encoder(subwords.load_given(bert_vocab_dir))
    original = BertWordPieceTokenizer(os.path.join(bert_vocab_dir, "vocab.txt"), lowercase=False)
    with bz2.open(AUSTEN, "rt", encoding="utf-8") as f:
        sentences = [" ".join(line.split()) for line in f.read(200_000).splitlines() if line.strip()]
    sentences.append("Élodie 北京, twenty-one.")
    expected = [original.encode(s, add_special_tokens=False).ids for s in sentences]
    assert encoder.encode(sentences) == expected
    assert [ids for ids, _ in encoder.encode_with_begins(sentences)] == expected
    assert len(sentences) > 1000 and sum(map(len, expected)) > 20_000


def test_written_tokenizer_gives_the_original_vocabularys_ids(wordpiece_data, bert_vocab_dir):
    from tokenizers import BertWordPieceTokenizer
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(os.path.join(wordpiece_data, "tokenizer"))
    # BERT's reference pipeline for a cased vocab.txt.
    original = BertWordPieceTokenizer(os.path.join(bert_vocab_dir, "vocab.txt"), lowercase=False)
    text = "Emma Woodhouse, handsome, clever, and rich, had lived nearly twenty-one years. Élodie 北京"
    assert ours(text)["input_ids"] == original.encode(text).ids
    assert "Emma" in ours.tokenize(text)  # cased: not lowercased
    assert ours(text)["input_ids"][0] == SPECIAL_IDS["cls"] and ours(text)["input_ids"][-1] == SPECIAL_IDS["sep"]
    assert ours.mask_token_id == SPECIAL_IDS["mask"] and ours.pad_token_id == SPECIAL_IDS["pad"]
    with open(os.path.join(wordpiece_data, "tokenizer", "vocab.txt"), encoding="utf-8") as f, \
            open(os.path.join(bert_vocab_dir, "vocab.txt"), encoding="utf-8") as g:
        assert f.read() == g.read()


def test_shards_hold_the_vocabularys_ids_with_whole_words_masked(wordpiece_data, bert_vocab_dir):
    with open(os.path.join(bert_vocab_dir, "vocab.txt"), encoding="utf-8") as f:
        tokens = f.read().splitlines()
    shard = pq.read_table(os.path.join(wordpiece_data, "shards")).to_pydict()
    assert len(shard["input_ids"]) > 500
    masked = continued = 0
    for ids, segments, positions, originals in zip(shard["input_ids"], shard["segment_ids"],
                                                   shard["masked_lm_positions"], shard["masked_lm_ids"]):
        assert ids[0] == SPECIAL_IDS["cls"] and ids[-1] == SPECIAL_IDS["sep"] and ids.count(SPECIAL_IDS["sep"]) == 2
        chosen = set(positions)
        for p, original in zip(positions, originals):
            masked += ids[p] == SPECIAL_IDS["mask"]
            # A "##" piece is masked only with the piece before it: whole words.
            # (A segment truncated at its front may begin with one: it starts its group.)
            if tokens[original].startswith("##") and p > 1 and segments[p - 1] == segments[p]:
                continued += 1
                assert p - 1 in chosen
            # ... and its own continuations with it: a group is never cut short (an unmasked piece
            # still holds its original id).
            after = p + 1
            if after < len(ids) and after not in chosen and segments[after] == segments[p]:
                assert not tokens[ids[after]].startswith("##"), (p, tokens[original], tokens[ids[after]])
    total = sum(map(len, shard["masked_lm_positions"]))
    assert 0.77 < masked / total < 0.83
    assert continued > 100


def test_a_directory_without_a_tokenizer_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, SCRIPT, "--input", TABLE_SAMPLE, "--output", str(tmp_path / "o"),
                          "--tokenizer", str(tmp_path), "--no-mlflow"], capture_output=True, text=True)
    assert out.returncode != 0
    assert f"--tokenizer {tmp_path}: no tokenizer there" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_vocabulary_without_bert_special_tokens_is_refused(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nthe\n##s\n", encoding="utf-8")
    out = subprocess.run([sys.executable, SCRIPT, "--input", TABLE_SAMPLE, "--output", str(tmp_path / "o"),
                          "--tokenizer", str(tmp_path), "--no-mlflow"], capture_output=True, text=True)
    assert out.returncode != 0 and "has no [CLS], [SEP], [MASK]" in out.stderr
    assert "Traceback" not in out.stderr


def test_continued_pretraining_of_a_wordpiece_bert_loads_its_saved_weights(wordpiece_data, bert_vocab_dir,
                                                                            tmp_path, monkeypatch):
    """The whole path a user takes with a downloaded BERT: its directory (config, weights,
    vocab.txt) → run_beam.py --tokenizer DIR → pretrain --init-from DIR."""
    import shutil

    import torch
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForPreTraining

    from pipeline.train_config import TrainConfig
    from pipeline.trainer import Trainer

    set_one_process_world(monkeypatch)
    published = tmp_path / "bert-published"
    shutil.copytree(bert_vocab_dir, published)
    torch.manual_seed(5)
    with open(os.path.join(bert_vocab_dir, "vocab.txt"), encoding="utf-8") as f:
        size = len(f.read().splitlines())
    BertForPreTraining(BertConfig(vocab_size=size, pad_token_id=0, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64)).save_pretrained(published)
    config = TrainConfig.from_flat(data=wordpiece_data, run_dir=str(tmp_path / "run"), model=None,
                                   init_from=str(published), steps=1, global_batch_size=8, micro_batch_size=8,
                                   learning_rate=1e-4, warmup_steps=0, eval_shards=0, mlflow=False)
    trainer = Trainer(config)
    state = trainer.engine.module.state_dict()
    saved = load_file(os.path.join(published, "model.safetensors"))
    assert len(saved) > 30
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert trainer.train() == 0


def test_a_model_whose_casing_differs_from_the_data_is_refused(wordpiece_data, bert_vocab_dir, tmp_path,
                                                                monkeypatch):
    import shutil

    from transformers import BertConfig, BertForPreTraining

    from pipeline.hf_init import HfInitError, check

    published = tmp_path / "bert-uncased"
    shutil.copytree(bert_vocab_dir, published)
    (published / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    with open(os.path.join(bert_vocab_dir, "vocab.txt"), encoding="utf-8") as f:
        size = len(f.read().splitlines())
    BertForPreTraining(BertConfig(vocab_size=size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)).save_pretrained(published)
    with open(os.path.join(wordpiece_data, "manifest.json")) as f:
        manifest = json.load(f)
    with pytest.raises(HfInitError, match="uncased .*do_lower_case=true.* made cased"):
        check(str(published), str(published / "config.json"), manifest, wordpiece_data)


def test_a_vocab_txt_with_a_token_on_two_lines_keeps_every_lines_id(tmp_path, caplog):
    """A published vocab.txt may hold a token twice (the multilingual uncased BERT's does): the later
    line's id is used, and the vocabulary's size is the line count, as the model's embeddings are
    (before: the count of distinct tokens, and the pipeline failed midway on an id past it, after
    deleting the previous output)."""
    from preprocessing.subwords import Encoder, load_given

    lines = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "##s", "cat", "the", "dog", "\u3000x"]
    (tmp_path / "vocab.txt").write_text("\n".join(lines) + "\r\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="preprocessing.subwords"):
        encoder = Encoder(load_given(str(tmp_path)))
    assert [m for m in caplog.messages if "--tokenizer" in m] == [f"--tokenizer {tmp_path / 'vocab.txt'}: 1 token(s) on two lines, e.g. 'the' on lines "
                               "6 and 9; the later line's id is used, the earlier id is never produced"]
    assert encoder.info.vocab_size == len(lines)
    assert encoder.encode(["the cats dog"]) == [[8, 7, 6, 9]]


def test_fine_tuning_refuses_a_wordpiece_tokenizer_other_than_the_models(wordpiece_data, tmp_path):
    """Same size, same [PAD]: only the ids tell two WordPiece vocabularies apart (the fingerprint was
    checked for SentencePiece alone, and another WordPiece tokenizer fine-tuned on shifted ids)."""
    import shutil

    from transformers import BertConfig

    from pipeline.finetuning.model import ModelSourceError, load_tokenizer

    given = os.path.join(wordpiece_data, "tokenizer")
    with open(os.path.join(wordpiece_data, "manifest.json")) as f:
        recorded = json.load(f)["tokenizer"]
    model = tmp_path / "model"  # an export: a config, what it records, and its tokenizer's files
    config = BertConfig(vocab_size=recorded["vocab_size"], pad_token_id=0)
    config.save_pretrained(model)
    (model / "training_info.json").write_text(json.dumps({"tokenizer_fingerprint": recorded["fingerprint"]}))
    for name in os.listdir(given):
        shutil.copy(os.path.join(given, name), model / name)
    assert len(load_tokenizer(str(model), given, config)) == recorded["vocab_size"]
    assert len(load_tokenizer(str(model), None, config)) == recorded["vocab_size"]

    other = tmp_path / "other"
    shutil.copytree(given, other)
    spec = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    vocab["Emma"], vocab["[unused0]"] = vocab["[unused0]"], vocab["Emma"]
    (other / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ModelSourceError, match=rf"--tokenizer {other}: its vocabulary is not the one the model "
                                               r"in .* was pretrained with: token 'Emma' is id 1 there but \d+ in the model's"):
        load_tokenizer(str(model), str(other), config)


def test_a_sequence_normalizer_that_lowercases_is_read_as_uncased(tmp_path):
    """The tokenizers library's BERT recipe normalizes with NFD + Lowercase + StripAccents in a
    Sequence: read as cased, the data dir's tokenizer left "Elizabeth" as it is, an [UNK] to an
    uncased vocabulary, while the rows were encoded lowercased."""
    from tokenizers import BertWordPieceTokenizer, Tokenizer, normalizers
    from transformers import AutoTokenizer

    from preprocessing import subwords

    with bz2.open(AUSTEN, "rt", encoding="utf-8") as f:
        text = f.read(300_000).split("\n\n")
    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(text, vocab_size=2000, show_progress=False,
                                special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    backend = Tokenizer.from_str(trainer._tokenizer.to_str())
    backend.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(),
                                               normalizers.StripAccents()])
    given = tmp_path / "uncased"
    given.mkdir()
    backend.save(str(given / "tokenizer.json"))
    model = subwords.load_given(str(given))
    assert subwords.manifest_fields(model, "wordpiece")["lowercase"] is True
    subwords.write_files(model, str(tmp_path / "written"), 128)
    written = AutoTokenizer.from_pretrained(str(tmp_path / "written"))
    sentence = "Elizabeth walked to PARIS with Mr. Darcy."
    ids = subwords.Encoder(model).encode([sentence])[0]
    assert written(sentence, add_special_tokens=False)["input_ids"] == ids
    assert written.unk_token_id not in ids


def test_a_tokenizer_json_of_special_tokens_alone_is_refused_at_the_start(bert_vocab_dir, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece

    from preprocessing import subwords
    from preprocessing.text_formats import InputError

    folder = tmp_path / "saved"
    folder.mkdir()
    specials = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    Tokenizer(WordPiece(specials, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
    (folder / "vocab.txt").write_text(open(os.path.join(bert_vocab_dir, "vocab.txt")).read())
    with pytest.raises(InputError, match=rf"--tokenizer {folder}: its tokenizer.json holds the special tokens "
                                         "alone, no vocabulary; pass the vocab.txt beside it"):
        subwords.load_given(str(folder))
    assert subwords.load_given(str(folder / "vocab.txt")).kind == subwords.WORDPIECE
