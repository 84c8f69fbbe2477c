"""What each ``multi_processing`` worker of the local runner runs (``preprocessing/local_runner.py``):
Beam's own worker (``sdk_worker_main``), once two things are set in the process.

- A stop signal ends the worker at once, without a traceback: SIGINT's default action is restored
  first, before any import (a terminal's Ctrl-C reaches the workers too, and each printed its
  KeyboardInterrupt; SIGTERM's default action already ended a worker so). The driver gets the
  same signal and says why in one line.
- Its log lines come out as the driver's do: the preprocessing's own, in the driver's format,
  and Beam's warnings and errors, without Beam's start-up and shutdown messages (about 20 lines
  a worker, which Beam also relayed to the driver).
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_DFL)

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
