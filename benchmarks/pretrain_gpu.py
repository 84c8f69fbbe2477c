"""GPU pretraining throughput and MFU of pipeline.trainer.Trainer: BERT-base/large, seq 128/512, bf16/fp16.

Each configuration runs in its own process on one GPU (a fresh DeepSpeed engine, one
process world): ``--steps`` optimizer steps, the first ``--warmup`` untimed (CUDA and
kernel warm-up, the first fused-optimizer JIT build), then wall clock from the end of the
warm-up to the end of the last step over the real (non-pad) tokens of the timed steps.
MFU = sequences/s × FLOPs per sequence / peak, with the FLOP count of pipeline/model.py
(6·N·T for the encoder, the MLM head on the masked tokens only, 12·L·H·T² for attention).

The data is a synthetic data dir in the exact shard format (pyarrow only, no Beam on the
GPU box): random token ids, every row full length (no padding, the slowest case per
sequence), 15% of tokens masked up to 20 (seq 128) / 80 (seq 512) as in Google's recipe.
Throughput does not depend on which ids the tokens are.

    python benchmarks/pretrain_gpu.py                                 # all 8 configurations
    python benchmarks/pretrain_gpu.py --only base-128-bf16 --micro-batch 256
    python benchmarks/pretrain_gpu.py --only tiny-128-bf16 --steps 6 --warmup 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

RESULT = "PRETRAIN_GPU_RESULT "
VOCAB = 30522  # BERT's own vocabulary size (a multiple of 8 would be 30528)
PREDICTIONS = {128: 20, 512: 80}
CONFIGS = {  # precision -> ds config per model
    ("base", "bf16"): "gpu_base_bf16_zero2_fused-adam.json",
    ("base", "fp16"): "gpu_base_fp16_zero1_fused-adam.json",
    ("large", "bf16"): "gpu_large_bf16_zero2_fused-adam.json",
    ("large", "fp16"): "gpu_large_fp16_zero1_fused-adam.json",
}
DEFAULT_MICRO = {("base", 128): 128, ("base", 512): 32, ("large", 128): 64, ("large", 512): 16}


def write_synthetic_data(out: str, seq: int, rows: int, vocab: int = VOCAB, seed: int = 0) -> str:
    """A data dir that pipeline.data reads: manifest.json + one Parquet shard, full-length rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    masked = min(PREDICTIONS.get(seq, seq // 6), max(1, round(seq * 0.15)))
    ids = rng.integers(5, vocab, (rows, seq), dtype=np.int32)
    ids[:, 0], ids[:, seq // 2], ids[:, -1] = 2, 3, 3  # [CLS] A [SEP] B [SEP]
    segments = np.zeros((rows, seq), dtype=np.int8)
    segments[:, seq // 2 + 1:] = 1
    positions = np.sort(np.stack([rng.choice(np.r_[1:seq // 2, seq // 2 + 1:seq - 1], masked, replace=False)
                                  for _ in range(rows)]), axis=1).astype(np.int32)
    originals = np.take_along_axis(ids, positions, axis=1)
    np.put_along_axis(ids, positions, 4, axis=1)  # [MASK]

    def lists(a):
        return pa.array(list(a), type=pa.list_(pa.from_numpy_dtype(a.dtype)))

    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    table = pa.table({"input_ids": lists(ids), "segment_ids": lists(segments),
                      "masked_lm_positions": lists(positions), "masked_lm_ids": lists(originals),
                      "next_sentence_labels": pa.array(rng.integers(0, 2, rows, dtype=np.int8))})
    pq.write_table(table, os.path.join(out, "shards", "part-00000.parquet"))
    manifest = {
        "format_version": 1, "data_run_id": None, "max_seq_length": seq, "num_examples": rows,
        "tokenizer": {"path": "tokenizer", "fingerprint": "synthetic", "vocab_size": vocab,
                      "special_ids": {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}},
        "masking": {"mode": "static", "masked_lm_prob": 0.15, "max_predictions_per_seq": masked,
                    "whole_word_mask": False},
        "shards": [{"path": "shards/part-00000.parquet", "rows": rows}],
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return out


def run_one(args) -> dict:
    import torch

    from pipeline.train_config import TrainConfig
    from pipeline.trainer import Trainer

    model, seq, precision = args.only.split("-")
    seq = int(seq)
    micro = args.micro_batch or DEFAULT_MICRO.get((model, seq), 8)
    ds_config = (args.ds_config or os.path.join(REPO, "ds_configs", CONFIGS.get(
        (model, precision), "cpu_bf16_zero2_torch-adamw.json")))
    with tempfile.TemporaryDirectory(prefix="pretrain_gpu_") as tmp:
        data = write_synthetic_data(os.path.join(tmp, "data"), seq, micro * (args.steps + 2))
        config = TrainConfig(data=data, run_dir=os.path.join(tmp, "run"), model=model, ds_config=ds_config,
                             global_batch_size=micro, micro_batch_size=micro, steps=args.steps,
                             learning_rate=1e-4, warmup_steps=0, log_every=args.steps, resume="none",
                             eval_shards=0, mlflow=False, peak_tflops=args.peak_tflops)

        class NoSave(Trainer):
            def save(self) -> str:  # the checkpoint is not what is timed
                return ""

        trainer = NoSave(config)
        stamps, tokens, predictions = [], [], []

        def on_step(tr, m) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            tokens.append(m.real_tokens)
            predictions.append(m.predictions)

        trainer.train(on_step=on_step)
        w = args.warmup
        seconds = stamps[-1] - stamps[w - 1]
        timed = len(stamps) - w
        seqs_per_s = timed * micro / seconds
        mean_tokens = sum(tokens[w:]) / (timed * micro)
        flops = trainer.flops.per_sequence(mean_tokens, sum(predictions[w:]) / (timed * micro))
        return {"config": args.only, "ds_config": os.path.basename(ds_config), "micro_batch": micro,
                "timed_steps": timed, "seconds": seconds, "sequences_per_s": seqs_per_s,
                "real_tokens_per_s": sum(tokens[w:]) / seconds, "gflop_per_sequence": flops / 1e9,
                "mfu": seqs_per_s * flops / (args.peak_tflops * 1e12) if args.peak_tflops else None,
                "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", action="append",
                   help="MODEL-SEQ-PRECISION, e.g. base-128-bf16 (repeatable; default: base and large x 128 "
                        "and 512 x bf16 and fp16)")
    p.add_argument("--micro-batch", type=int, default=0, help="sequences per step (default: per model and seq)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16/fp16 peak of the GPU (H100 SXM 989, H200 989, A100 312)")
    p.add_argument("--ds-config", help="override the ds config of every configuration")
    args = p.parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        p.error("--warmup must be in [1, --steps)")
    if args.only and len(args.only) == 1 and os.environ.get("PRETRAIN_GPU_WORKER"):
        args.only = args.only[0]
        print(RESULT + json.dumps(run_one(args)), flush=True)
        return 0
    names = args.only or [f"{m}-{s}-{p_}" for m in ("base", "large") for s in (128, 512) for p_ in ("bf16", "fp16")]
    results = []
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--only", name, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--peak-tflops", str(args.peak_tflops), "--micro-batch", str(args.micro_batch)]
        if args.ds_config:
            cmd += ["--ds-config", args.ds_config]
        env = {**os.environ, "PRETRAIN_GPU_WORKER": "1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29517")}
        print(f"[{name}] running {args.steps} steps ...", flush=True)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
            print(f"[{name}] failed with exit code {proc.returncode}", flush=True)
            continue
        results.append(json.loads(lines[-1][len(RESULT):]))
    print()
    print(f"{'config':<16} {'ds config':<36} {'micro':>5} {'seq/s':>9} {'tokens/s':>11} {'GFLOP/seq':>9} "
          f"{'MFU':>6} {'mem GiB':>7}  device")
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['max_memory_gib']:.1f}" if r["max_memory_gib"] is not None else "-"
        print(f"{r['config']:<16} {r['ds_config']:<36} {r['micro_batch']:>5} {r['sequences_per_s']:>9,.1f} "
              f"{r['real_tokens_per_s']:>11,.0f} {r['gflop_per_sequence']:>9.1f} {mfu:>6} {mem:>7}  {r['device']}")
    return 0 if len(results) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
