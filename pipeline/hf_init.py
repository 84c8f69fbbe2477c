"""``--init-from`` a Hugging Face BERT directory: continued pretraining of a published model.

The directory holds ``config.json`` (model_type bert) and ``model.safetensors`` or
``pytorch_model.bin``, saved from ``BertForPreTraining``, ``BertForMaskedLM`` or ``BertModel``:
a downloaded ``bert-base-chinese``, or this project's own export ``RUN_DIR/hf/<tag>``.
The trainer still builds its own model (the sparse MLM head) from that config.json
(``TrainConfig`` makes it the default ``--model``); ``check`` refuses a directory that does not
fit the data or an explicit ``--model`` before anything is built, and ``load_weights`` maps the
saved weights onto the model. Errors are one line naming the directory, file and field.
"""

from __future__ import annotations

import json
import logging
import math
import os

from pipeline.model import ModelConfigError

log = logging.getLogger(__name__)
CONFIG = "config.json"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # each also as a sharded "<name>.index.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
# What must agree for the weights to fit and compute the same function (defaults: transformers 5
# dropped position_embedding_type, older config.json files still carry it).
ARCHITECTURE = {"hidden_size": None, "num_hidden_layers": None, "num_attention_heads": None,
                "intermediate_size": None, "max_position_embeddings": None, "type_vocab_size": None,
                "hidden_act": None, "layer_norm_eps": None, "position_embedding_type": "absolute"}
# Parts of BertForPreTraining that a BertForMaskedLM (no pooler, no NSP) or BertModel save lacks:
# they start freshly initialized, with a warning.
HEADS = {"bert.pooler.": "the pooler", "cls.predictions.": "the MLM head",
         "cls.seq_relationship.": "the NSP head"}
TIED = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}  # the embeddings, the head's bias
# Buffers that older transformers saved with the weights; the model rebuilds them.
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


class HfInitError(ModelConfigError):
    """A Hugging Face --init-from directory that does not fit; the message names the file and field."""


def is_hf_dir(path: str | None) -> bool:
    """A directory with ``config.json``; a run dir or checkpoint never has one."""
    return bool(path) and os.path.isfile(os.path.join(path, CONFIG))


def config_path(path: str) -> str:
    return os.path.abspath(os.path.join(path, CONFIG))


def read_config(path: str) -> dict:
    try:
        with open(os.path.join(path, CONFIG)) as f:
            values = json.load(f)
    except (OSError, ValueError) as err:
        raise HfInitError(f"--init-from {path}: {CONFIG} is unreadable ({err})") from None
    if not isinstance(values, dict) or values.get("model_type") != "bert":
        kind = values.get("model_type") if isinstance(values, dict) else None
        raise HfInitError(f"--init-from {path}: {CONFIG} model_type is {kind!r}; only BERT (model_type "
                          "'bert') can be continued")
    return values


def check(path: str, model: str, manifest: dict, data_dir: str) -> None:
    """Refuses ``path`` when its vocabulary, special ids or architecture disagree with the data
    (``manifest``) or with an explicit ``--model``. Cheap: nothing is built or loaded."""
    values = read_config(path)
    tokenizer = manifest["tokenizer"]
    advice = f"preprocess the corpus with the model's own tokenizer (run_beam.py --tokenizer {path})"
    for field, have, want, where in (
            ("vocab_size", values.get("vocab_size"), tokenizer["vocab_size"], "tokenizer.vocab_size"),
            ("pad_token_id", values.get("pad_token_id", 0), tokenizer["special_ids"]["pad"],
             "tokenizer.special_ids.pad")):
        if have != want:
            raise HfInitError(f"--init-from {path}: {CONFIG} {field} is {have} but --data {data_dir} has {want} "
                              f"(manifest {where}): {advice}")
    if os.path.abspath(model) != config_path(path):  # an explicit --model: it must be the same network
        _check_architecture(path, values, model, manifest)
    _check_tokenizer(path, manifest, data_dir, advice)


def _check_architecture(path: str, values: dict, model: str, manifest: dict) -> None:
    from transformers import BertConfig

    from pipeline.model import model_config

    mine, theirs = model_config(model, manifest), BertConfig(**values)
    for field, default in ARCHITECTURE.items():
        a, b = getattr(mine, field, default), getattr(theirs, field, default)
        if a != b:
            raise HfInitError(f"--model {model} conflicts with --init-from {path}: {field} is {a} in --model "
                              f"but {b} in its {CONFIG} (leave --model out: the architecture comes from the "
                              "directory)")


def token_ids(folder: str) -> tuple[dict[str, int], str | None, bool]:
    """(token → id, the file it came from, whether that is the whole vocabulary) of the
    tokenizer files in ``folder``; ({}, None, False) when there are none."""
    tokenizer_json, vocab_txt = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "vocab.txt")
    if os.path.isfile(tokenizer_json):
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(tokenizer_json).get_vocab(with_added_tokens=True), tokenizer_json, True
        except Exception as err:  # a newer or damaged format: say which file
            raise HfInitError(f"{tokenizer_json}: not a tokenizer the tokenizers library can read "
                              f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if os.path.isfile(vocab_txt):
        with open(vocab_txt, encoding="utf-8") as f:
            return {line.rstrip("\n"): i for i, line in enumerate(f)}, vocab_txt, True  # as BertTokenizer reads it
    config = _json(os.path.join(folder, "tokenizer_config.json"))
    added = config.get("added_tokens_decoder") or {}  # only the added (special) tokens' ids
    ids = {v["content"]: int(k) for k, v in added.items() if isinstance(v, dict) and "content" in v}
    return ids, os.path.join(folder, "tokenizer_config.json") if ids else None, False


def special_tokens(folder: str) -> dict[str, str]:
    """The special tokens' names (a model may rename [PAD] & co.): special_tokens_map.json, then
    tokenizer_config.json, else BERT's."""
    names = dict(SPECIAL_TOKENS)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        values = _json(os.path.join(folder, name))
        for key in names:
            token = values.get(f"{key}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str):
                names[key] = token
    return names


def _json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise HfInitError(f"{path}: unreadable ({err})") from None
    return values if isinstance(values, dict) else {}


def _check_tokenizer(path: str, manifest: dict, data_dir: str, advice: str) -> None:
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        log.warning("--init-from %s has no tokenizer files (%s): its token ids could not be checked against "
                    "--data %s beyond vocab_size", path, ", ".join(TOKENIZER_FILES), data_dir)
        return
    ids, source, whole = token_ids(path)
    for key, token in special_tokens(path).items():
        want, have = manifest["tokenizer"]["special_ids"][key], ids.get(token)
        if have is None and not whole:
            continue  # only the added tokens are listed: this one cannot be checked
        if have != want:
            raise HfInitError(f"--init-from {path}: {token} is id {have} in {source} but {want} in --data "
                              f"{data_dir} (manifest tokenizer.special_ids.{key}): {advice}")
    _check_casing(path, manifest, data_dir, advice)
    data_ids, data_source, data_whole = token_ids(os.path.join(data_dir, manifest["tokenizer"].get("path",
                                                                                                   "tokenizer")))
    if whole and data_whole and ids != data_ids:
        # Ordered by id: the first token whose id differs is where the vocabularies part.
        token = min((t for t in ids.keys() | data_ids.keys() if ids.get(t) != data_ids.get(t)),
                    key=lambda t: (min(ids.get(t, math.inf), data_ids.get(t, math.inf)), t))
        raise HfInitError(f"--init-from {path}: its vocabulary ({source}) is not --data {data_dir}'s "
                          f"({data_source}): token {token!r} is id {ids.get(token)} there but "
                          f"{data_ids.get(token)} in the data: {advice}")


def _check_casing(path: str, manifest: dict, data_dir: str, advice: str) -> None:
    """The same vocabulary lowercased or not gives other ids for "Paris": a cased model fed
    lowercased data (or the reverse) trains on text it never saw, so the two must agree
    where both say (tokenizer_config.json's do_lower_case; the manifest's tokenizer.lowercase,
    recorded for WordPiece data)."""
    lower = _json(os.path.join(path, "tokenizer_config.json")).get("do_lower_case")
    data_lower = manifest["tokenizer"].get("lowercase")
    if lower is not None and data_lower is not None and bool(lower) != bool(data_lower):
        raise HfInitError(f"--init-from {path}: its tokenizer is {'uncased' if lower else 'cased'} "
                          f"(tokenizer_config.json do_lower_case={str(bool(lower)).lower()}) but --data {data_dir} "
                          f"was made {'lowercased' if data_lower else 'cased'} (manifest tokenizer.lowercase): "
                          f"{advice}")


def read_weights(path: str) -> dict:
    """The directory's tensors, from safetensors or ``torch.load(weights_only=True)``: loading
    runs no code from the file. A sharded save (``*.index.json``) is merged."""
    for name in WEIGHTS:
        files = [name] if os.path.isfile(os.path.join(path, name)) else None
        index = os.path.join(path, f"{name}.index.json")
        if files is None and os.path.isfile(index):
            files = sorted(set(_json(index).get("weight_map", {}).values()))
        if files:
            state = {}
            for file in files:
                state.update(_load(os.path.join(path, file)))
            return state
    raise HfInitError(f"--init-from {path}: no {' or '.join(WEIGHTS)} (PyTorch weights; convert a TensorFlow "
                      "or Flax download first)")


def _load(file: str) -> dict:
    import pickle

    import torch

    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as err:
        raise HfInitError(f"{file}: refused or unreadable: only tensors are loaded "
                          f"({str(err).splitlines()[0]})") from None


def rename(state: dict, target: set[str]) -> dict:
    """``state``'s keys as ``BertForPreTraining`` names them."""
    renamed = {}
    for key, value in state.items():
        # TensorFlow-converted checkpoints (the original Google releases) name LayerNorm's
        # parameters gamma/beta.
        if key.endswith(".gamma"):
            key = key[:-len("gamma")] + "weight"
        elif key.endswith(".beta"):
            key = key[:-len("beta")] + "bias"
        if key not in target and f"bert.{key}" in target:
            key = f"bert.{key}"  # BertModel: the encoder without its "bert." prefix
        if key.endswith(BUFFERS) and key not in target:
            continue
        renamed[key] = value
    return renamed


def load_weights(model, path: str) -> dict:
    """Loads ``path``'s weights into ``model`` (the trainer's BertForPreTraining); returns the
    lineage: the directory and, for one of this project's exports, its pretraining run id."""
    target = model.state_dict()
    state = rename(read_weights(path), set(target))
    unexpected = sorted(set(state) - set(target))
    if unexpected:
        raise HfInitError(f"--init-from {path}: weights BertForPreTraining has no place for: "
                          f"{', '.join(unexpected[:8])}{' …' if len(unexpected) > 8 else ''} (not a BERT "
                          "pretraining, masked-LM or base model save?)")
    for key, value in state.items():
        if value.shape != target[key].shape:
            raise HfInitError(f"--init-from {path}: {key} has shape {tuple(value.shape)} but the model's is "
                              f"{tuple(target[key].shape)}")
    missing = set(target) - set(state) - TIED
    lacking = sorted(k for k in missing if not k.startswith(tuple(HEADS)))
    if lacking:
        raise HfInitError(f"--init-from {path}: the weights lack {', '.join(lacking[:8])}"
                          f"{' …' if len(lacking) > 8 else ''}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()  # the decoder is the word embeddings, loaded or not
    fresh = [f"{name} ({prefix}*)" for prefix, name in HEADS.items() if any(k.startswith(prefix) for k in missing)]
    if fresh:
        log.warning("--init-from %s has no weights for %s: freshly initialized", path, ", ".join(fresh))
    log.info("initialized the weights from %s (fresh optimizer and schedule)", path)
    return {"init_from": os.path.abspath(path), "init_from_run_id": _export_run_id(path)}


def _export_run_id(path: str) -> str | None:
    """The pretraining MLflow run of one of this project's exports (its training_info.json)."""
    from pipeline.export import TRAINING_INFO, is_own_export

    return _json(os.path.join(path, TRAINING_INFO)).get("pretrain_run_id") if is_own_export(path) else None
