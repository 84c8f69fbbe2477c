#!/usr/bin/env bash
# A new GPU node's first checks, in one command of about 10 minutes on one H100 or H200:
#   1. the GPU tests (tests/test_gpu.py: fused optimizers, fp16 loss scaling, the CUDA generator
#      in checkpoints, export, fine-tuning, --compile, host waits), at most GPU_TESTS_S seconds
#      (default 300; DeepSpeed builds its fused optimizers on first use, about 80 s);
#   2. the throughput target's configuration (BERT-base, 128 tokens, bf16, micro-batch 1,024,
#      4 micro-batches an optimizer step): eager, then --compile, each at most 150 s.
# The tests' outcome does not stop the measurements; the exit code is the tests'.
#
#   bash benchmarks/gpu_checks.sh [OUT]                                 # OUT: gpu-checks/
#   BERT_PIPELINE_TEST_DATA=test-data bash benchmarks/gpu_checks.sh     # a node without Apache Beam
#
# OUT gets machine.txt (GPU, driver, versions), gpu_tests.log, rows.jsonl (one row per
# configuration, benchmarks/pretrain_gpu.py's format) and benchmark.log. Making the tests' data
# dir elsewhere: docs/PRETRAINING.md, "Check on your GPU".
set -uo pipefail # not -e: a failed test must not cost the measurements
out=$(realpath -m "${1:-gpu-checks}") # relative paths: from where the script was run
if [[ -n ${BERT_PIPELINE_TEST_DATA:-} ]]; then
  BERT_PIPELINE_TEST_DATA=$(realpath -m "$BERT_PIPELINE_TEST_DATA")
  export BERT_PIPELINE_TEST_DATA
fi
cd "$(dirname "$0")/.." || exit 2
python=${PYTHON:-$(command -v python || command -v python3)}
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1

if ! cuda=$("$python" -c 'import torch; print(torch.cuda.is_available())' 2>&1); then
  echo "gpu_checks.sh: error: $python cannot import torch: $(tail -n 1 <<<"$cuda")" >&2
  exit 2
elif [[ $(tail -n 1 <<<"$cuda") != True ]]; then
  echo "gpu_checks.sh: error: $python sees no CUDA GPU (torch.cuda.is_available() is False)" >&2
  exit 2
fi
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$python" -c 'import platform, torch, transformers, deepspeed
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "deepspeed", deepspeed.__version__)'
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

timeout "${GPU_TESTS_S:-300}" "$python" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -rs 2>&1 |
  tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}

# One literal command line: tests/test_documented_commands.py checks its flags on any machine.
for compile in "" --compile; do
  "$python" benchmarks/pretrain_gpu.py --only base-128-bf16 --micro-batches 1024 --accumulation 4 \
    --timeout 150 --budget 150 --out "$out/rows.jsonl" ${compile:+"$compile"} 2>&1 | tee -a "$out/benchmark.log"
done
exit "$tests"
