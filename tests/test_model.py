"""Model presets sized by the data's manifest, and the two FLOP counts behind the MFUs."""

import json

import pytest
import torch

from pipeline.model import PRESETS, FlopCounter, ModelConfigError, build_model, forward_attention_mask, model_config

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
    # One line naming the file, not a traceback from json or from the model's first attention layer.
    for text, message in (('{"hidden_size": 64,', r"config\.json: not a readable JSON model config \(Expecting"),
                          ("[64, 2]", r"config\.json: a model config is a JSON object, not list"),
                          (json.dumps({**PRESETS["tiny"], "num_attention_heads": 5}),
                           r"config\.json: hidden_size 64 is not a multiple of num_attention_heads 5"),
                          (json.dumps({**PRESETS["tiny"], "num_attention_heads": 0}),
                           r"config\.json: hidden_size 64 and num_attention_heads 0 must be positive"),
                          (json.dumps({**PRESETS["tiny"], "hidden_size": "64"}),
                           r"config\.json: (not a valid BERT config|hidden_size '64' and)")):
        path.write_text(text)
        with pytest.raises(ModelConfigError, match=message) as error:
            model_config(str(path), MANIFEST)
        assert "\n" not in str(error.value)  # printed as the run's one error line


def test_unknown_preset_and_too_long_data_are_clear_errors():
    with pytest.raises(ModelConfigError, match="--model 'huge': not a preset"):
        model_config("huge", MANIFEST)
    with pytest.raises(ModelConfigError, match="max_seq_length 1024 of the data exceeds the "
                       "max_position_embeddings 512 of tiny: preprocess with --max-seq-length 512 or less, or, "
                       "for a model trained from scratch, give --model a config.json whose max_position_embeddings "
                       "is at least 1024"):
        model_config("tiny", {**MANIFEST, "max_seq_length": 1024})


def bert_base(vocab_size):
    return model_config("base", {**MANIFEST, "tokenizer": {**MANIFEST["tokenizer"], "vocab_size": vocab_size}})


def test_flop_count_takes_every_matmul_weight_of_the_model():
    config = bert_base(30522)
    flops = FlopCounter.for_config(config)
    # Every matrix multiply's weight: the Linear layers, with the output projection tied
    # to the word embeddings.
    linear = sum(m.weight.numel() for m in build_model(config).modules() if isinstance(m, torch.nn.Linear))
    assert flops.matmul_params == linear
    # BERT-base by hand: 12 layers of 4·768² + 2·768·3072; MLM head 768² + 768·30522; pooler + NSP 768² + 2·768.
    assert (flops.encoder_params, flops.mlm_head_params, flops.cls_params) == (84_934_656, 24_030_720, 591_360)
    assert flops.matmul_params == 109_556_736


def test_model_and_executed_flops_by_hand_for_bert_base_at_128():
    flops = FlopCounter.for_config(bert_base(30522))
    attention = 12 * 12 * 768 * 128**2  # 12·L·H·T² = 1.81 GFLOP
    # Model FLOPs (PaLM's count): 6·N·T + 12·L·H·T², whatever runs.
    assert flops.model_per_sequence(128) == 6 * 109_556_736 * 128 + attention == 85_951_512_576
    # Executed: the encoder on the 128 tokens, the sparse MLM head on 20, pooler and NSP once.
    executed = 6 * (84_934_656 * 128 + 24_030_720 * 20 + 591_360) + attention
    assert flops.executed_per_sequence(128, 20) == executed == 69_928_989_696
    # So at full length the executed count is 81% of the model count: the head's projection on
    # the 108 unmasked tokens, and the pooler counted per token in 6·N·T.
    assert flops.model_per_sequence(128) - executed == 6 * 24_030_720 * (128 - 20) + 6 * 591_360 * 127
    assert executed / flops.model_per_sequence(128) == pytest.approx(0.814, abs=0.001)
    # With every token predicted, the two differ only by the pooler and NSP (counted once, not per token).
    assert flops.model_per_sequence(128) - flops.executed_per_sequence(128, 128) == 6 * 591_360 * 127
    # Real-length data: the executed count shrinks with the length, the model count does not.
    assert flops.executed_per_sequence(100, 15) < executed
    assert flops.executed_per_sequence(100, 15) / flops.model_per_sequence(128) == pytest.approx(0.631, abs=0.001)


def test_executed_flops_of_mixed_lengths_are_the_mean_of_each_sequences():
    flops = FlopCounter.for_config(bert_base(32000))
    lengths, masked = [64, 128, 96, 32], [10, 20, 15, 5]
    each = sum(flops.executed_per_sequence(t, p) for t, p in zip(lengths, masked)) / 4
    mean = flops.executed_per_sequence(sum(lengths) / 4, sum(masked) / 4, sum(t * t for t in lengths) / 4)
    assert mean == pytest.approx(each, rel=1e-12)
    # the square of the mean length undercounts attention by the lengths' variance
    assert flops.executed_per_sequence(80, 12.5) == pytest.approx(each - 12 * 12 * 768 * 1280, rel=1e-12)


def test_model_flops_make_the_published_target_50_percent_mfu():
    # The benchmark's vocabulary, 32,000: 5,700 sequences/s of BERT-base at 128 on a 989.5
    # TFLOP/s H100/H200 is 50% model-FLOPs MFU (86.8 GFLOP a sequence).
    flops = FlopCounter.for_config(bert_base(32000))
    assert flops.model_per_sequence(128) == pytest.approx(86.82e9, rel=1e-3)
    assert 5700 * flops.model_per_sequence(128) / 989.5e12 == pytest.approx(0.50, abs=0.001)


@pytest.mark.parametrize("compiled", [False, True])
def test_trainer_logs_both_mfus_named(tmp_path, compiled):
    from types import MethodType, SimpleNamespace

    from pipeline.trainer import StepMetrics, Trainer

    flops = FlopCounter.for_config(bert_base(32000))
    trainer = SimpleNamespace(  # what Trainer._log reads
        world_size=1, is_rank0=True, step=10, nsp_weight=1.0, flops=flops, manifest={"max_seq_length": 128},
        config=SimpleNamespace(peak_tflops=989.5, run_dir=str(tmp_path), steps=10, compile=compiled),
        scheduler=SimpleNamespace(get_last_lr=lambda: [1e-4]), loader=SimpleNamespace(real_token_share=0.8),
        engine=SimpleNamespace(fp16_enabled=lambda: False))
    trainer.executed_flops_per_sequence = MethodType(Trainer.executed_flops_per_sequence, trainer)
    # 10 steps of 256 sequences of 100 real tokens, 15 masked, in the time of 5,700 sequences/s
    window = [StepMetrics(1.0, 0.5, 0.5, 0.1, 0.5, real_tokens=256 * 100, sequences=256, predictions=256 * 15,
                          squared_tokens=256 * 100**2)] * 10
    values = Trainer._log(trainer, window, 2560 / 5700, None)
    assert "mfu" not in values
    assert values["sequences_per_second"] == pytest.approx(5700) and values["real_tokens_per_second"] == pytest.approx(
        570000)
    assert values["mfu_model"] == pytest.approx(0.50, abs=0.001)
    # what ran: compiled, every batch padded to max_seq_length (the MLM head still on the 15 masked)
    length = 128 if compiled else 100
    assert values["mfu_executed"] == pytest.approx(5700 * flops.executed_per_sequence(length, 15) / 989.5e12)
    assert values["mfu_executed"] < (0.85 if compiled else 0.7) * values["mfu_model"]


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


@pytest.mark.parametrize("padded", [False, True])
def test_the_forward_mask_gives_the_stock_outputs_and_reads_nothing_on_the_host(padded):
    """transformers tests a 2-D mask for padding with ``mask.all()`` on the device, a host wait on
    a GPU; forward_attention_mask decides on the host copy and gives the same outputs."""
    from .conftest import REPO
    from .host_reads import HostReads

    torch.manual_seed(0)
    model = build_model(model_config("tiny", MANIFEST)).eval()  # no dropout: outputs compare exactly
    ids = torch.randint(5, 8000, (3, 16))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 10:] = mask[2, 5:] = 0
    stock = model(input_ids=ids, attention_mask=mask).prediction_logits
    with HostReads(REPO) as stock_reads:
        model(input_ids=ids, attention_mask=mask).prediction_logits.sum().backward()
    assert stock_reads.sites and stock_reads.sites[0].startswith("transformers/masking_utils.py")
    forward_mask = forward_attention_mask(mask, mask.clone())
    assert (forward_mask is None) == (not padded)
    with HostReads(REPO) as reads:
        ours = model(input_ids=ids, attention_mask=forward_mask).prediction_logits
        ours.sum().backward()
    assert reads.sites == []
    torch.testing.assert_close(ours, stock, rtol=0, atol=0)
