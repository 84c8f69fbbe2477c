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


def model_config(preset_or_path: str, manifest: dict, max_position_embeddings: int = 512,
                 values: dict | None = None):
    """A ``BertConfig`` of the named preset (or a config.json path) sized to the data.

    Vocabulary size and [PAD] come from the manifest, so model and tokenizer cannot
    disagree; a config file that says otherwise is refused, naming the field. ``values``: the
    file's JSON as a run recorded it at its start (``train_config.json``), read instead of the
    file, which may have moved since (a published BERT's folder, deleted after a continued run).
    """
    from transformers import BertConfig

    tokenizer = manifest["tokenizer"]
    data = {"vocab_size": tokenizer["vocab_size"], "pad_token_id": tokenizer["special_ids"]["pad"],
            "type_vocab_size": 2}
    if values is None and preset_or_path in PRESETS:
        config = BertConfig(**PRESETS[preset_or_path], max_position_embeddings=max_position_embeddings, **data)
    elif values is not None or os.path.isfile(preset_or_path):
        if values is None:
            values = read_config_file(preset_or_path)
        if not isinstance(values, dict):
            raise ModelConfigError(f"{preset_or_path}: a model config is a JSON object, not {type(values).__name__}")
        for key, want in data.items():
            if key in values and values[key] != want:
                raise ModelConfigError(f"{preset_or_path}: {key} is {values[key]} but the data's tokenizer "
                                       f"needs {want}")
        try:
            config = BertConfig(**{**values, **data})
        except Exception as err:  # noqa: BLE001 - transformers 5 validates fields with its own error types
            raise ModelConfigError(f"{preset_or_path}: not a valid BERT config ({type(err).__name__}: "
                                   f"{' '.join(str(err).split())})") from None
    else:
        raise ModelConfigError(f"--model {preset_or_path!r}: not a preset ({', '.join(PRESETS)}) "
                               "nor a config.json file")
    if not (isinstance(config.num_attention_heads, int) and config.num_attention_heads > 0
            and isinstance(config.hidden_size, int) and config.hidden_size > 0):
        raise ModelConfigError(f"{preset_or_path}: hidden_size {config.hidden_size!r} and num_attention_heads "
                               f"{config.num_attention_heads!r} must be positive whole numbers")
    if config.hidden_size % config.num_attention_heads:  # else BertSelfAttention fails, a traceback later
        raise ModelConfigError(f"{preset_or_path}: hidden_size {config.hidden_size} is not a multiple of "
                               f"num_attention_heads {config.num_attention_heads}")
    if manifest["max_seq_length"] > config.max_position_embeddings:
        # A published BERT's own config (--init-from) cannot grow its positions: a shorter length can.
        raise ModelConfigError(f"max_seq_length {manifest['max_seq_length']} of the data exceeds the "
                               f"max_position_embeddings {config.max_position_embeddings} of {preset_or_path}: "
                               f"preprocess with --max-seq-length {config.max_position_embeddings} or less, or, "
                               f"for a model trained from scratch, give --model a config.json whose "
                               f"max_position_embeddings is at least {manifest['max_seq_length']}")
    return config


def read_config_file(path: str):
    """A model config file's JSON (any JSON value: ``model_config`` refuses one that is no object)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelConfigError(f"{path}: not a readable JSON model config ({err})") from None


def build_model(config, sparse_mlm: bool = False):
    """``BertForPreTraining`` with PyTorch's fused SDPA attention.

    ``sparse_mlm``: the training variant whose MLM head runs on the masked positions only
    (same parameters and state dict; see ``SparseMlmBertForPreTraining``).
    """
    from transformers import BertForPreTraining

    config._attn_implementation = "sdpa"
    return (sparse_mlm_class() if sparse_mlm else BertForPreTraining)(config)


def forward_attention_mask(host_mask, device_mask):
    """The ``attention_mask`` a forward pass gets: None when the host copy of the 2-D mask has
    no padding, else the device copy as a 4-D boolean mask (batch, 1, 1, length).

    Given the 2-D mask, transformers tests it for padding on the device (``mask.all()`` in
    ``masking_utils``): a host wait for the GPU on every forward, which leaves the GPU idle while
    the next kernels launch. A 4-D mask it uses as it is, and with none SDPA may take its
    unmasked (flash) kernels, as transformers would on a batch without padding. Same outputs.
    """
    if host_mask.numpy().all():  # the host copy: no wait (a device tensor would raise here)
        return None
    return device_mask.bool()[:, None, None, :]


_SPARSE_CLASS = None


def sparse_mlm_class():
    """``BertForPreTraining`` whose forward also takes ``mlm_positions`` (flat indices of the
    masked tokens in the ``(batch, length)`` input) and then returns ``(mlm_logits for those
    positions, nsp_logits)``.

    Only ~15% of tokens are masked, yet the stock head projects every token onto the whole
    vocabulary: for BERT-base at 128 tokens that projection is 18% of the training FLOPs, and
    for a small model with a 32k vocabulary it is the largest matmul of all. NVIDIA's and
    Google's BERT code gather the masked positions first; so does this. The parameters are
    BertForPreTraining's own, so checkpoints and exports are unchanged. Built on first use so
    that importing this module does not import transformers.
    """
    global _SPARSE_CLASS
    if _SPARSE_CLASS is None:
        from transformers import BertForPreTraining

        class SparseMlmBertForPreTraining(BertForPreTraining):
            def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, mlm_positions=None,
                        **kwargs):
                if mlm_positions is None:
                    return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                           token_type_ids=token_type_ids, **kwargs)
                sequence, pooled = self.bert(input_ids, attention_mask=attention_mask,
                                             token_type_ids=token_type_ids, return_dict=True)[:2]
                masked = sequence.flatten(0, 1).index_select(0, mlm_positions)
                return self.cls.predictions(masked), self.cls.seq_relationship(pooled)

        _SPARSE_CLASS = SparseMlmBertForPreTraining
    return _SPARSE_CLASS


@dataclasses.dataclass(frozen=True)
class FlopCounter:
    """Training FLOPs per sequence, for MFU, counted two ways.

    Both count 6 FLOPs per matmul weight per token it multiplies (2 forward, 4 backward)
    and attention's QKᵀ and AV, 2 · 2 · T² · H per layer forward, times 3 with the
    backward: 12 · L · H · T². Embedding lookups, norms, softmax and GELU are not counted.

    - executed (``executed_per_sequence``): what this trainer runs on a sequence of T real
      tokens with P masked: 6 · (N_enc · T + N_mlm · P + N_cls) + 12 · L · H · T², with
      N_enc the encoder layers' matmul weights, N_mlm the MLM head's (its H×H transform and
      the vocabulary projection, tied to the embeddings but a real matmul) on the masked
      tokens only, N_cls the pooler and NSP classifier on [CLS] once. Padding is not counted.
      Over sequences of different lengths, the mean of T² (not the square of the mean T)
      counts attention: half 64s and half 128s run 11% more of it than all 96s.
    - model (``model_per_sequence``): the dense model on a full-length sequence, as
      published MFU figures count it (PaLM's appendix B, Megatron-LM's formula without
      recomputation, MosaicML's llm-foundry): 6 · N · T + 12 · L · H · T², T the data's
      max_seq_length, N every matmul weight (so the MLM head projects every position onto
      the vocabulary). It does not depend on the implementation: a sparse head, unpadding or
      padding change the time taken, not this count, so the MFU compares across codebases.
    """

    encoder_params: int
    mlm_head_params: int
    cls_params: int
    layers: int
    hidden: int

    @staticmethod
    def for_config(config) -> FlopCounter:
        h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        per_layer = 4 * h * h + 2 * h * i  # Q, K, V, output projections + the two FFN matrices
        return FlopCounter(layers * per_layer, h * h + h * config.vocab_size, h * h + 2 * h, layers, h)

    @property
    def matmul_params(self) -> int:
        return self.encoder_params + self.mlm_head_params + self.cls_params

    def _attention(self, tokens: float) -> float:
        return 12.0 * self.layers * self.hidden * tokens * tokens

    def executed_per_sequence(self, tokens: float, predictions: float, squared_tokens: float | None = None) -> float:
        """FLOPs run on one sequence of ``tokens`` real tokens, ``predictions`` of them masked; or
        the mean over sequences, given the means of the three and of the tokens squared."""
        squared = tokens * tokens if squared_tokens is None else squared_tokens
        return (6.0 * (self.encoder_params * tokens + self.mlm_head_params * predictions + self.cls_params)
                + 12.0 * self.layers * self.hidden * squared)

    def model_per_sequence(self, max_seq_length: int) -> float:
        """FLOPs of the dense model on one sequence of ``max_seq_length`` tokens."""
        return 6.0 * self.matmul_params * max_seq_length + self._attention(max_seq_length)
