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
    # to the word embeddings.
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert flops.matmul_params == linear
    # 50% MFU at 989 TFLOP/s is about 5,700 sequences/s at 128 tokens: ~86 GFLOP each.
    assert flops.per_sequence(128) == pytest.approx(86.0e9, rel=0.01)
    # The sparse head projects 20 masked tokens, not 128: 18% fewer FLOPs.
    saved = 6 * (768 * 768 + 768 * 30522) * (128 - 20)
    assert flops.per_sequence(128, predictions=20) == pytest.approx(flops.per_sequence(128) - saved)
    assert saved / flops.per_sequence(128) == pytest.approx(0.18, abs=0.01)


def test_sparse_head_gives_the_stock_logits_at_the_masked_positions():
    config = model_config("tiny", MANIFEST)
    torch.manual_seed(0)
    stock = build_model(config).eval()
    sparse = build_model(config, sparse_mlm=True).eval()
    sparse.load_state_dict(stock.state_dict())
    assert type(sparse).__mro__[1] is type(stock)  # the same parameters, checkpoints and exports
    ids = torch.randint(5, 8000, (3, 16))
    types = torch.zeros_like(ids)
    types[:, 9:] = 1
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    positions = torch.tensor([1, 4, 16 + 7, 2 * 16 + 11])
    with torch.no_grad():
        dense = stock(input_ids=ids, token_type_ids=types, attention_mask=mask)
        mlm, nsp = sparse(input_ids=ids, token_type_ids=types, attention_mask=mask, mlm_positions=positions)
    assert mlm.shape == (4, 8000)
    torch.testing.assert_close(mlm, dense.prediction_logits.flatten(0, 1)[positions], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nsp, dense.seq_relationship_logits, rtol=1e-5, atol=1e-5)
