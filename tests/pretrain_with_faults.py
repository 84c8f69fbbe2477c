"""``pipeline/pretrain.py`` with the faults of tests/faults.py injected, and DeepSpeed's CPU
accelerator taking fp16 (tests/fp16_support.py): what the tests launch (torchrun, or a plain
``python``) where a fault must strike, or fp16 run, in another process.

    BERT_PIPELINE_FAULT=raise-on-rank:1:3 torchrun --nproc_per_node 2 tests/pretrain_with_faults.py --data …
"""

import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = REPO  # the repository, not tests/: `pipeline` and `tests` import as packages

from tests import faults, fp16_support  # noqa: E402

faults.install()
fp16_support.take_fp16_on_any_cpu()
# As a script, so that its exit handling (one line per error, os._exit, the exit codes) is the real one.
runpy.run_path(os.path.join(REPO, "pipeline", "pretrain.py"), run_name="__main__")
