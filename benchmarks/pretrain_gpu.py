"""GPU pretraining throughput and both MFUs of pipeline.trainer.Trainer, the whole table in one command.

Each row is one configuration (model, sequence length, precision, micro-batch, data) run in
its own process on one GPU (a fresh DeepSpeed engine, a one-process world): ``--steps``
optimizer steps, the first ``--warmup`` untimed (CUDA warm-up, kernel selection), then wall
clock from the end of the warm-up to the end of the last step. A row is appended to ``--out``
(JSON lines) and printed as soon as it is measured, so a killed run keeps its rows. Each
configuration has ``--timeout`` seconds and the whole run ``--budget`` (the default fits
8 minutes with start-up); a configuration that runs out of time, out of memory or into an
error becomes a row saying so, and those the budget leaves no time for are rows marked
skipped. The first configuration may build DeepSpeed's fused Adam kernel (a minute, once per
machine); a build killed half-way leaves a lock in ~/.cache/torch_extensions that makes later
builds wait: delete that folder.

Data: synthetic (every row full length: the most work per sequence, the case published
sequences/s figures count; random ids over a 32,000-token vocabulary, 15% masked as in
Google's recipe: 19 at 128 tokens, 77 at 512) and, with ``--data DIR``, rows of a data dir
written by preprocessing (real lengths, its own vocabulary), for the configurations of its
sequence length. Needs pyarrow, torch, deepspeed and transformers, not Beam.

MFU = sequences/s × FLOPs per sequence / peak FLOP/s (pipeline.model.FlopCounter):
mfu_model counts the dense model on full-length sequences, 6·N·T + 12·L·H·T² (T =
max_seq_length, N every matmul weight, the MLM head on every position), as published MFU
figures do; mfu_executed what the trainer runs, 6·(N_enc·T + N_mlm·P + N_cls) + 12·L·H·T²
at the mean real length T with P masked tokens. The peak is the device's dense bf16/fp16
tensor-core peak, found by its name (H100/H200 SXM 989.5 TFLOP/s, A100 312) or --peak-tflops.

    python benchmarks/pretrain_gpu.py                                    # the table, <= 8 min
    python benchmarks/pretrain_gpu.py --only base-128-bf16 --micro-batches 256,512,1024
    python benchmarks/pretrain_gpu.py --data data/wiki128                # adds real-length rows
    python benchmarks/pretrain_gpu.py --only base-128-bf16 --profile prof  # where a step's time goes
    python benchmarks/pretrain_gpu.py --only base-128-bf16 --micro-batches 256 --accumulation 4

``--accumulation N`` takes N micro-batches per optimizer step, as a large global batch does on
few GPUs (NVIDIA's and DeepSpeed's published BERT figures accumulate): the optimizer step's
host work is then spread over N micro-batches.

``--profile DIR`` traces a few steps after the timed ones: each row gets ``device_busy``, the
GPU's kernel and copy time per traced step over the untraced step's wall time (low: the host
is the bottleneck), and DIR a table per row of the top operators by GPU and by host time, with
the aten operations dispatched per step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RESULT = "PRETRAIN_GPU_RESULT "
VOCAB = 32000  # a multiple of 64: the vocabulary matmul stays on whole tensor-core tiles
PREDICTIONS = {128: 20, 512: 80}  # Google's max_predictions_per_seq
TABLE = [f"{model}-{seq}-{precision}" for seq in (128, 512) for model in ("base", "large")
         for precision in ("bf16", "fp16")]
# Per-GPU micro-batches for an 80 GB GPU (estimated from the memory at smaller ones; only base at
# 128 tokens and 1,024 was measured: 47 GiB). On one H200, BERT-base at 128 tokens was host-bound
# at 256 (the GPU computing 49% of the step) and ran 2.0x the sequences/s at 1,024 in the same
# run: docs/PRETRAINING.md. On a smaller GPU pass --micro-batches.
DEFAULT_MICRO = {("base", 128): 1024, ("base", 512): 256, ("large", 128): 512, ("large", 512): 128}
# Dense (not 2:4 sparse) bf16/fp16 tensor-core peaks from NVIDIA's datasheets; first match wins.
PEAK_TFLOPS = (("H200 NVL", 835.5), ("H200", 989.5), ("H100 NVL", 835.5), ("H100 PCIe", 756.5), ("H100", 989.5),
               ("A100", 312.0))
PROFILED_STEPS = 5  # --profile: steps traced after the timed ones (the trace itself slows them)
MIN_START_S = 20  # a configuration is not started with less time than this (or --timeout) left
FIELDS = ("run", "config", "micro_batch", "accumulation", "data", "precision", "compile", "status", "message",
          "seq_per_s", "tokens_per_s", "mfu_model", "mfu_executed", "gflop_model", "gflop_executed", "mean_tokens",
          "peak_tflops", "peak_memory_gib", "device_busy", "skipped_steps", "loss_scale", "loss", "timed_steps",
          "seconds", "wall_s", "vocab", "ds_config", "data_dir", "device", "software")


# ---------------------------------------------------------------------------- data dirs
def write_synthetic_data(out: str, seq: int, rows: int, vocab: int = VOCAB, seed: int = 0) -> str:
    """A data dir that pipeline/data.py reads: manifest.json + one Parquet shard, full-length rows."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    masked = min(PREDICTIONS.get(seq, seq), max(1, round(seq * 0.15)))
    ids = rng.integers(5, vocab, (rows, seq), dtype=np.int32)
    ids[:, 0], ids[:, seq // 2], ids[:, -1] = 2, 3, 3  # [CLS] A [SEP] B [SEP]
    segments = np.zeros((rows, seq), dtype=np.int8)
    segments[:, seq // 2 + 1:] = 1
    candidates = np.r_[1:seq // 2, seq // 2 + 1:seq - 1]
    positions = np.sort(np.stack([rng.choice(candidates, masked, replace=False) for _ in range(rows)]),
                        axis=1).astype(np.int32)
    originals = np.take_along_axis(ids, positions, axis=1)
    np.put_along_axis(ids, positions, 4, axis=1)  # [MASK]

    def lists(a):
        return pa.array(list(a), type=pa.list_(pa.from_numpy_dtype(a.dtype)))

    table = pa.table({"input_ids": lists(ids), "segment_ids": lists(segments),
                      "masked_lm_positions": lists(positions), "masked_lm_ids": lists(originals),
                      "next_sentence_labels": pa.array(rng.integers(0, 2, rows, dtype=np.int8))})
    manifest = {"format_version": 1, "data_run_id": None, "max_seq_length": seq,
                "tokenizer": {"path": "tokenizer", "fingerprint": "synthetic", "vocab_size": vocab,
                              "special_ids": {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}},
                "masking": {"mode": "static", "masked_lm_prob": 0.15, "max_predictions_per_seq": masked,
                            "whole_word_mask": False}}
    return _write_data_dir(out, table, manifest)


def sample_data_dir(source: str, out: str, rows: int) -> str:
    """The first ``rows`` rows of a preprocessed data dir (its shards are shuffled), as a data dir:
    converting a whole corpus to the trainer's flat arrays would take longer than the measurement."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(os.path.join(source, "manifest.json")) as f:
        manifest = json.load(f)
    tables, have = [], 0
    for shard in manifest["shards"]:
        parquet = pq.ParquetFile(os.path.join(source, shard["path"]))
        for group in range(parquet.num_row_groups):
            if have >= rows:
                break
            tables.append(parquet.read_row_group(group))
            have += tables[-1].num_rows
    return _write_data_dir(out, pa.concat_tables(tables).slice(0, rows), manifest)


def _write_data_dir(out: str, table, manifest: dict) -> str:
    import pyarrow.parquet as pq

    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    pq.write_table(table, os.path.join(out, "shards", "part-00000.parquet"))
    manifest = {**manifest, "num_examples": table.num_rows,
                "shards": [{"path": "shards/part-00000.parquet", "rows": table.num_rows}]}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return out


# ---------------------------------------------------------------------------- one configuration
def measure(spec: dict) -> dict:
    """Runs one configuration in this process; the measured fields of its row."""
    import deepspeed
    import torch
    import transformers

    from pipeline.train_config import TrainConfig
    from pipeline.trainer import Trainer

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = spec["peak_tflops"] or next((t for key, t in PEAK_TFLOPS if key in device), None)
    micro, steps, warmup = spec["micro_batch"], spec["steps"], spec["warmup"]
    per_step = micro * spec.get("accumulation", 1)  # sequences an optimizer step takes
    profiled = PROFILED_STEPS if spec.get("profile") else 0
    with tempfile.TemporaryDirectory(prefix="pretrain_gpu_") as tmp:
        if spec["data_dir"]:
            # 64 batches at least: one window of the sampler's length grouping, as in a real run
            data = sample_data_dir(spec["data_dir"], os.path.join(tmp, "data"),
                                   per_step * max(steps + profiled + 2, 64))
        else:
            data = write_synthetic_data(os.path.join(tmp, "data"), spec["seq"], per_step * (steps + profiled + 2))
        config = TrainConfig.from_flat(data=data, run_dir=os.path.join(tmp, "run"), model=spec["model"],
                                       ds_config=spec["ds_config"], global_batch_size=per_step, micro_batch_size=micro,
                                       steps=steps + profiled, learning_rate=1e-4, warmup_steps=0, log_every=steps,
                                       resume="none", eval_shards=0, mlflow=False, compile=spec["compile"])

        class NoSave(Trainer):
            def save(self) -> str:  # the checkpoint is not what is timed
                return ""

        trainer = NoSave(config)
        stamps, window = [], []
        tracer = profiler(cuda) if profiled else None

        def on_step(tr, metrics) -> None:
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            window.append(metrics)
            if tracer and len(stamps) == steps:  # the timed steps are done: trace the rest
                tracer.start()

        trainer.train(on_step=on_step)
    busy = None
    if tracer:
        tracer.stop()
        busy = write_profile(tracer, spec, stamps[-1] - stamps[steps - 1], profiled,
                             (stamps[steps - 1] - stamps[warmup - 1]) / (steps - warmup))
    timed = window[warmup:steps]
    seconds = stamps[steps - 1] - stamps[warmup - 1]
    sequences = sum(m.sequences for m in timed)
    mean_tokens = sum(m.real_tokens for m in timed) / sequences
    flops_model = trainer.flops.model_per_sequence(trainer.manifest["max_seq_length"])
    flops_executed = trainer.executed_flops_per_sequence(mean_tokens, sum(m.predictions for m in timed) / sequences,
                                                         sum(m.squared_tokens for m in timed) / sequences)
    seq_per_s = sequences / seconds
    fp16 = trainer.engine.fp16_enabled()
    return {"seq_per_s": seq_per_s, "tokens_per_s": seq_per_s * mean_tokens,
            "mfu_model": seq_per_s * flops_model / (peak * 1e12) if peak else None,
            "mfu_executed": seq_per_s * flops_executed / (peak * 1e12) if peak else None,
            "gflop_model": flops_model / 1e9, "gflop_executed": flops_executed / 1e9, "mean_tokens": mean_tokens,
            "peak_tflops": peak, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "device_busy": busy,
            # fp16 steps whose update the loss scaler skipped (overflow) run faster than real ones
            "skipped_steps": sum(not m.applied for m in timed) if fp16 else None,
            "loss_scale": window[-1].loss_scale if fp16 else None, "loss": window[-1].loss,
            "timed_steps": len(timed), "seconds": seconds, "vocab": trainer.model_config.vocab_size,
            "device": device, "software": f"torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed "
                                          f"{deepspeed.__version__}, transformers {transformers.__version__}"}


def profiler(cuda: bool):
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    return torch.profiler.profile(activities=activities)


def write_profile(tracer, spec: dict, seconds: float, steps: int, step_seconds: float) -> float | None:
    """Writes the traced steps' top operators (by device time, then by host time) to
    ``--profile``'s folder; returns the GPU's time in kernels and copies per traced step over the
    timed (untraced: tracing slows the host) steps' mean wall time, None on CPU. Low means the
    GPU waits on the host: Python, launches, synchronisations."""
    from torch.autograd import DeviceType

    # The union of kernel and copy intervals: streams that overlap count once.
    device_us, end = 0.0, float("-inf")
    for start, stop in sorted((e.time_range.start, e.time_range.end) for e in tracer.events()
                              if e.device_type == DeviceType.CUDA):
        device_us += max(0.0, stop - max(start, end))
        end = max(end, stop)
    ops = tracer.key_averages()
    busy = device_us / 1e6 / steps / step_seconds if device_us else None
    config = os.path.splitext(os.path.basename(spec["ds_config"]))[0]
    accumulation = f"x{spec['accumulation']}" if spec.get("accumulation", 1) > 1 else ""
    name = (f"{spec['config']}-{spec['micro_batch']}{accumulation}-{spec['data']}"
            f"{'-compile' if spec['compile'] else ''}-{config}")
    # Device-independent: what the host must dispatch each step, whatever runs it.
    host_ops = sum(op.count for op in ops if op.key.startswith("aten::")) / steps
    os.makedirs(spec["profile"], exist_ok=True)
    with open(os.path.join(spec["profile"], name + ".txt"), "w") as f:
        f.write(f"{name}: {steps} steps traced, {seconds / steps * 1e3:.1f} ms a step (tracing included; "
                f"{step_seconds * 1e3:.1f} ms untraced), {host_ops:,.0f} aten ops a step"
                + (f", device busy {device_us / 1e3 / steps:.1f} ms a step ({busy:.0%} of an untraced step)"
                   if busy else "") + "\n\n")
        if device_us:
            f.write(ops.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70) + "\n")
        f.write(ops.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70) + "\n")
    return busy


# ---------------------------------------------------------------------------- the table
def precision_of(ds_config: str) -> str:
    with open(ds_config) as f:
        engine = json.load(f)
    enabled = [name for name in ("bf16", "bfloat16", "fp16") if engine.get(name, {}).get("enabled")]
    return {"bfloat16": "bf16"}.get(enabled[0], enabled[0]) if enabled else "fp32"


def plan(args) -> list[dict]:
    """Every row to measure, in order: per configuration, each micro-batch, synthetic then real data."""
    seqs = {}
    for data_dir in args.data:
        with open(os.path.join(data_dir, "manifest.json")) as f:
            seqs.setdefault(json.load(f)["max_seq_length"], []).append(os.path.abspath(data_dir))
    specs = []
    for name in args.only or TABLE:
        model, seq, precision = name.split("-")
        seq = int(seq)
        ds_config = args.ds_config or os.path.join(REPO, "ds_configs", (
            "cpu_fp32_zero2_torch-adamw.json" if precision == "fp32"
            else f"gpu_{'large' if model == 'large' else 'base'}_{precision}_zero1_fused-adam.json"))
        for micro in args.micro_batches or [DEFAULT_MICRO.get((model, seq), 8)]:
            for data_dir in [None] + seqs.get(seq, []):
                specs.append({"config": name, "model": model, "seq": seq, "micro_batch": micro,
                              "accumulation": args.accumulation,
                              "data": "real" if data_dir else "synthetic", "data_dir": data_dir,
                              "ds_config": ds_config, "steps": args.steps, "warmup": args.warmup,
                              "peak_tflops": args.peak_tflops, "compile": args.compile,
                              "profile": os.path.abspath(args.profile) if args.profile else None})
    return specs


def run_worker(spec: dict, limit: float) -> dict:
    """One configuration in a fresh process, killed (with anything it started) after ``limit`` s."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if timed_out:
        proc.communicate()
        return {"status": "timeout", "message": f"killed after {limit:.0f} s"}
    results = [line for line in out.splitlines() if line.startswith(RESULT)]
    if proc.returncode == 0 and results:
        return {"status": "ok", **json.loads(results[-1][len(RESULT):])}
    return failure(proc.returncode, err)


def failure(returncode: int, stderr: str) -> dict:
    """oom or error, with the exception's line of the traceback (not a warning printed at exit)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    message = next((line for line in reversed(lines) if line.split(":")[0].endswith(("Error", "Exception"))),
                   lines[-1] if lines else f"exit code {returncode}")
    return {"status": "oom" if "out of memory" in message.lower() else "error", "message": message[-300:]}


def emit(row: dict, out: str) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    with open(out, "a") as f:  # one whole line per row, closed at once: a killed run keeps it
        f.write(line + "\n")


def config_name(value: str) -> str:
    """--only's MODEL-SEQ-PRECISION, checked before anything runs (a typo made an error row)."""
    from pipeline.model import PRESETS

    parts = value.split("-")
    if len(parts) != 3 or parts[0] not in PRESETS or not parts[1].isdigit() or parts[2] not in ("bf16", "fp16",
                                                                                                  "fp32"):
        raise argparse.ArgumentTypeError(f"{value!r}: MODEL-SEQ-PRECISION, with MODEL one of {', '.join(PRESETS)}, "
                                         "SEQ a sequence length and PRECISION bf16, fp16 or fp32")
    return value


def main(argv=None) -> int:
    from preprocessing import cli_parser

    p = cli_parser.Parser(description=__doc__.split("\n\n")[0], formatter_class=cli_parser.DefaultsFormatter)
    p.add_argument("--only", action="append", metavar="MODEL-SEQ-PRECISION", type=config_name,
                   help="e.g. base-128-bf16, tiny-64-fp32 (repeatable; default: base and large x 128 and 512 x "
                        "bf16 and fp16)")
    p.add_argument("--micro-batches", type=lambda s: [int(x) for x in s.split(",")],
                   help="comma-separated sweep, one row each (default: per model and seq length)")
    p.add_argument("--data", action="append", default=[],
                   help="a preprocessed data dir: adds real-length rows for its seq length (repeatable)")
    p.add_argument("--accumulation", type=int, default=1,
                   help="micro-batches per optimizer step, as a large global batch takes on few GPUs "
                        "(published per-GPU figures, NVIDIA's and DeepSpeed's BERT records, accumulate)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=8, help="first steps left out of the timing")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense peak per GPU (default: from its name)")
    p.add_argument("--compile", action="store_true",
                   help="the trainer's --compile (torch.compile; its compilation falls in the warm-up steps)")
    p.add_argument("--profile", metavar="DIR",
                   help=f"also trace {PROFILED_STEPS} steps after the timed ones with torch.profiler: each row gets "
                        "device_busy (the GPU's kernel time a step over a timed step's wall time) and DIR a "
                        "table of the top operators")
    p.add_argument("--ds-config", help="one DeepSpeed config for every row (default: by model and precision)")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per configuration, start-up included")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole table")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "pretrain_gpu.jsonl"),
                   help="JSON lines file the rows are appended to")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(RESULT + json.dumps(measure(json.loads(args.worker))), flush=True)
        return 0
    if not 1 <= args.warmup < args.steps:
        p.error("--warmup must be in [1, --steps)")
    if args.accumulation < 1:
        p.error("--accumulation must be >= 1")
    for path in args.data:  # before the first row's minutes, not a traceback in its worker
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            p.error(f"--data {path}: no manifest.json there (a data dir of preprocessing/run_beam.py)")
    if args.ds_config:
        try:
            precision_of(args.ds_config)
        except (OSError, ValueError, AttributeError) as err:
            p.error(f"--ds-config {args.ds_config}: not a DeepSpeed config ({err})")
    # SIGTERM (a scheduler, `timeout`) ends the run through run_worker's cleanup, not around it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    start, run = time.monotonic(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows, specs = [], plan(args)
    print(f"{len(specs)} configurations, {args.timeout:.0f} s each at most, {args.budget:.0f} s in all; rows are "
          f"appended to {args.out}", flush=True)
    for spec in specs:
        left = args.budget - (time.monotonic() - start)
        given = ("config", "micro_batch", "accumulation", "data", "data_dir", "ds_config", "compile")
        row = {**dict.fromkeys(FIELDS), "run": run, **{k: spec[k] for k in given}}
        if not os.path.isfile(spec["ds_config"]):
            row.update(status="error", message=f"{spec['ds_config']} does not exist")
        elif left < min(args.timeout, MIN_START_S):
            row.update(precision=precision_of(spec["ds_config"]), status="skipped",
                       message=f"the --budget of {args.budget:.0f} s was spent")
        else:
            row["precision"] = precision_of(spec["ds_config"])
            began = time.monotonic()
            row.update(run_worker(spec, min(args.timeout, left)), wall_s=round(time.monotonic() - began, 1))
        row["ds_config"] = os.path.basename(row["ds_config"])
        emit(row, args.out)
        rows.append(row)

    def cell(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print(f"\n{'config':<16} {'micro':>5} {'accum':>5} {'data':<9} {'status':<8} {'seq/s':>9} {'tokens/s':>11} "
          f"{'MFU model':>9} {'executed':>8} {'mem GiB':>7} {'skipped':>7}")
    for r in rows:
        print(f"{r['config']:<16} {r['micro_batch']:>5} {r['accumulation']:>5} {r['data']:<9} {r['status']:<8} "
              f"{cell(r['seq_per_s'], ',.1f'):>9} {cell(r['tokens_per_s'], ',.0f'):>11} "
              f"{cell(r['mfu_model'], '.1%'):>9} {cell(r['mfu_executed'], '.1%'):>8} "
              f"{cell(r['peak_memory_gib'], '.1f'):>7} {cell(r['skipped_steps'], 'd'):>7}")
    print(f"rows appended to {args.out}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
