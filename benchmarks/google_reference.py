"""Google's create_pretraining_data.py (google-research/bert, commit eedf571), ported to lists
of token ids: the reference that ``preprocessing/examples.py`` is timed against
(``benchmarks/example_creation.py``) and checked against (``tests/test_example_statistics.py``).

The logic is Google's, line for line, strings aside: ``create_instances_from_document``,
``create_masked_lm_predictions`` and ``truncate_seq_pair``, drawing from ``rng`` in the same
order. Two switches serve the test, both off by default:

* ``masking=None`` leaves masking out: instances are ``(tokens_a, tokens_b, is_random_next)``,
  the segments before any mask is drawn (our masking is keyed differently on purpose).
* ``another_document=True`` draws the random document once among the *other* documents, the
  deviation ``examples.py`` makes on purpose, instead of Google's up to 10 draws that may all
  hit the current document.

Imported as ``benchmarks.google_reference`` by the tests (the repository root is on their
path) and as ``google_reference`` by the benchmark run as a file (its folder is on the path).
"""

from __future__ import annotations

import collections
from typing import NamedTuple

MaskedLm = collections.namedtuple("MaskedLm", ["index", "label"])


class Masking(NamedTuple):
    """What Google's create_masked_lm_predictions needs, with ids for its special tokens."""

    masked_lm_prob: float
    max_predictions_per_seq: int
    vocab_words: list[int]
    cls: int
    sep: int
    mask: int
    # word_start[id]: the piece starts a word (whole-word masking); None: every piece alone.
    word_start: list[bool] | None = None


def create_training_instances(all_documents, max_seq_length, dupe_factor, short_seq_prob, masking, rng):
    """Every document's instances, ``dupe_factor`` times over (without Google's final shuffle)."""
    instances = []
    for _ in range(dupe_factor):
        for document_index in range(len(all_documents)):
            instances.extend(create_instances_from_document(
                all_documents, document_index, max_seq_length, short_seq_prob, rng, masking))
    return instances


def create_instances_from_document(all_documents, document_index, max_seq_length, short_seq_prob, rng,
                                   masking: Masking | None = None, another_document: bool = False):
    """One document's instances: with ``masking``, (tokens, segment_ids, is_random_next,
    masked_lm_positions, masked_lm_labels); without, (tokens_a, tokens_b, is_random_next)."""
    document = all_documents[document_index]
    max_num_tokens = max_seq_length - 3
    target_seq_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_seq_length = rng.randint(2, max_num_tokens)
    instances = []
    current_chunk = []
    current_length = 0
    i = 0
    while i < len(document):
        segment = document[i]
        current_chunk.append(segment)
        current_length += len(segment)
        if i == len(document) - 1 or current_length >= target_seq_length:
            if current_chunk:
                a_end = 1
                if len(current_chunk) >= 2:
                    a_end = rng.randint(1, len(current_chunk) - 1)
                tokens_a = []
                for j in range(a_end):
                    tokens_a.extend(current_chunk[j])
                tokens_b = []
                is_random_next = False
                if len(current_chunk) == 1 or rng.random() < 0.5:
                    is_random_next = True
                    target_b_length = target_seq_length - len(tokens_a)
                    if another_document:
                        random_document_index = rng.randint(0, len(all_documents) - 2)
                        if random_document_index >= document_index:
                            random_document_index += 1
                    else:
                        for _ in range(10):
                            random_document_index = rng.randint(0, len(all_documents) - 1)
                            if random_document_index != document_index:
                                break
                    random_document = all_documents[random_document_index]
                    random_start = rng.randint(0, len(random_document) - 1)
                    for j in range(random_start, len(random_document)):
                        tokens_b.extend(random_document[j])
                        if len(tokens_b) >= target_b_length:
                            break
                    num_unused_segments = len(current_chunk) - a_end
                    i -= num_unused_segments
                else:
                    is_random_next = False
                    for j in range(a_end, len(current_chunk)):
                        tokens_b.extend(current_chunk[j])
                truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
                assert len(tokens_a) >= 1
                assert len(tokens_b) >= 1
                if masking is None:
                    instances.append((tokens_a, tokens_b, is_random_next))
                else:
                    tokens = [masking.cls, *tokens_a, masking.sep, *tokens_b, masking.sep]
                    segment_ids = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
                    tokens, masked_lm_positions, masked_lm_labels = create_masked_lm_predictions(
                        tokens, masking, rng)
                    instances.append((tokens, segment_ids, is_random_next, masked_lm_positions,
                                      masked_lm_labels))
            current_chunk = []
            current_length = 0
        i += 1
    return instances


def create_masked_lm_predictions(tokens, masking: Masking, rng):
    """(output tokens, masked positions, their original ids), as Google draws them."""
    cls, sep, word_start = masking.cls, masking.sep, masking.word_start  # locals, like Google's literals
    cand_indexes = []
    for (i, token) in enumerate(tokens):
        if token == cls or token == sep:
            continue
        if word_start is not None and len(cand_indexes) >= 1 and not word_start[token]:
            cand_indexes[-1].append(i)
        else:
            cand_indexes.append([i])
    rng.shuffle(cand_indexes)
    output_tokens = list(tokens)
    num_to_predict = min(masking.max_predictions_per_seq,
                         max(1, int(round(len(tokens) * masking.masked_lm_prob))))
    masked_lms = []
    covered_indexes = set()
    for index_set in cand_indexes:
        if len(masked_lms) >= num_to_predict:
            break
        if len(masked_lms) + len(index_set) > num_to_predict:
            continue
        is_any_index_covered = False
        for index in index_set:
            if index in covered_indexes:
                is_any_index_covered = True
                break
        if is_any_index_covered:
            continue
        for index in index_set:
            covered_indexes.add(index)
            masked_token = None
            if rng.random() < 0.8:
                masked_token = masking.mask
            else:
                if rng.random() < 0.5:
                    masked_token = tokens[index]
                else:
                    masked_token = masking.vocab_words[rng.randint(0, len(masking.vocab_words) - 1)]
            output_tokens[index] = masked_token
            masked_lms.append(MaskedLm(index=index, label=tokens[index]))
    masked_lms = sorted(masked_lms, key=lambda x: x.index)
    return output_tokens, [p.index for p in masked_lms], [p.label for p in masked_lms]


def truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng):
    """Removes a token at a time, front or back by a coin, from the longer list (B on a tie)."""
    while True:
        total_length = len(tokens_a) + len(tokens_b)
        if total_length <= max_num_tokens:
            break
        trunc_tokens = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        assert len(trunc_tokens) >= 1
        if rng.random() < 0.5:
            del trunc_tokens[0]
        else:
            trunc_tokens.pop()
