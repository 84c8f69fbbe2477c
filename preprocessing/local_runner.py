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
  (its data and control channels, read by the driver's threads). A worker that ends otherwise
  (the out-of-memory killer) shows its one traceback and ends the run; the gRPC errors of the
  streams it left, and the ends of the other workers as the driver shuts down, are its echo.
  Any other error shows as before, each in one piece.

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
import traceback
from collections.abc import Callable, Iterator

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_SIGNALLED_WORKER = re.compile(r"Worker subprocess exited with return code -(\d+)$")
_WORKER_EXIT = re.compile(r"Worker subprocess exited with return code (-?\d+)$")
_DRIVER_GRACE_SECONDS = 2.0
_REPORTING = threading.Lock()


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


def _within_grace(known: Callable[[], bool], grace: float) -> bool:
    """Whether ``known()`` holds now or within ``grace`` seconds: a worker's end reaches the
    driver's threads a moment apart (its streams, the thread that waits on it, the driver's own
    handler)."""
    deadline = time.monotonic() + grace
    while not known() and time.monotonic() < deadline:
        time.sleep(0.05)
    return known()


def _echo(error: BaseException | None, stopping: Callable[[], bool], worker_ended: Callable[[], bool],
          grace: float | None = None) -> bool:
    """Whether ``error`` only echoes an end the driver reports itself: the end of a worker a stop
    signal killed once the driver has the signal too, or a gRPC stream left open by a worker that
    ended (stopped, or seen ended by the thread that waits on it). A worker ended by a stop signal
    while the driver got none (an administrator's ``kill``) still shows, as does a gRPC error with
    no worker's end behind it."""
    if error is None:
        return False
    import grpc

    grace = _DRIVER_GRACE_SECONDS if grace is None else grace
    ended = _SIGNALLED_WORKER.match(str(error)) if isinstance(error, RuntimeError) else None
    if ended and int(ended.group(1)) in _STOP_SIGNALS:
        return _within_grace(stopping, grace)
    if isinstance(error, grpc.RpcError):
        return _within_grace(lambda: stopping() or worker_ended(), grace)
    return False


def _report(args) -> None:
    """threading's own report of a thread's error, in one write. The default writes it in pieces,
    and the several driver threads a worker's end fails at once interleaved theirs line by line."""
    if issubclass(args.exc_type, SystemExit):  # as the default: a thread's sys.exit() is no error
        return
    stream = sys.stderr if sys.stderr is not None else getattr(args.thread, "_stderr", None)
    if stream is None:
        return
    name = args.thread.name if args.thread is not None else threading.get_ident()
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    with _REPORTING:
        stream.write(f"Exception in thread {name}:\n{text}")
        stream.flush()


@contextlib.contextmanager
def quiet_stopped_workers(stopping: Callable[[], bool]) -> Iterator[dict]:
    """Drops the driver's thread tracebacks and logged errors that ``_echo`` names; every other one
    shows as before, whole. ``stopping()``: whether the driver has received a stop signal.

    A worker that ends otherwise (killed for memory, say) left Beam's driver waiting for ever on
    the work it held: its traceback shows, and the driver's main thread is interrupted, with the
    worker's return code under ``"worker_exit"`` in the yielded dict. Entered in the main thread."""
    previous, failed, exited = threading.excepthook, {}, threading.Event()

    def hook(args) -> None:
        ended = _WORKER_EXIT.match(str(args.exc_value)) if isinstance(args.exc_value, RuntimeError) else None
        if ended:
            exited.set()  # at once: the streams' errors, raised in other threads meanwhile, are its echo
        if _echo(args.exc_value, stopping, exited.is_set):
            return
        with _REPORTING:
            first = ended is not None and not failed
            if ended and not first:
                return  # the other workers, ended by the driver's own shutdown that the first one began
            if first:
                failed["worker_exit"] = int(ended.group(1))
        (_report if previous is threading.__excepthook__ else previous)(args)
        if first:
            os.kill(os.getpid(), signal.SIGINT)  # a real signal: it also wakes a main thread blocked in a wait

    def keep(record: logging.LogRecord) -> bool:
        if not record.exc_info:
            return True
        verdict = getattr(record, "_worker_echo", None)  # one wait per record, however many handlers
        if verdict is None:
            # Never waited for in the main thread: a stop arriving there mid-wait would end Beam's
            # clean-up, which logs the streams' stored errors, half done.
            grace = 0.0 if threading.current_thread() is threading.main_thread() else None
            verdict = record._worker_echo = _echo(record.exc_info[1], stopping, exited.is_set, grace)
        return not verdict

    handlers = logging.getLogger().handlers
    threading.excepthook = hook
    for handler in handlers:
        handler.addFilter(keep)
    # A background job ignores SIGINT (the shell's doing): the hook's own SIGINT is then caught
    # here, and any other still ignored.
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        def ours_only(signum, frame):
            if failed:
                raise KeyboardInterrupt
        signal.signal(signal.SIGINT, ours_only)
    try:
        yield failed
    finally:
        threading.excepthook = previous
        for handler in handlers:
            handler.removeFilter(keep)
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
