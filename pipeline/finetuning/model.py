"""What fine-tuning starts from: a Hugging Face export, or a DeepSpeed checkpoint exported on the fly.

``--model`` may be an export (``RUN_DIR/hf/<tag>``, anything ``from_pretrained`` loads),
or a pretrain run dir, its ``checkpoints/`` or one tag dir. A checkpoint is turned into
an export with ``pipeline/export.py`` (ZeRO partitions included): the run's own
``hf/<tag>`` when pretraining already wrote it for that checkpoint, else a fresh export
under ``OUTPUT_DIR/pretrained/<tag>``, written by rank 0 while the others wait.

The tokenizer must be the one the model was pretrained with: a separate ``--tokenizer``
(or the export's own) is checked against the model's vocabulary size and [PAD] id, and
against the SentencePiece fingerprint recorded in ``training_info.json``.
"""

from __future__ import annotations

import json
import logging
import os

from pipeline import export

log = logging.getLogger(__name__)


class ModelSourceError(ValueError):
    """A model or tokenizer that cannot be fine-tuned; the message names the path and the field."""


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def read_training_info(hf_dir: str) -> dict:
    """The model dir's ``training_info.json`` ({} if it has none); a damaged one is named, not a traceback."""
    path = os.path.join(hf_dir, export.TRAINING_INFO)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"{path}: unreadable ({str(err).splitlines()[0]}); restore it, or export the "
                               "checkpoint again with pipeline/export.py") from None
    if not isinstance(info, dict):
        raise ModelSourceError(f"{path}: a JSON {type(info).__name__}, not the object pipeline/export.py writes")
    return info


def model_lineage(model_dir: str) -> dict[str, str]:
    """Run ids the model dir's files record: ``training_info.json`` (an export: pretraining and
    preprocessing runs; finetune.py's ``OUTPUT_DIR/model``: ``kind`` finetuned, and its own run) or,
    for a fine-tuned model saved before it had one, the ``report.json`` beside it."""
    recorded = read_training_info(model_dir)
    if recorded.get("kind") == "finetuned":
        info = {k: recorded.get(k) for k in ("finetune_run_id", "pretrain_run_id", "data_run_id")}
        return {"model_kind": "finetuned", **{k: str(v) for k, v in info.items() if v}}
    info = {k: recorded.get(k) for k in ("pretrain_run_id", "data_run_id")}
    kind = "pretrained" if os.path.isfile(os.path.join(model_dir, export.TRAINING_INFO)) else "unknown"
    report_path = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "report.json")
    if kind == "unknown" and os.path.isfile(report_path):
        try:
            with open(report_path) as f:
                report = json.load(f)
        except (OSError, ValueError):
            report = {}
        if isinstance(report, dict) and "task" in report:
            kind = "finetuned"
            info = {k: report.get(k) for k in ("finetune_run_id", "pretrain_run_id", "data_run_id")}
    return {"model_kind": kind, **{k: str(v) for k, v in info.items() if v}}  # unknown ids are left out, not "None"


def resolve_model_dir(model: str, output_dir: str, is_rank0: bool, barrier) -> str:
    """The Hugging Face dir to load: ``model`` itself, or the export of the checkpoint it names."""
    if not os.path.exists(model):
        raise ModelSourceError(f"--model {model}: no such file or directory")
    if is_hf_dir(model):
        return model
    try:
        run_dir, checkpoints, tag = export.resolve(model)
    except export.ExportError as err:
        raise ModelSourceError(f"--model {model}: neither a Hugging Face export (no config.json) nor a "
                               f"usable pretrain run: {err}") from None
    checkpoint_dir = os.path.join(checkpoints, tag)
    cached = os.path.join(run_dir, "hf", tag)
    # The same save of the tag, not one of another branch that reused its name (checkpoint.prune).
    if is_hf_dir(cached) and export.is_export_of(cached, checkpoints, tag):
        log.info("using the export of %s written by pretraining: %s", checkpoint_dir, cached)
        return cached
    out = os.path.abspath(os.path.join(output_dir, "pretrained", tag))
    if is_rank0:
        log.info("exporting %s to %s", checkpoint_dir, out)
        try:
            export.export_checkpoint(checkpoint_dir, out_dir=out)
        except export.ExportError as err:
            raise ModelSourceError(f"--model {model}: {err}") from None
    barrier()  # the others read the export once rank 0 has written it
    return out


def tokenizer_fingerprint(tokenizer_dir: str) -> str | None:
    """The fingerprint a data dir's manifest records for the SentencePiece tokenizer in
    ``tokenizer_dir``: its ``spm.model``'s (None: none there). A WordPiece tokenizer.json's
    fingerprint moves with how the file was saved (its added tokens' flags, which
    ``BertTokenizerFast`` rewrites), so a WordPiece tokenizer is compared by its ids instead
    (``load_tokenizer``)."""
    from preprocessing.subwords import SENTENCEPIECE, TokenizerModel
    from preprocessing.vocab import SPM_MODEL_FILE

    path = os.path.join(tokenizer_dir, SPM_MODEL_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return TokenizerModel(SENTENCEPIECE, f.read()).fingerprint


def default_max_length(tokenizer, model_config) -> int:
    """Tokens per text when none is asked for: the tokenizer's ``model_max_length`` (the
    pretraining length; unset or huge means none), at most the model's position embeddings."""
    limit = model_config.max_position_embeddings
    default = getattr(tokenizer, "model_max_length", None)
    return min(default if default and default < 1e9 else limit, limit)


# What a folder holding a tokenizer has (besides a SentencePiece *.model).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def load_tokenizer(hf_dir: str, tokenizer_dir: str | None, model_config):
    """The tokenizer, refused when it is not the model's: vocabulary size, [PAD] id, fingerprint."""
    from transformers import AutoTokenizer

    path = tokenizer_dir or hf_dir
    flag = "--tokenizer" if tokenizer_dir else "--model"
    if os.path.isdir(path) and not _has_tokenizer(path):
        # transformers then makes a tokenizer of its special tokens alone (5 of them): refused below
        # for its vocabulary size, which blamed the wrong thing
        raise ModelSourceError(f"{flag} {path}: no tokenizer files there ({', '.join(TOKENIZER_FILES)} or a "
                               "SentencePiece .model): pass --tokenizer with the folder of the one it was pretrained "
                               "with (the data dir's tokenizer/)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"{flag} {path}: cannot load a tokenizer ({str(err).splitlines()[0]})") from None
    if len(tokenizer) != model_config.vocab_size:
        raise ModelSourceError(f"{flag} {path}: the tokenizer has {len(tokenizer)} tokens but the model in {hf_dir} "
                               f"has vocab_size {model_config.vocab_size}: use the tokenizer it was pretrained with")
    if model_config.pad_token_id is not None and tokenizer.pad_token_id != model_config.pad_token_id:
        raise ModelSourceError(f"{flag} {path}: [PAD] is id {tokenizer.pad_token_id} but the model in {hf_dir} has "
                               f"pad_token_id {model_config.pad_token_id}")
    expected = read_training_info(hf_dir).get("tokenizer_fingerprint") or tokenizer_fingerprint(hf_dir)
    actual = tokenizer_fingerprint(path)
    if expected and actual and expected != actual:
        raise ModelSourceError(f"{flag} {path}: tokenizer fingerprint {actual[:12]}… differs from the one the model "
                               f"in {hf_dir} was pretrained with ({expected[:12]}…, training_info.json "
                               "tokenizer_fingerprint): use that tokenizer")
    if actual is None and tokenizer_dir and _has_tokenizer(hf_dir):
        _check_same_ids(tokenizer, path, flag, hf_dir)
    return tokenizer


def _has_tokenizer(folder: str) -> bool:
    return os.path.isdir(folder) and any(name in TOKENIZER_FILES or name.endswith(".model")
                                         for name in os.listdir(folder))


def _check_same_ids(tokenizer, path: str, flag: str, hf_dir: str) -> None:
    """A tokenizer without a SentencePiece model (a WordPiece vocabulary) against the model's own
    (an export ships the one it was pretrained with): the same size and [PAD] alone let another
    vocabulary's ids through, every token then meaning another."""
    from transformers import AutoTokenizer

    try:
        own = AutoTokenizer.from_pretrained(hf_dir).get_vocab()
    except (OSError, ValueError):
        return  # the model dir's own files do not load: nothing to compare with
    given = tokenizer.get_vocab()
    if given != own:
        token = min((t for t in given.keys() | own.keys() if given.get(t) != own.get(t)),
                    key=lambda t: (min(given.get(t, 1 << 62), own.get(t, 1 << 62)), t))
        raise ModelSourceError(f"{flag} {path}: its vocabulary is not the one the model in {hf_dir} was pretrained "
                               f"with: token {token!r} is id {given.get(token)} there but {own.get(token)} in the "
                               "model's tokenizer: use that tokenizer")


def build_classifier(hf_dir: str, task: str, labels: list[str], init: str, reinit_pooler: bool = False):
    """A sequence classifier (or regressor: one output) on the pretrained encoder, or untrained."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(hf_dir)
    # A model fine-tuned before (MNLI before RTE; a token classifier) brings its task's head: it is
    # replaced like a pretraining head, whatever its label count, unless it is a sequence head of
    # this very task and labels (more data for the same task).
    source = config.architectures or ()
    pretraining = all(name.endswith(_PRETRAINING_CLASSES) for name in source)
    same_task = (any(name.endswith("ForSequenceClassification") for name in source)
                 and _same_labels(config, task, labels))
    from_classifier = not pretraining and not same_task
    if task == "classification":
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
        config.problem_type = "single_label_classification"
    else:
        config.num_labels = 1
        config.id2label, config.label2id = {0: "score"}, {"score": 0}
        config.problem_type = "regression"
    config.architectures = None
    if init == "random":
        return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    from transformers.utils import logging as hf_logging

    # The pretraining heads are left out and the classifier starts fresh by design: say so in one
    # line instead of the library's table of "unexpected" and "missing" weights.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            hf_dir, config=config, attn_implementation="sdpa", ignore_mismatched_sizes=from_classifier)
    finally:
        hf_logging.set_verbosity(verbosity)
    if from_classifier:  # every layer outside the encoder
        prefix = model.base_model_prefix
        _reinitialise([m for name, m in model.named_modules() if name and name.split(".")[0] != prefix],
                      config.initializer_range)
    pooler = getattr(getattr(model, model.base_model_prefix, None), "pooler", None)
    if reinit_pooler and pooler is not None:
        _reinitialise(list(pooler.modules()), config.initializer_range)
    log.info("encoder loaded from %s; %s head %s for %d output(s)%s", hf_dir, task,
             "kept (the model was fine-tuned on these labels)" if same_task else
             "initialised (the previous task's replaced)" if from_classifier else "initialised", config.num_labels,
             " and the pooler re-initialised" if reinit_pooler and pooler is not None else "")
    return model


# What an export of pretraining (or a bare encoder) is saved as: its heads are never a task's.
_PRETRAINING_CLASSES = ("ForPreTraining", "ForMaskedLM", "Model")


def _same_labels(config, task: str, labels: list[str]) -> bool:
    """Whether a fine-tuned sequence model's head already predicts ``labels`` (or one score) in order."""
    if task == "regression":
        return config.problem_type == "regression" and config.num_labels == 1
    return (config.problem_type in (None, "single_label_classification")
            and [config.id2label.get(i) for i in range(config.num_labels)] == list(labels))


def _reinitialise(modules, initializer_range: float) -> None:
    """BERT's own initialisation of the linear and LayerNorm layers among ``modules``, done by hand:
    transformers' ``_init_weights`` skips tensors it loaded from a checkpoint."""
    import torch

    with torch.no_grad():
        for module in modules:
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, initializer_range)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
