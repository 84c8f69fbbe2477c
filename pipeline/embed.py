"""Sentence embeddings from a pretraining export or a fine-tuned model, to Parquet.

    python pipeline/embed.py --model runs/reviews/model --input texts.csv --out emb.parquet \
        --pooling mean --normalize
    torchrun --nproc_per_node 2 pipeline/embed.py --model runs/tiny/hf/step00000200 --input texts.jsonl \
        --out emb.parquet

Writes OUT with the input's id column (or ``row``, the 0-based row number) and ``embedding``
(list<float32>), in input row order; pooling, normalize, model and lineage in the schema
metadata. The input is checked whole, then streamed --chunk-rows rows at a time: memory does
not grow with it. Under torchrun / deepspeed the chunks are dealt to the processes in turn
and rank 0 merges their parts. Rank 0 logs one MLflow run (stage=embed). Exit code 0, or 2
with one line naming the file, row or flag for bad input, flags or model.
"""

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import time

if __package__ in (None, ""):  # run as a file: see pipeline/__init__.py
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipeline import embed_inputs, embedding  # noqa: E402
from pipeline.engine import LaunchError, add_launcher_flag, ensure_distributed_env  # noqa: E402
from pipeline.finetuning.data import FinetuneDataError  # noqa: E402
from pipeline.finetuning.model import ModelSourceError, model_lineage  # noqa: E402
from preprocessing import cli_parser  # noqa: E402
from preprocessing.mlflow_experiment import HELP as EXPERIMENT_HELP, experiment_flag  # noqa: E402
from preprocessing.mlflow_experiment import TrackingServerError, check_tracking  # noqa: E402
from preprocessing.write_failure import WriteFailure, writing  # noqa: E402

USER_ERRORS = (FinetuneDataError, ModelSourceError, embedding.EmbedError, LaunchError, TrackingServerError)
log = logging.getLogger("pipeline.embed")


def build_parser() -> argparse.ArgumentParser:
    p = cli_parser.Parser(
        formatter_class=cli_parser.DefaultsFormatter,
        prog="python pipeline/embed.py",
        description="Embed texts with the encoder of a BERT this project wrote (a pretraining export "
                    "RUN_DIR/hf/<tag> or fine-tuning's OUTPUT_DIR/model). One process, or several under torchrun / "
                    "deepspeed (rows split across them, rank 0 merges). Writes OUT: the id column and 'embedding' "
                    "(list<float32>) in input row order; logs one MLflow run (stage=embed).",
    )
    p.add_argument("--model", required=True,
                   help="Hugging Face model dir (config.json, weights and tokenizer: an export, finetune.py's "
                        "OUTPUT_DIR/model), or a pretraining run dir, whose newest checkpoint's export is used")
    p.add_argument("--input", required=True,
                   help="csv, tsv, jsonl (optionally .gz/.bz2/.xz/.zst), parquet or a saved datasets Dataset; a blank text is an error naming "
                        "its line (the output has a row for each input row: filter blank rows out first)")
    p.add_argument("--out", required=True, help="output Parquet file (written to a temporary file, then renamed)")
    p.add_argument("--text-column", default=embedding.TEXT_COLUMN,
                   help="the column (or jsonl key) holding the texts (default: %(default)s)")
    p.add_argument("--id-column", default=None,
                   help="column copied to the output beside each embedding (default: 'id' when the input has it, "
                        f"else a '{embed_inputs.ROW_COLUMN}' column with the 0-based row number; "
                        f"'{embed_inputs.ROW_COLUMN}' numbers the rows also where the input has an 'id')")
    p.add_argument("--pooling", choices=embedding.POOLINGS, default=embedding.POOLING,
                   help=f"{embedding.POOLING} (default): the [CLS] token's last hidden state; mean: the mean over the real tokens (not "
                        "padding)")
    p.add_argument("--normalize", action="store_true", help="scale every embedding to unit L2 norm")
    p.add_argument("--batch-size", type=int, default=embedding.BATCH_SIZE,
                   help="texts per forward pass, per process (default: %(default)s)")
    p.add_argument("--chunk-rows", type=int, default=embed_inputs.CHUNK_ROWS,
                   help="rows a process reads, embeds and writes at a time (its memory: their texts, tokens and "
                        "vectors); the chunks are dealt to the processes in turn (default: %(default)s)")
    p.add_argument("--max-length", "--max-seq-length", dest="max_length", type=int, default=None,
                   help="tokens per text, longer ones cut and counted (default: the tokenizer's, i.e. the "
                        "pretraining length; --max-seq-length: the other stages' name for it)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA (default fp32; refused on CPU)")
    tr = p.add_argument_group("tracking (MLflow; MLFLOW_TRACKING_URI selects the server)")
    tr.add_argument("--no-mlflow", dest="mlflow", action="store_false", help="log no MLflow run")
    tr.add_argument("--experiment", type=experiment_flag, help=EXPERIMENT_HELP)
    tr.add_argument("--run-name", help="MLflow run name (default: MLflow's generated one)")
    add_launcher_flag(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.chunk_rows < 1:
        parser.error(f"--chunk-rows must be >= 1, got {args.chunk_rows}")
    if args.id_column == "embedding":  # the vector column's name: the ids were lost in the output
        parser.error("--id-column embedding: the output's vector column has that name; the ids need another")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    import torch

    # Every check before the process group: a bad file or flag fails on every rank alike, at once.
    try:
        # torchrun and the deepspeed launcher set RANK, LOCAL_RANK and WORLD_SIZE; a plain run is one
        # process; mpirun's copies without them would each embed the whole input into --out.
        rank, local_rank, world_size = ensure_distributed_env()
        if args.mlflow and rank == 0:
            check_tracking(args.experiment)
        embedding.check_out(args.out, args.input)  # before hours of embedding
        embed_inputs.check_first_row(args.input, args.text_column, args.id_column)  # before the model loads
        args.model = embedding.model_folder(args.model)
        model, tokenizer = embedding.load_model(args.model)
        converted, converter = embedding.script_converter(args.model)
        if converted:
            log.info("texts converted with OpenCC %s, as the model's pretraining text was (training_info.json)",
                     converted)
        max_length = embedding.resolve_max_length(args.max_length, tokenizer, model.config)
        if args.bf16 and not torch.cuda.is_available():
            raise embedding.EmbedError("--bf16: no CUDA device; on CPU the embeddings are computed in fp32")
        # The whole input, checked (the flags and model first: this pass reads every row)
        scan = embed_inputs.scan_inputs(args.input, args.text_column, args.id_column, args.chunk_rows)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    model.to(device)
    if world_size > 1:
        # Only barriers cross processes (the parts go through files): gloo, on CPU or GPU.
        torch.distributed.init_process_group("gloo")
        if rank == 0:  # a killed run's parts: merged with this run's, they would pass for its rows
            shutil.rmtree(embedding.parts_dir(args.out), ignore_errors=True)
        torch.distributed.barrier()
    lineage = model_lineage(args.model)
    tracker = None
    if args.mlflow and rank == 0:
        from pipeline.tracking import Tracker

        tracker = Tracker("embed", args.experiment, args.run_name, lineage)
        tracker.log_params({**{k: v for k, v in vars(args).items() if k not in ("local_rank", "mlflow")},
                            "id_column_used": scan.output_id_column, "max_length_used": max_length,
                            "world_size": world_size, "rows": scan.rows, "device": device.type})
    status = "FAILED"
    try:
        started = time.perf_counter()
        # How the vectors were made, in the file itself (--no-mlflow leaves no other record).
        metadata = {"pooling": args.pooling, "normalize": str(args.normalize).lower(),
                    "precision": "bf16" if args.bf16 else "fp32", "convert": converted or "none",
                    "model": os.path.abspath(args.model), "max_length": max_length,
                    "embedding_dim": model.config.hidden_size, "id_column": scan.output_id_column,
                    "source": os.path.abspath(args.input), **lineage}
        schema = embedding.output_schema(scan.output_id_column, scan.id_type, metadata)
        with writing("the embeddings", args.out):  # a full disk: one line, no partial file left
            truncated = embed_chunks(args, scan, model, tokenizer, converter, max_length, schema, rank, world_size)
            if world_size > 1:
                counts = torch.tensor([truncated], dtype=torch.int64)
                torch.distributed.all_reduce(counts)  # also the barrier: every part is written
                truncated = int(counts.item())
                if rank == 0:
                    embedding.merge_parts(args.out, schema, scan.chunks(scan.chunk_size(args.chunk_rows, world_size)))
        seconds = time.perf_counter() - started
        if rank == 0:
            print(f"{scan.rows} embeddings ({model.config.hidden_size} dims, {args.pooling} pooling"
                  f"{', normalized' if args.normalize else ''}) in {seconds:.1f} s, {truncated} texts cut at "
                  f"{max_length} tokens: {args.out}", flush=True)
        if tracker:
            tracker.log_metrics({"rows_per_second": scan.rows / max(seconds, 1e-9), "seconds": seconds,
                                 "rows": scan.rows, "rows_truncated": truncated}, 0)
        status = "FINISHED"
        return 0
    except WriteFailure as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if tracker:
            tracker.finish(status)
        if world_size > 1:
            torch.distributed.destroy_process_group()


def embed_chunks(args, scan, model, tokenizer, converter, max_length: int, schema, rank: int, world_size: int) -> int:
    """This process's chunks (k, k+W, …), embedded and written: into OUT itself for one process, else
    each into a part for rank 0 to merge. Returns the texts cut at ``max_length``."""
    from tqdm import tqdm

    size = scan.chunk_size(args.chunk_rows, world_size)
    mine = sum(scan.chunks(size)[rank::world_size])
    truncated = 0
    # A bar on a terminal; in a batch log, a line a minute (rank 0's rows: the others' are as many,
    # give or take a chunk).
    on_terminal = sys.stderr.isatty()
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=mine, desc="embedding", unit="text", dynamic_ncols=True,
                                       mininterval=1.0, disable=not (rank == 0 and on_terminal)))
        progress = bar if on_terminal or rank else embedding.LogProgress(mine)
        out = stack.enter_context(embedding.ParquetOut(args.out, schema)) if world_size == 1 else None
        for k, ids, texts in embed_inputs.input_chunks(scan, size, take=lambda k: k % world_size == rank):
            if converter:
                texts = [converter(text) for text in texts]
            vectors, cut = embedding.embed_texts(
                model, tokenizer, texts, pooling=args.pooling, normalize=args.normalize, batch_size=args.batch_size,
                max_length=max_length, bf16=args.bf16, progress=progress)
            truncated += cut
            table = embedding.chunk_table(schema, ids, vectors)
            if out:
                out.write(table)
            else:
                embedding.write_atomic(table, embedding.part_path(args.out, k))
        if out:
            out.commit()
    return truncated


def cli() -> None:
    """The command (``python pipeline/embed.py``, the ``bert-embed`` console script). SIGTERM
    (torchrun's when a peer fails, scancel's) ends it as an exit, not a kill: the temporary output
    file is removed on the way out instead of left beside OUT."""
    def stopped(signum, frame):
        print(f"error: stopped by {signal.Signals(signum).name}: --out was not written (its temporary file is "
              "removed); rerun to embed", file=sys.stderr)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stopped)
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: the same line as SIGTERM, not a traceback
        stopped(signal.SIGINT, None)


if __name__ == "__main__":
    cli()
