"""Sentence embeddings from a Hugging Face BERT dir this project writes: reading, batching, pooling, writing.

The model dir is a pretraining export (``RUN_DIR/hf/<tag>``: ``config.json``, weights, the
tokenizer, ``training_info.json``) or a fine-tuned model (``OUTPUT_DIR/model`` of
finetune.py, with ``OUTPUT_DIR/report.json`` beside it). Only the encoder is loaded
(``AutoModel``): pretraining and classification heads are left out.

A chunk's rows are embedded in batches of like length (a batch pads to its longest row, so
row order would make short texts cost as much as long ones) and put back in input order.
With several processes, process r takes chunks r, r+W, r+2W, …, writes each to a part
file, and rank 0 streams the parts in chunk order into OUT. The output is written to a
temporary file and renamed, so a reader never sees half a file.

The input is checked, then streamed, by ``pipeline/embed_inputs.py``: a process holds one chunk
of 16,384 rows (texts, token ids, vectors: about 70 MB at 768 dims and 128 tokens) whatever
the input's size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time

import numpy as np

from pipeline.output_path import temp_beside
from pipeline.tokenized import tokenize

POOLINGS = ("cls", "mean")
# embed.py's flag defaults.
TEXT_COLUMN = "text"
POOLING = "cls"
BATCH_SIZE = 64


log = logging.getLogger(__name__)


class LogProgress:
    """Progress as a log line a minute, where no bar is drawn (a batch job's log): an hours-long
    run printed nothing between its start and its last line."""

    def __init__(self, total: int, every_seconds: float = 60.0):
        self.total, self.done, self.every = total, 0, every_seconds
        self.started = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            log.info("embedded %d of %d texts (%.0f a second, %.0f s left)", self.done, self.total, rate,
                     (self.total - self.done) / max(rate, 1e-9))


class EmbedError(ValueError):
    """A bad flag or model dir; the message names the flag or the file."""


# ---------------------------------------------------------------------------- the model
def script_converter(model_dir: str):
    """(conversion, converter) to convert texts as the model's pretraining text was (``--convert
    t2s``, recorded in an export's ``training_info.json``), as fine-tuning does: its vocabulary
    holds the converted script only. (None, None) for a model trained on text as it was."""
    from pipeline.finetuning.model import read_training_info
    from preprocessing.language import Converter

    convert = read_training_info(model_dir).get("convert")
    return (convert, Converter(convert)) if convert else (None, None)


def model_folder(model_dir: str) -> str:
    """The Hugging Face dir --model names: itself, or for a pretraining run dir (fine-tuning takes
    one) the export pretraining wrote of its newest checkpoint."""
    from pipeline import export
    from pipeline.finetuning.model import is_hf_dir

    if not os.path.isdir(model_dir) or is_hf_dir(model_dir):
        return model_dir  # load_model says what is wrong with it
    try:
        run_dir, checkpoints, tag = export.resolve(model_dir)
    except export.ExportError:
        return model_dir
    cached = os.path.join(run_dir, "hf", tag)
    # a run dir or its checkpoints/ resolve to the newest tag; a tag dir to itself
    one_tag = os.path.realpath(model_dir) == os.path.realpath(os.path.join(checkpoints, tag))
    if not (is_hf_dir(cached) and export.is_export_of(cached, checkpoints, tag)):
        what = f"a pretraining checkpoint, {tag}, without an" if one_tag else \
            f"a pretraining run whose newest checkpoint, {tag}, has no"
        raise EmbedError(f"--model {model_dir}: {what} export: python pipeline/export.py {model_dir}, then pass the "
                         "folder it writes")
    log.info("--model %s: using the export of %s, %s", model_dir, "that checkpoint" if one_tag else
             "its newest checkpoint", cached)
    return cached


def load_model(model_dir: str):
    """(encoder in eval mode, tokenizer); the tokenizer checked against the model as fine-tuning does."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    from pipeline.finetuning.model import is_hf_dir, load_tokenizer

    if not os.path.isdir(model_dir):
        raise EmbedError(f"--model {model_dir}: no such directory")
    if not is_hf_dir(model_dir):
        raise EmbedError(f"--model {model_dir}: not a Hugging Face model dir (no config.json); export a checkpoint "
                         "with pipeline/export.py, or pass finetune.py's OUTPUT_DIR/model")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:  # a damaged config.json: one line, not the library's traceback
        raise EmbedError(f"--model {model_dir}: config.json does not load ({' '.join(str(err).split())[:300]})"
                         ) from None
    tokenizer = load_tokenizer(model_dir, None, config)
    # The heads are left out by design: one line of ours instead of the library's table of unused weights.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # a bar for loading a few dozen tensors is noise in a batch log
    from safetensors import SafetensorError

    try:
        model = AutoModel.from_pretrained(model_dir, add_pooling_layer=False)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # no weights file, or a truncated one
        raise EmbedError(f"--model {model_dir}: the weights do not load ({' '.join(str(err).split())[:300]})"
                         ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def resolve_max_length(requested: int | None, tokenizer, model_config) -> int:
    """``--max-length``, or the tokenizer's (the pretraining length), at most the position embeddings."""
    from pipeline.finetuning.model import default_max_length

    limit = model_config.max_position_embeddings
    if requested is None:
        return default_max_length(tokenizer, model_config)
    if not 2 < requested <= limit:
        raise EmbedError(f"--max-length {requested}: must be in 3..{limit} (the model's max_position_embeddings)")
    return requested


# ---------------------------------------------------------------------------- embedding
def length_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Positions in batches of like length, longest first (a too-long batch fails at once, not at the end)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pool(hidden, mask, pooling: str):
    """[CLS]'s last hidden state, or the mean over the real tokens (padding left out by the mask)."""
    hidden = hidden.float()
    if pooling == "cls":
        return hidden[:, 0]
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def embed_texts(model, tokenizer, texts: list[str], *, max_length: int, pooling: str = POOLING,
                normalize: bool = False, batch_size: int = BATCH_SIZE, bf16: bool = False,
                progress=None) -> tuple[np.ndarray, int]:
    """(float32 [len(texts), hidden] in the order of ``texts``, rows cut at ``max_length``)."""
    import torch

    if pooling not in POOLINGS:
        raise EmbedError(f"--pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
    device = next(model.parameters()).device
    ids, _, truncated = tokenize(tokenizer, texts, None, max_length)  # flat arrays (pipeline/tokenized.py)
    lengths = ids.lengths()
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    pad = tokenizer.pad_token_id
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast(device.type, enabled=False)
    with torch.inference_mode(), autocast:
        for positions in length_batches(lengths, batch_size):
            width = int(lengths[positions].max())
            batch = np.full((len(positions), width), pad, dtype=np.int64)
            mask = np.zeros((len(positions), width), dtype=np.int64)
            for k, p in enumerate(positions):
                batch[k, :lengths[p]], mask[k, :lengths[p]] = ids[p], 1
            input_ids, attention = torch.from_numpy(batch).to(device), torch.from_numpy(mask).to(device)
            hidden = model(input_ids=input_ids, attention_mask=attention,
                           token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            vectors = pool(hidden, attention, pooling)
            if normalize:
                vectors = torch.nn.functional.normalize(vectors, dim=-1)
            out[positions] = vectors.float().cpu().numpy()
            if progress is not None:
                progress.update(len(positions))
    return out, truncated


# ---------------------------------------------------------------------------- writing
def check_out(out: str, source: str) -> None:
    """Refuses an ``--out`` that cannot be written, or whose writing would destroy the input."""
    from pipeline.output_path import OutputPathError, check_output_file

    try:
        # a Parquet file: any other name (labels.csv) was replaced by Parquet bytes without a word
        check_output_file("--out", out, "embeddings.parquet", suffixes=(".parquet",))
    except OutputPathError as err:
        raise EmbedError(str(err)) from None
    if os.path.exists(out) and os.path.exists(source) and os.path.samefile(out, source):
        raise EmbedError(f"--out {out} is --input: writing the embeddings would replace the texts; name another file")


def output_schema(id_column: str, id_type, metadata: dict | None = None):
    """``id_column`` (of pyarrow type ``id_type``; None: the row numbers, int64) and ``embedding``
    (list<float32>); how the vectors were made in the schema's metadata."""
    import pyarrow as pa

    schema = pa.schema([pa.field(id_column, pa.int64() if id_type is None else id_type),
                        pa.field("embedding", pa.list_(pa.float32()))])
    return schema.with_metadata({k: str(v) for k, v in (metadata or {}).items()})


def chunk_table(schema, ids: list, embeddings: np.ndarray):
    """Rows of the output: ``ids`` as the schema's id type, each embedding a list<float32>."""
    import pyarrow as pa

    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = embeddings.shape
    offsets = pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32))
    vectors = pa.ListArray.from_arrays(offsets, pa.array(embeddings.reshape(-1)))
    return pa.Table.from_arrays([pa.array(ids, type=schema.field(0).type), vectors], schema=schema)


class ParquetOut:
    """OUT written a chunk at a time into a temporary file in its folder, renamed on ``commit``:
    readers see the old file or the whole new one, and a failed run leaves no partial file."""

    def __init__(self, path: str, schema):
        import pyarrow.parquet as pq

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.temp = path, temp_beside(path)
        try:
            self.writer = pq.ParquetWriter(self.temp, schema)
        except BaseException:  # a full disk at the start: no empty temporary file left behind
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.temp)
            raise

    def write(self, table) -> None:
        self.writer.write_table(table)

    def commit(self) -> str:
        self.writer.close()
        os.replace(self.temp, self.path)
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if os.path.exists(self.temp):  # not committed: an error, or a stop
            try:
                self.writer.close()
            finally:
                os.remove(self.temp)


def write_atomic(table, path: str) -> str:
    """A temporary file in the same dir, then a rename."""
    with ParquetOut(path, table.schema) as out:
        out.write(table)
        return out.commit()


def parts_dir(out: str) -> str:
    return f"{out}.parts"


def part_path(out: str, chunk: int) -> str:
    return os.path.join(parts_dir(out), f"chunk-{chunk:08d}.parquet")


def merge_parts(out: str, schema, chunk_rows: list[int]) -> str:
    """Rank 0, after the barrier: the chunks' parts (``chunk_rows[k]`` rows in part k), in order,
    as OUT, streamed a part at a time; the parts removed."""
    import pyarrow.parquet as pq

    with ParquetOut(out, schema) as writer:
        for k, rows in enumerate(chunk_rows):
            path = part_path(out, k)
            if not os.path.exists(path):
                raise RuntimeError(f"{path}: missing (its process ended without writing it?)")
            part = pq.read_table(path)
            if part.num_rows != rows:
                raise RuntimeError(f"{path}: {part.num_rows} rows, not the chunk's {rows} (a part left by another "
                                   "run?)")
            writer.write(part.replace_schema_metadata(schema.metadata))
        writer.commit()
    shutil.rmtree(parts_dir(out), ignore_errors=True)
    return out


def read_metadata(path: str) -> dict[str, str]:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"ARROW")}
