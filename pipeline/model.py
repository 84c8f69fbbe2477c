"""The BERT model: named size presets, built to match a data dir's tokenizer.

The model file holds no distributed code: DeepSpeed wraps what ``build_model`` returns.
"""

from __future__ import annotations

import dataclasses
import json
import os

# Sizes from the BERT paper (base, large) and Turc et al. 2019's compact models (mini,
# small); tiny is for tests: one step takes 10-25 ms on a 2-core CPU.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


class ModelConfigError(ValueError):
    """A model that does not fit the data; the message names the field."""


def model_config(preset_or_path: str, manifest: dict, max_position_embeddings: int = 512):
    """A ``BertConfig`` of the named preset (or a config.json path) sized to the data.

    Vocabulary size and [PAD] come from the manifest, so model and tokenizer cannot
    disagree; a config file that says otherwise is refused, naming the field.
    """
    from transformers import BertConfig

    tokenizer = manifest["tokenizer"]
    data = {"vocab_size": tokenizer["vocab_size"], "pad_token_id": tokenizer["special_ids"]["pad"],
            "type_vocab_size": 2}
    if preset_or_path in PRESETS:
        config = BertConfig(**PRESETS[preset_or_path], max_position_embeddings=max_position_embeddings, **data)
    elif os.path.isfile(preset_or_path):
        with open(preset_or_path) as f:
            values = json.load(f)
        for key, want in data.items():
            if key in values and values[key] != want:
                raise ModelConfigError(f"{preset_or_path}: {key} is {values[key]} but the data's tokenizer "
                                       f"needs {want}")
        config = BertConfig(**{**values, **data})
    else:
        raise ModelConfigError(f"--model {preset_or_path!r}: not a preset ({', '.join(PRESETS)}) "
                               "nor a config.json file")
    if manifest["max_seq_length"] > config.max_position_embeddings:
        raise ModelConfigError(f"max_seq_length {manifest['max_seq_length']} of the data exceeds the model's "
                               f"max_position_embeddings {config.max_position_embeddings}")
    return config


def build_model(config):
    """``BertForPreTraining`` with PyTorch's fused SDPA attention."""
    from transformers import BertForPreTraining

    config._attn_implementation = "sdpa"
    return BertForPreTraining(config)


@dataclasses.dataclass(frozen=True)
class FlopCounter:
    """Training FLOPs per sequence, for MFU.

    FLOPs = 6 · N · T + 12 · L · H · T² per sequence of T tokens: 6 per parameter per
    token for the forward and backward matrix multiplies (N = parameters outside the
    embedding tables, which are lookups, plus the tied output projection onto the
    vocabulary, which is a real matmul), and the attention scores and weighted sums,
    QKᵀ and AV, 2 · 2 · T² · H per layer forward, times 3 with the backward.
    """

    matmul_params: int
    layers: int
    hidden: int

    @staticmethod
    def for_config(config) -> FlopCounter:
        h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        per_layer = 4 * h * h + 2 * h * i  # Q, K, V, output projections + the two FFN matrices
        heads = h * h + h * config.vocab_size + h * h  # MLM transform, decoder (tied), pooler
        return FlopCounter(layers * per_layer + heads, layers, h)

    def per_sequence(self, tokens: int) -> float:
        return 6.0 * self.matmul_params * tokens + 12.0 * self.layers * self.hidden * tokens * tokens
