"""Model presets sized by the data's manifest, and the FLOP count behind MFU."""

import json

import pytest
import torch

from pipeline.model import PRESETS, FlopCounter, ModelConfigError, build_model, model_config

MANIFEST = {"tokenizer": {"vocab_size": 8000, "special_ids": {"pad": 0, "unk": 1, "cls": 2, "sep": 3,
                                                               "mask": 4}},
            "max_seq_length": 128}


def test_presets_take_vocabulary_and_padding_from_the_data():
    config = model_config("tiny", MANIFEST)
    assert config.vocab_size == 8000 and config.pad_token_id == 0 and config.type_vocab_size == 2
    model = build_model(config)
    assert model.config._attn_implementation == "sdpa"
    out = model(input_ids=torch.tensor([[2, 10, 11, 3, 12, 3]]), token_type_ids=torch.tensor([[0, 0, 0, 0, 1, 1]]))
    assert out.prediction_logits.shape == (1, 6, 8000) and out.seq_relationship_logits.shape == (1, 2)


def test_config_file_that_disagrees_with_the_tokenizer_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**PRESETS["tiny"], "vocab_size": 30522}))
    with pytest.raises(ModelConfigError, match=r"config\.json: vocab_size is 30522 but the data's tokenizer needs 8000"):
        model_config(str(path), MANIFEST)
    path.write_text(json.dumps(PRESETS["tiny"]))
    assert model_config(str(path), MANIFEST).vocab_size == 8000


def test_unknown_preset_and_too_long_data_are_clear_errors():
    with pytest.raises(ModelConfigError, match="--model 'huge': not a preset"):
        model_config("huge", MANIFEST)
    with pytest.raises(ModelConfigError, match="max_seq_length 1024 of the data exceeds"):
        model_config("tiny", {**MANIFEST, "max_seq_length": 1024})


def test_flop_count_matches_the_model_and_the_known_bert_base_figure():
    config = model_config("base", {**MANIFEST, "tokenizer": {**MANIFEST["tokenizer"], "vocab_size": 30522}})
    flops = FlopCounter.for_config(config)
    model = build_model(config)
    # Every matrix multiply's weight: the Linear layers, with the output projection tied
    # to the word embeddings, less the 2-way NSP classifier (negligible, not counted).
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert abs(flops.matmul_params - (linear - 2 * 768)) == 0
    # 50% MFU at 989 TFLOP/s is about 5,700 sequences/s at 128 tokens: ~86 GFLOP each.
    assert flops.per_sequence(128) == pytest.approx(86.0e9, rel=0.01)
