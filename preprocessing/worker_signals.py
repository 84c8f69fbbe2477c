"""Imported first by each worker process of the local runner's ``multi_processing`` mode, as a
Beam plugin (``preprocessing/local_runner.py``): the worker leaves Ctrl-C and SIGTERM to the
driver, which stops the pipeline, and then ends as at a normal end. Anywhere else (an import of
every module, say) it does nothing: only Beam's worker has its control address in the
environment."""

import os
import signal

if "CONTROL_API_SERVICE_DESCRIPTOR" in os.environ:
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, signal.SIG_IGN)
