"""The proof that pretraining helps, on real data: the same small BERT fine-tuned on Rotten Tomatoes
reviews (fresh vs rotten) from our pretrained checkpoint vs from random initialisation.

The checkpoint is the bundle in tests/data/pretrained_reviews, made by make_bundle.py there: the
pipeline's own export of a BERT pretrained (MLM + NSP) on the unlabelled text of the reviews' train
split, longer than CI can afford (87 CPU-minutes). Its provenance.json records the commands that
built it and the SHA-256 of the text it was pretrained on; the first test recomputes that text
from the bundled reviews and checks the hash and that no validation or test review is in it, so
the comparison cannot be flattered by leaked test text.

Fine-tuning (benchmarks/pretraining_helps.py) then uses the labels of 300 train reviews (the
regime where pretraining matters: at 1,000 labels this small model's gain is within noise), the
same flags and seeds for both inits, and no early stopping. It compares accuracy on the 1,281
test reviews: one standard error of a figure is about 1.3 points, so the mean gain over five
seeds must exceed MARGIN. The same check with the splits' roles swapped (best epoch chosen on
test, accuracy on validation) is the benchmark's, not CI's: `python
benchmarks/pretraining_helps.py`; docs/EXPERIMENTS.md has both splits' five-seed figures.
BERT_PIPELINE_REVIEWS_BUNDLE=DIR runs these tests against a bundle built elsewhere.
"""
import csv
import hashlib
import json
import os

import pytest

from benchmarks.pretraining_helps import BUNDLE, compare, review_task, summary
from pipeline.finetuning.model import tokenizer_fingerprint

# Five seeds: the mean gain's standard error is about 0.9 points, so MARGIN is two of them.
MARGIN, SEEDS = 0.02, (1, 2, 3, 4, 5)

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(BUNDLE, "provenance.json")),
    reason=f"no pretrained bundle in {BUNDLE}: build one with tests/data/pretrained_reviews/make_bundle.py")


def provenance() -> dict:
    with open(os.path.join(BUNDLE, "provenance.json")) as f:
        return json.load(f)


def texts(path: str) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    # The pretraining text is every train-split review whatever the labelled count; the seed fixes the split.
    return review_task(str(tmp_path_factory.mktemp("reviews")))


def test_bundle_was_pretrained_on_train_split_text_only(task):
    with open(task["unlabelled"], "rb") as f:
        pretraining_text = f.read()
    assert hashlib.sha256(pretraining_text).hexdigest() == provenance()["unlabelled_reviews_sha256"], (
        "the bundle was pretrained on other text than write_review_task makes now: rebuild it with "
        "tests/data/pretrained_reviews/make_bundle.py")
    lines = set(pretraining_text.decode("utf-8").splitlines())
    held_out = texts(task["validation"]) + texts(task["test"])
    assert len(held_out) > 2500
    assert not [t for t in held_out if " ".join(t.split()) in lines]
    # and the bundle's tokenizer is the one its pretraining data was made with
    assert tokenizer_fingerprint(BUNDLE) == provenance()["data_manifest"]["tokenizer"]["fingerprint"]


def masked_token_accuracy(model, tokenizer, sentences: list[str], seed: int = 0) -> tuple[float, float]:
    """Accuracy at 15% of the real tokens of SENTENCES replaced by [MASK], and the accuracy of always
    guessing the most frequent of the masked pieces (the floor a model must clear)."""
    import torch

    enc = tokenizer(sentences, truncation=True, max_length=64, padding=True, return_tensors="pt")
    ids = enc["input_ids"]
    special = torch.tensor([[t in tokenizer.all_special_ids for t in row] for row in ids.tolist()])
    generator = torch.Generator().manual_seed(seed)
    masked = (torch.rand(ids.shape, generator=generator) < 0.15) & ~special & enc["attention_mask"].bool()
    inputs = ids.masked_fill(masked, tokenizer.mask_token_id)
    with torch.no_grad():
        logits = model(input_ids=inputs, attention_mask=enc["attention_mask"],
                       token_type_ids=torch.zeros_like(inputs)).prediction_logits
    truth = ids[masked]
    accuracy = (logits.argmax(-1)[masked] == truth).float().mean().item()
    most_frequent = torch.bincount(truth).max().item() / len(truth)
    return accuracy, most_frequent


def test_bundle_fills_masked_tokens_of_unseen_reviews(task):
    import torch
    from transformers import AutoTokenizer, BertForPreTraining

    tokenizer = AutoTokenizer.from_pretrained(BUNDLE)
    pretrained = BertForPreTraining.from_pretrained(BUNDLE).eval()
    test_reviews = texts(task["test"])
    accuracy, floor = masked_token_accuracy(pretrained, tokenizer, test_reviews)
    torch.manual_seed(0)
    untrained, _ = masked_token_accuracy(BertForPreTraining(pretrained.config).eval(), tokenizer, test_reviews)
    print(f"\nmasked pieces of {len(test_reviews)} unseen test reviews filled: pretrained {accuracy:.3f}, "
          f"untrained {untrained:.3f}, most-frequent-piece guess {floor:.3f}")
    assert untrained < 0.01
    assert accuracy > 3 * floor


@pytest.mark.e2e
def test_pretrained_beats_random_init_on_real_reviews(task, tmp_path, record_property):
    accuracy = compare(task, SEEDS, "test", str(tmp_path))
    mean = {init: sum(a) / len(a) for init, a in accuracy.items()}
    for init in accuracy:
        record_property(f"{init}_test_accuracy", mean[init])
    print("\n" + summary(accuracy, "test", SEEDS))
    assert mean["pretrained"] > mean["random"] + MARGIN
