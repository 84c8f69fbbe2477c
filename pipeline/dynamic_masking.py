"""Dynamic masking (RoBERTa): the data dir holds unmasked rows and the loader draws the
masks of every row anew each epoch.

The draws are preprocessing's own (``preprocessing.examples.mask_tokens``: the same
number of predictions, 80/10/10 replacement, whole words when the data asks for them),
keyed by a hash of (seed, epoch, row) instead of the example's key. A row's masks
therefore depend on nothing but those three: the same for any batch it lands in, any
number of processes, and after a resume; different in the next epoch. Evaluation uses
epoch 0's masks, so every evaluation scores the same predictions.
"""

from __future__ import annotations

import os

import numpy as np
import xxhash

from preprocessing import examples, subwords, vocab

_GOLDEN = np.uint64(0x9E37_79B9_7F4A_7C15)


class DynamicMasker:
    """Masks batches of unmasked rows for one data dir and seed."""

    def __init__(self, data_dir: str, manifest: dict, seed: int):
        masking = manifest["masking"]
        tokenizer = manifest["tokenizer"]
        if masking.get("word_segmenter") == "jieba" and examples.WORD_STARTS not in (manifest.get("columns") or {}):
            raise ValueError(f"{data_dir}/manifest.json: jieba's whole words with dynamic masking, but the "
                             f"shards hold no {examples.WORD_STARTS} column (made by an older version): "
                             "preprocess again")
        self.seed = seed
        self.config = examples.ExampleConfig(
            max_seq_length=int(manifest["max_seq_length"]), masked_lm_prob=float(masking["masked_lm_prob"]),
            max_predictions_per_seq=int(masking["max_predictions_per_seq"]),
            whole_word_mask=bool(masking.get("whole_word_mask")), objective=manifest.get("objective", "mlm-nsp"))
        folder = os.path.join(data_dir, tokenizer.get("path", "tokenizer"))
        encoder = subwords.Encoder(_tokenizer_model(folder, tokenizer.get("kind", subwords.SENTENCEPIECE)))
        self.vocab = encoder.info
        ids = tokenizer["special_ids"]
        if (self.vocab.cls_id, self.vocab.sep_id, self.vocab.mask_id) != (ids["cls"], ids["sep"], ids["mask"]):
            raise ValueError(f"{folder}: its special ids differ from {data_dir}/manifest.json's")

    def keys(self, rows: np.ndarray, epoch: int) -> np.ndarray:
        """One 64-bit key per (seed, epoch, row): every draw of the row's masking is keyed by it."""
        base = np.uint64(xxhash.xxh3_64_intdigest(f"dynamic-masking:{self.seed}:{epoch}".encode()))
        return examples._mix64(base + (rows.astype(np.uint64) + np.uint64(1)) * _GOLDEN)

    def mask(self, rows: np.ndarray, epoch: int, original: np.ndarray, offsets: np.ndarray,
             len_a: np.ndarray, word_starts: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(masked input ids, row, position and original id of each prediction) for the rows
        held flat in ``original``; see ``examples.mask_tokens``. ``word_starts`` (parallel to
        ``original``): the rows' own word starts, where the data dir stores them."""
        return examples.mask_tokens(self.keys(rows, epoch), original, offsets, len_a, self.config, self.vocab,
                                    word_starts if self.config.whole_word_mask else None)


def _tokenizer_model(folder: str, kind: str) -> subwords.TokenizerModel:
    name = vocab.SPM_MODEL_FILE if kind == subwords.SENTENCEPIECE else subwords.WORDPIECE_FILE
    with open(os.path.join(folder, name), "rb") as f:
        return subwords.TokenizerModel(kind, f.read())
