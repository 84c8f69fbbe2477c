#!/usr/bin/env bash
# A new GPU node's first checks, in one command of at most about 9 minutes on one H100 or H200,
# what matters most first (a command cut short keeps what was done: each row is written when
# measured):
#   1. DeepSpeed builds its fused Adam and LAMB (ninja, nvcc of torch's CUDA version, a C++
#      compiler; about 80 s once per machine), at most BUILD_S seconds (default 120); a failure
#      is one line, and the measurements then run torch's fused AdamW in the same config;
#   2. the throughput target's configuration (BERT-base, 128 tokens, bf16, micro-batch 1,024,
#      4 micro-batches an optimizer step): --compile, at most COMPILE_S seconds (default 150:
#      compilation first), then eager, at most BENCH_S seconds (default 100);
#   3. the GPU tests (tests/test_gpu.py: fused optimizers, fp16 loss scaling, the CUDA generator
#      in checkpoints, export, fine-tuning, --compile, host waits), at most GPU_TESTS_S seconds
#      (default 150); skipped where the build failed, since each of them takes a fused optimizer
#      and would try the build again.
# The exit code is the tests' (the build's where it failed).
#
#   bash benchmarks/gpu_checks.sh [OUT]                                 # OUT: gpu-checks/
#   BERT_PIPELINE_TEST_DATA=test-data bash benchmarks/gpu_checks.sh     # a node without Apache Beam
#
# OUT gets machine.txt (GPU, driver, versions), build.log, gpu_tests.log, rows.jsonl (one row per
# configuration, benchmarks/pretrain_gpu.py's format) and benchmark.log. Making the tests' data
# dir elsewhere: docs/PRETRAINING.md, "Check on your GPU".
set -uo pipefail # not -e: a failed test must not cost the measurements
out=$(realpath -m "${1:-gpu-checks}") # relative paths: from where the script was run
if [[ -n ${BERT_PIPELINE_TEST_DATA:-} ]]; then
  BERT_PIPELINE_TEST_DATA=$(realpath -m "$BERT_PIPELINE_TEST_DATA")
  export BERT_PIPELINE_TEST_DATA
fi
python=${PYTHON:-$(command -v python || command -v python3)}
[[ $python == */* ]] && python=$(realpath -ms "$python") # relative: from where it was run (a venv link kept)
cd "$(dirname "$0")/.." || exit 2
# DeepSpeed's build looks ninja up on PATH: pip installs it beside a virtualenv's Python, which an
# unactivated environment leaves off PATH (only then is that folder put first).
if [[ $python == */* && -x $(dirname "$python")/ninja ]] && ! command -v ninja >/dev/null; then
  PATH="$(dirname "$python"):$PATH"
fi
export PATH DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
extensions=${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/torch_extensions}

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

# The build once, bounded, before anything needs it: a build killed half-way leaves a lock in
# torch's extensions folder on which every later build would wait.
shipped=ds_configs/gpu_base_bf16_zero1_fused-adam.json
ds_config=$shipped
timeout "${BUILD_S:-120}" "$python" -c 'from deepspeed.ops.op_builder import FusedAdamBuilder, FusedLambBuilder
FusedAdamBuilder().load(); FusedLambBuilder().load()' >"$out/build.log" 2>&1
built=$?
if ((built != 0)); then
  if ((built == 124)); then
    find "$extensions" -name lock -path '*fused_*' -delete 2>/dev/null
  fi
  echo "gpu_checks.sh: DeepSpeed could not build its fused optimizers (exit $built; $out/build.log):" \
    "$(grep -v '^\s*$' "$out/build.log" | tail -n 1)" >&2
  ds_config=$out/gpu_base_bf16_zero1_torch-fused-adamw.json # the same file, torch's fused AdamW
  "$python" -c 'import json, sys
config = json.load(open(sys.argv[1]))
config["optimizer"]["params"].update(torch_adam=True, fused=True)
json.dump(config, open(sys.argv[2], "w"), indent=2)' "$shipped" "$ds_config"
fi

# One literal command line: tests/test_documented_commands.py checks its flags on any machine.
for compile in --compile ""; do
  limit=${BENCH_S:-100}
  [[ -n $compile ]] && limit=${COMPILE_S:-150}
  "$python" benchmarks/pretrain_gpu.py --only base-128-bf16 --micro-batches 1024 --accumulation 4 \
    --ds-config "$ds_config" --timeout "$limit" --budget "$limit" --out "$out/rows.jsonl" \
    ${compile:+"$compile"} 2>&1 | tee -a "$out/benchmark.log"
done

if ((built != 0)); then
  echo "gpu_checks.sh: GPU tests skipped: they take DeepSpeed's fused optimizers, which did not build" |
    tee "$out/gpu_tests.log" >&2
  exit "$built"
fi
timeout "${GPU_TESTS_S:-150}" "$python" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -rs 2>&1 |
  tee "$out/gpu_tests.log"
exit "${PIPESTATUS[0]}"
