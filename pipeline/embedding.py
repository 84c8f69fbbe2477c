"""Sentence embeddings from a Hugging Face BERT dir this project writes: reading, batching, pooling, writing.

The model dir is a pretraining export (``RUN_DIR/hf/<tag>``: ``config.json``, weights, the
tokenizer, ``training_info.json``) or a fine-tuned model (``OUTPUT_DIR/model`` of
finetune.py, with ``OUTPUT_DIR/report.json`` beside it). Only the encoder is loaded
(``AutoModel``): pretraining and classification heads are left out.

Texts are read with fine-tuning's readers (csv/tsv/jsonl/parquet, optionally compressed),
so bad input fails the same way, naming the file and line. A blank or null text is an
error, not a skip: a missing row would silently shift whatever the table is joined to.

Rows are embedded in batches of like length (a batch pads to its longest row, so row
order would make short texts cost as much as long ones) and put back in input order.
With several processes, process r takes rows r, r+W, r+2W, … (strided: every process
gets a like mix of lengths), writes them to a part file, and rank 0 merges the parts in
row order. The output is written to a temporary file and renamed, so a reader never sees
half a file.

Everything is held in memory: the texts (every process reads the whole input), their token
ids (5 bytes a token) and the vectors (3 KB a row at 768 dims): about 4 KB a row of 128
tokens plus the text, 40 GB for ten million. Meant for up to a few million rows; split a
larger corpus into files and embed each.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time

import numpy as np

from pipeline.finetuning.data import _NO_KEY, FinetuneDataError, as_text, is_blank_text, read_table
from pipeline.tokenized import tokenize

POOLINGS = ("cls", "mean")
# embed.py's flag defaults.
TEXT_COLUMN = "text"
POOLING = "cls"
BATCH_SIZE = 64
ROW_COLUMN = "row"  # the id column when the input has none: the 0-based data row


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


@dataclasses.dataclass
class Inputs:
    source: str
    id_column: str  # the input's id column, or ROW_COLUMN
    ids: list
    texts: list[str]
    where: list[str]  # file:line (or file: row N) of each row, for messages

    def __len__(self) -> int:
        return len(self.texts)


def read_inputs(path: str, text_column: str = TEXT_COLUMN, id_column: str | None = None) -> Inputs:
    """The texts (and ids) of a csv/tsv/jsonl/parquet file. ``id_column`` None: ``id`` if the file
    has it, else the row number; a named one must exist."""
    table = read_table(path)  # FinetuneDataError naming the file (and line) for unreadable input
    if len(table) == 0:
        raise FinetuneDataError(f"{table.source}: the file has no rows")
    columns = ", ".join(map(str, table.columns)) or "none"
    if text_column not in table.columns:
        raise FinetuneDataError(f"{table.source}: no column {text_column!r} (columns: {columns}); set --text-column")
    if id_column is None:
        id_column = "id" if "id" in table.columns else None
    elif id_column not in table.columns:
        raise FinetuneDataError(f"{table.source}: no column {id_column!r} (columns: {columns}); set --id-column, "
                                "or leave it out to number the rows")
    texts = table.columns[text_column]
    blank = [where for value, where in zip(texts, table.where) if is_blank_text(value)]
    if blank:
        count = f"{len(blank)} row{'s' if len(blank) > 1 else ''} in {table.source}"
        raise FinetuneDataError(f"{blank[0]}: column {text_column!r} is blank ({count}); every row needs a text "
                                "(remove such rows first: an embedding per input row is the output's contract)")
    texts = [as_text(value, where, text_column) for value, where in zip(texts, table.where)]
    if id_column is None:
        return Inputs(table.source, ROW_COLUMN, list(range(len(table))), texts, table.where)
    ids = table.columns[id_column]
    for value, where in zip(ids, table.where):
        if value is None or value is _NO_KEY or (isinstance(value, str) and not value.strip()):
            raise FinetuneDataError(f"{where}: column {id_column!r} (the id) is blank")
    return Inputs(table.source, id_column, ids, texts, table.where)


# ---------------------------------------------------------------------------- the model
def convert_script(inputs: Inputs, model_dir: str) -> str | None:
    """The texts converted as the model's pretraining text was (``--convert t2s``, recorded in an
    export's ``training_info.json``), as fine-tuning does: its vocabulary holds the converted script
    only. Returns the conversion, or None."""
    from pipeline.finetuning.model import read_training_info
    from preprocessing.language import Converter

    convert = read_training_info(model_dir).get("convert")
    if convert:
        converter = Converter(convert)
        inputs.texts = [converter(text) for text in inputs.texts]
    return convert


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


def my_rows(n: int, rank: int, world_size: int) -> np.ndarray:
    """This process's rows: strided, so that every process gets a like mix of short and long texts."""
    return np.arange(rank, n, world_size)


# ---------------------------------------------------------------------------- writing
def _ids_array(ids: list):
    import pyarrow as pa

    try:
        return pa.array(ids)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types (jsonl: 3 and "a7"): all as text
        log.warning("the ids mix types (such as 3 and \"a7\"): all written as text")
        return pa.array([str(i) for i in ids])


def embedding_table(id_column: str, ids: list, embeddings: np.ndarray, metadata: dict[str, str] | None = None):
    """``id_column`` and ``embedding`` (list<float32>); ``metadata`` in the schema."""
    import pyarrow as pa

    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = embeddings.shape
    offsets = pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32))
    vectors = pa.ListArray.from_arrays(offsets, pa.array(embeddings.reshape(-1)))
    table = pa.table({id_column: _ids_array(list(ids)), "embedding": vectors})
    return table.replace_schema_metadata({k: str(v) for k, v in (metadata or {}).items()})


def write_atomic(table, path: str) -> str:
    """A temporary file in the same dir, then a rename: readers see the old file or the whole new one."""
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temp = f"{path}.tmp-{os.getpid()}"
    try:
        pq.write_table(table, temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    return path


def parts_dir(out: str) -> str:
    return f"{out}.parts"


def write_part(out: str, rank: int, world_size: int, rows: np.ndarray, embeddings: np.ndarray) -> str:
    """One process's rows (their input positions) and embeddings, for rank 0 to merge."""
    path = os.path.join(parts_dir(out), f"part-{rank:05d}-of-{world_size:05d}.parquet")
    return write_atomic(embedding_table(ROW_COLUMN, rows.tolist(), embeddings), path)


def merge_parts(out: str, world_size: int, id_column: str, ids: list, metadata: dict[str, str]) -> str:
    """Rank 0, after the barrier: every part, back in input row order, as OUT; the parts removed."""
    import pyarrow.parquet as pq

    rows, vectors = [], []
    for rank in range(world_size):
        part = pq.read_table(os.path.join(parts_dir(out), f"part-{rank:05d}-of-{world_size:05d}.parquet"))
        rows.append(part.column(ROW_COLUMN).to_numpy())
        vectors.append(np.stack(part.column("embedding").to_numpy(zero_copy_only=False)) if part.num_rows
                       else np.zeros((0, 0), dtype=np.float32))
    rows_all = np.concatenate(rows)
    if sorted(rows_all.tolist()) != list(range(len(ids))):
        raise RuntimeError(f"{parts_dir(out)}: the parts hold {len(rows_all)} rows, not each of the "
                           f"{len(ids)} input rows once (a part left by another run?)")
    dim = max(v.shape[1] for v in vectors)
    embeddings = np.zeros((len(ids), dim), dtype=np.float32)
    for r, v in zip(rows, vectors):
        if len(r):
            embeddings[r] = v
    write_atomic(embedding_table(id_column, ids, embeddings, metadata), out)
    shutil.rmtree(parts_dir(out), ignore_errors=True)
    return out


def read_metadata(path: str) -> dict[str, str]:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"ARROW")}
