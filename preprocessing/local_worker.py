"""What each ``multi_processing`` worker of the local runner runs (``preprocessing/local_runner.py``):
Beam's own worker (``sdk_worker_main``), once two things are set in the process. It imports the
standard library alone, so that a worker starts wherever Beam's own would (Beam waits for ever
for a worker that ended before it connected).

- A stop signal ends the worker at once, without a traceback: SIGINT's default action is restored
  first, before any import (a terminal's Ctrl-C reaches the workers too, and each printed its
  KeyboardInterrupt; SIGTERM's default action already ended a worker so). The driver gets the
  same signal and says why in one line.
- Its log lines come out as the driver's do: the preprocessing's own, in the driver's format,
  and Beam's warnings and errors, without Beam's start-up and shutdown messages (about 20 lines
  a worker, which Beam also relayed to the driver).
"""

import os
import signal
import sys

if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job's ignored Ctrl-C stays ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)
# Run by its path (local_runner.py), which put this folder first on sys.path, where its modules
# would shadow others of the same name; Beam's own command (python -m) has the working folder there.
sys.path[0] = os.getcwd()

import logging  # noqa: E402
import runpy  # noqa: E402

WORKER_MODULE = "apache_beam.runners.worker.sdk_worker_main"


def main() -> None:
    # Before Beam's imports, whose first warning would otherwise give the root logger a handler
    # with Python's default format.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().handlers[0].addFilter(lambda record: "apitools not found" not in record.getMessage())
    # Beam sets the root logger's level from the pipeline options; these loggers keep their own.
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    logging.getLogger("__main__").setLevel(logging.ERROR)  # sdk_worker_main's, run as __main__ below
    runpy.run_module(WORKER_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
