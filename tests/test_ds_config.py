"""DeepSpeed configs: one home per value, loud batch arithmetic, and a real engine step."""

import json
import os

import pytest

from pipeline.ds_config import DsConfigError, inject, load_ds_config, plan_batches

from .conftest import REPO

DS_DIR = os.path.join(REPO, "ds_configs")
CONFIGS = sorted(f for f in os.listdir(DS_DIR) if f.endswith(".json"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_loads_and_is_documented(name):
    config = load_ds_config(os.path.join(DS_DIR, name))
    assert "zero_optimization" in config and "optimizer" in config
    assert f"`{name}`" in open(os.path.join(DS_DIR, "README.md")).read()
    precision = name.split("_")[2] if name.startswith("gpu") else name.split("_")[1]
    assert config.get(precision, {}).get("enabled", precision == "fp32") is True


def test_a_value_set_in_the_file_and_by_a_flag_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train_batch_size": 256, "zero_optimization": {"stage": 1}}))
    with pytest.raises(DsConfigError, match=r"sets 'train_batch_size', which comes from --global-batch-size"):
        load_ds_config(str(path))
    path.write_text(json.dumps({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}))
    with pytest.raises(DsConfigError, match=r"'optimizer.params.lr', which comes from --learning-rate"):
        load_ds_config(str(path))
    with pytest.raises(DsConfigError, match=r"--ds-config .*missing.json: no such file"):
        load_ds_config(str(tmp_path / "missing.json"))


def test_batch_arithmetic_is_exact_or_a_clear_error():
    plan = plan_batches(256, 16, 4)
    assert plan.accumulation_steps == 4
    with pytest.raises(DsConfigError, match=r"--global-batch-size 250 is not divisible by --micro-batch-size "
                                            r"16 x 4 processes = 64; use 192 or 256"):
        plan_batches(250, 16, 4)


def test_injected_config_drives_a_real_deepspeed_engine(monkeypatch):
    """One optimizer step of a tiny BERT on the CPU config, through deepspeed.initialize."""
    import deepspeed
    import torch

    from pipeline.model import build_model, model_config

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29517"}.items():
        monkeypatch.setenv(key, value)
    manifest = {"tokenizer": {"vocab_size": 500, "special_ids": {"pad": 0}}, "max_seq_length": 32}
    torch.manual_seed(0)
    model = build_model(model_config("tiny", manifest))
    config = inject(load_ds_config(os.path.join(DS_DIR, "cpu_fp32_zero2_torch-adamw.json")),
                    plan_batches(8, 4, 1), learning_rate=1e-3, weight_decay=0.01, grad_clip=1.0)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                   config=config)
    assert engine.gradient_accumulation_steps() == 2 and engine.train_batch_size() == 8
    assert optimizer.param_groups[0]["lr"] == 1e-3
    before = [p.detach().clone() for p in model.parameters()]
    batch = {"input_ids": torch.randint(5, 500, (4, 32)), "labels": torch.randint(5, 500, (4, 32)),
             "next_sentence_label": torch.randint(0, 2, (4,))}
    for _ in range(2):  # two micro-batches = one optimizer step
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
    assert engine.global_steps == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # The 1-process group stays up for later in-process tests: DeepSpeed caches its
    # groups, and a destroyed one breaks every engine built after it.
