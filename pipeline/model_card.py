"""The ``README.md`` model card written into every export and fine-tuned model folder.

A folder pushed to the Hugging Face Hub as it is then says what it holds and how to load it: the
architecture and objective, the length it was trained at (positions past it never were), the
tokenizer (a SentencePiece vocabulary that ``BertTokenizer``/``BertTokenizerFast`` would misread
as WordPiece, silently giving other ids), a script conversion its input needs, the data and the
run ids. The licence of the training text is the user's to state: the card says so instead of
guessing one.
"""

from __future__ import annotations

import os

CARD = "README.md"
OBJECTIVES = {"mlm-nsp": "masked language modelling and next-sentence prediction (Google's BERT recipe)",
              "mlm": "masked language modelling only (full sentences packed into each row; no next-sentence task)"}


def _front_matter(pipeline_tag: str, language: str | None, tags: list[str]) -> str:
    lines = ["---", "library_name: transformers", f"pipeline_tag: {pipeline_tag}"]
    if language:
        lines.append(f"language: {language}")
    lines += ["tags:", *(f"- {tag}" for tag in tags), "---", ""]
    return "\n".join(lines)


def _shown(value) -> str:
    """A field as the card prints it: what is not known (a run without MLflow) says so."""
    return f"`{value}`" if value not in (None, "") else "not tracked"


def _licence(texts: str) -> str:
    return (f"The licence of a model follows from its {texts}: add a `license:` line to the front matter above "
            "before publishing")


def _architecture(config) -> str:
    return (f"BERT, {config.num_hidden_layers} layers, hidden size {config.hidden_size}, "
            f"{config.num_attention_heads} attention heads, vocabulary {config.vocab_size}")


def _tokenizer_section(convert: str | None, kind: str) -> str:
    if kind == "wordpiece":  # a published BERT's own vocabulary (continued pretraining)
        text = ("## Tokenizer\n\nA WordPiece vocabulary (`tokenizer.json`), loaded with `AutoTokenizer`. Input "
                "format: `[CLS] A [SEP] B [SEP]`, token type ids 0 then 1.\n")
    else:
        text = ("## Tokenizer\n\nA SentencePiece vocabulary (`spm.model`, and `tokenizer.json` for Hugging Face). "
                "Load it with `AutoTokenizer` (a `PreTrainedTokenizerFast`), not `BertTokenizer` or "
                "`BertTokenizerFast`, which would read the vocabulary as WordPiece and give other ids without an "
                "error. Input format: `[CLS] A [SEP] B [SEP]`, token type ids 0 then 1.\n")
    if convert:
        text += (f"\nThe training text was converted with OpenCC `{convert}` (e.g. Traditional to Simplified "
                 "Chinese): convert input the same way first (`opencc.OpenCC(\"" + convert + "\").convert(text)`), "
                 "or most of it is `[UNK]`.\n")
    return text


def pretrained_card(config, info: dict, manifest: dict, init_from: str | None = None) -> str:
    """The card of a pretraining export: ``info`` is its training_info.json, ``manifest`` the data dir's,
    ``init_from`` the weights a continued pretraining began from."""
    objective = manifest.get("objective", "mlm-nsp")
    masked_lm = objective == "mlm"
    masking = manifest.get("masking") or {}
    inputs = [os.path.basename(p) for p in (manifest.get("input") or {}).get("paths", [])]
    shown = ", ".join(f"`{name}`" for name in inputs[:10]) + (f" and {len(inputs) - 10} more" if len(inputs) > 10
                                                               else "")
    load_class = "AutoModelForMaskedLM" if masked_lm else "AutoModelForPreTraining"
    steps = f" for {info['step']} steps" if info.get("step") is not None else ""
    length = manifest["max_seq_length"]
    return "\n".join([
        _front_matter("fill-mask", manifest.get("language"), ["bert", "pretraining", "bert-pipeline"]),
        f"# A pretrained BERT ({info.get('tag')})",
        "",
        f"{_architecture(config)}. " + (f"Pretraining continued from `{init_from}`. " if init_from else "") +
        f"Objective: {OBJECTIVES.get(objective, objective)}; "
        f"{masking.get('mode', 'static')} masking of {masking.get('masked_lm_prob', 0.15):g} of the tokens"
        f"{', whole words' if masking.get('whole_word_mask') else ''}. Trained{steps} on "
        f"sequences of at most **{length} tokens**" + (
            f" in this run; the weights it continued from may have trained the positions past {length} "
            f"(a published BERT's 512): see their own card before giving it longer input than the tokenizer's "
            f"`model_max_length` ({length})." if init_from else
            f": the position embeddings past {length} are untrained, so truncate input to {length} tokens "
            "(the tokenizer's `model_max_length`)."),
        "",
        "```python",
        f"from transformers import AutoTokenizer, {load_class}, pipeline",
        "",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        f"model = {load_class}.from_pretrained(PATH)",
        "fill = pipeline(\"fill-mask\", model=PATH)",
        "```",
        "",
        ("Saved as `BertForMaskedLM`: the run trained no next-sentence head or pooler, so a sequence classifier "
         "built on it starts its pooler fresh." if masked_lm else
         "Saved as `BertForPreTraining` (the MLM and next-sentence heads, the pooler); a sequence classifier "
         "takes the encoder and pooler."),
        "",
        _tokenizer_section(manifest.get("convert"), manifest["tokenizer"].get("kind", "sentencepiece")),
        "## Data",
        "",
        (f"{info['train_rows']} training examples of the {manifest.get('num_examples')} made"
         if info.get("train_rows") is not None else f"{manifest.get('num_examples', 'unknown')} examples made")
        + f" from {shown or 'the input files'} "
        f"(language {_shown(manifest.get('language'))}). " + _licence("training text's")
        + "; Wikipedia text, for one, is CC BY-SA.",
        "",
        "## Lineage",
        "",
        f"MLflow runs: preprocessing {_shown(info.get('data_run_id'))}, pretraining "
        f"{_shown(info.get('pretrain_run_id'))}. `training_info.json` holds the checkpoint, the data dir and the "
        "tokenizer fingerprint.",
        "",
    ])


def finetuned_card(config, info: dict, test_metrics: dict | None) -> str:
    """The card of a fine-tuned model: ``info`` is its training_info.json."""
    task = info["task"]
    length = info["max_seq_length"]
    if task == "classification":
        labels = ", ".join(f"`{label}`" for label in info["labels"][:20]) + (", …" if len(info["labels"]) > 20 else "")
        what = f"Sequence classification into {len(info['labels'])} labels: {labels}."
    else:
        what = "Regression: one score per text (or text pair), the model's only output."
    scores = ", ".join(f"{k} {v:.4f}" for k, v in (test_metrics or {}).items())
    return "\n".join([
        _front_matter("text-classification", info.get("language"), ["bert", "bert-pipeline"]),
        "# A fine-tuned BERT",
        "",
        f"{_architecture(config)}. {what} Fine-tuned on texts of at most **{length} tokens** (truncate input "
        f"to {length}: `truncation=True, max_length={length}`).",
        "",
        *([f"Test split: {scores}.", ""] if scores else []),
        "```python",
        "from transformers import pipeline",
        "",
        f"classify = pipeline(\"text-classification\", model=PATH, truncation=True, max_length={length})",
        "```",
        "",
        _tokenizer_section(info.get("convert"), info.get("tokenizer_kind", "sentencepiece")),
        "## Lineage",
        "",
        (f"Fine-tuned from `{info.get('model')}`" if info.get("init", "pretrained") == "pretrained" else
         f"Trained from random weights in the architecture of `{info.get('model')}` (a baseline, not pretrained)")
        + f". MLflow runs: preprocessing {_shown(info.get('data_run_id'))}, pretraining "
        f"{_shown(info.get('pretrain_run_id'))}, fine-tuning {_shown(info.get('finetune_run_id'))}"
        + (f" (after fine-tuning {_shown(info['parent_finetune_run_id'])})" if info.get("parent_finetune_run_id")
           else "") + f". {_licence('pretraining and fine-tuning texts')}. `training_info.json` holds these "
        "fields; `report.json` beside this folder, the whole report.",
        "",
    ])


def write_card(directory: str, text: str) -> None:
    with open(os.path.join(directory, CARD), "w", encoding="utf-8") as f:
        f.write(text)
