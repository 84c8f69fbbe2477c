"""The local runner's ``multi_processing`` workers on a stop signal: they end at once, silently,
and the driver alone says why.

Beam starts those workers (``sh -c "python -m …sdk_worker_main"``) in the driver's process group,
so a terminal's Ctrl-C and ``scancel``'s SIGTERM reach each of them too. A worker died of Ctrl-C
with its own KeyboardInterrupt traceback, its end came back to the driver as a thread's traceback,
and the driver's one line ("stopped by SIGINT: …") closed about 80 lines a worker. Now:

- ``runner_for`` gives the runner whose workers run ``preprocessing/local_worker.py``: Beam's
  worker, in which a stop signal ends the process at once, with no traceback. The command is
  exec'd, so no shell stays between Beam and the worker (a shell killed first made Beam drop the
  workers' logging at once). The workers neither ignore nor wait on a signal: a worker signalled
  at any moment, connected to the driver or not, ends, and so does the driver's wait for it;
- ``quiet_stopped_workers`` drops the driver's thread traceback for a worker that such a signal
  ended (Beam raises "Worker subprocess exited with return code -N" in the thread that waits for
  it) and, once the driver has the signal too, the gRPC errors of the streams such a worker left
  (its data and control channels, read by the driver's threads); any other error shows as before.

A remote runner (Dataflow, Flink, Spark) stops its workers its own way: nothing changes there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_SIGNALLED_WORKER = re.compile(r"Worker subprocess exited with return code -(\d+)$")
_WORKER_EXIT = re.compile(r"Worker subprocess exited with return code (-?\d+)$")
_DRIVER_GRACE_SECONDS = 2.0


def runner_for(options):
    """The FnApiRunner with those workers for ``--direct_running_mode=multi_processing``; None
    (Beam's own choice from ``--runner``) for any other runner or running mode."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    if (options.view_as(StandardOptions).runner != "FnApiRunner" or os.name != "posix"  # sh's exec, POSIX signals
            or options.view_as(DirectOptions).direct_running_mode != "multi_processing"):
        return None
    from apache_beam.runners.portability.fn_api_runner.fn_runner import FnApiRunner
    from apache_beam.transforms.environments import SubprocessSDKEnvironment

    workers = SubprocessSDKEnvironment.from_command_string(
        f"exec {shlex.quote(sys.executable)} {shlex.quote(os.path.join(os.path.dirname(__file__), 'local_worker.py'))}")
    options.view_as(DirectOptions).direct_running_mode = None  # else the runner puts its own command back
    return FnApiRunner(default_environment=workers)


def _stop_noise(error: BaseException | None, stopping: Callable[[], bool]) -> bool:
    """Whether ``error`` is what a stop signal makes the driver's threads raise, once the driver
    has it too: the end of a worker the signal killed, or a gRPC stream such a worker left open.
    A worker ended so while the driver got no signal (Beam's own SIGINT to a stuck worker, an
    out-of-memory killer's SIGTERM) still shows."""
    if error is None:
        return False
    ended = _SIGNALLED_WORKER.match(str(error)) if isinstance(error, RuntimeError) else None
    if ended and int(ended.group(1)) in _STOP_SIGNALS:
        # The worker's end can reach its thread a moment before the driver's own handler has run.
        deadline = time.monotonic() + _DRIVER_GRACE_SECONDS
        while not stopping() and time.monotonic() < deadline:
            time.sleep(0.05)
        return stopping()
    if stopping():
        import grpc

        return isinstance(error, grpc.RpcError)
    return False


@contextlib.contextmanager
def quiet_stopped_workers(stopping: Callable[[], bool]) -> Iterator[dict]:
    """Drops the driver's thread tracebacks and logged errors that ``_stop_noise`` names; every
    other one shows as before. ``stopping()``: whether the driver has received a stop signal.

    A worker that ends otherwise (killed for memory, say) left Beam's driver waiting for ever on
    the work it held: its traceback shows, and the driver's main thread is interrupted, with the
    worker's return code under ``"worker_exit"`` in the yielded dict."""
    previous, failed = threading.excepthook, {}

    def hook(args) -> None:
        if _stop_noise(args.exc_value, stopping):
            return
        previous(args)
        ended = _WORKER_EXIT.match(str(args.exc_value)) if isinstance(args.exc_value, RuntimeError) else None
        if ended and not failed:
            failed["worker_exit"] = int(ended.group(1))
            os.kill(os.getpid(), signal.SIGINT)  # a real signal: it also wakes a main thread blocked in a wait

    def keep(record: logging.LogRecord) -> bool:
        return not (record.exc_info and _stop_noise(record.exc_info[1], stopping))

    handlers = logging.getLogger().handlers
    threading.excepthook = hook
    for handler in handlers:
        handler.addFilter(keep)
    try:
        yield failed
    finally:
        threading.excepthook = previous
        for handler in handlers:
            handler.removeFilter(keep)
