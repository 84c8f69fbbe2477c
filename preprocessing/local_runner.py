"""Stop signals and the local runner's ``multi_processing`` workers: the driver's to handle.

Beam starts those workers (``sh -c "python -m …sdk_worker_main"``) in the driver's process group,
so a terminal's Ctrl-C and ``scancel``'s SIGTERM reach each of them too. Each worker died with
its own traceback, its shell's death came back to the driver as a thread's traceback, and the
driver's one line ("stopped by SIGINT: …") closed about 80 lines a worker. Now:

- ``runner_for`` gives the runner whose workers import ``preprocessing.worker_signals`` before
  any work (a Beam plugin, in the workers' own pipeline options), which makes them ignore both
  signals: the driver stops the pipeline and the workers end as at a normal end (a driver killed
  outright closes their control stream, which ends them too);
- ``quiet_stopped_workers`` drops the driver's thread traceback for a worker's shell that such a
  signal ended, and shows any other thread error as before.

A remote runner (Dataflow, Flink, Spark) stops its workers its own way: nothing changes there.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import signal
import sys
import threading
from collections.abc import Iterator

WORKER_PLUGIN = "preprocessing.worker_signals"
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_SIGNALLED_WORKER = re.compile(r"Worker subprocess exited with return code -(\d+)$")


def runner_for(options):
    """The FnApiRunner, its ``multi_processing`` workers given the plugin; None (Beam's own choice
    from ``--runner``) for any other runner or running mode."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    if (options.view_as(StandardOptions).runner != "FnApiRunner"
            or options.view_as(DirectOptions).direct_running_mode != "multi_processing"):
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner.fn_runner import ExtendedProvisionInfo, FnApiRunner
    from apache_beam.transforms.environments import SubprocessSDKEnvironment

    # Beam's own command for this mode, run by "sh -c", but exec'd: the shell no longer stays
    # between Beam and the worker to be killed by the signal (Beam then stopped the workers'
    # logging at once, and a worker printed its end after the driver's last line).
    workers = SubprocessSDKEnvironment.from_command_string(
        f"exec {shlex.quote(sys.executable)} -m apache_beam.runners.worker.sdk_worker_main")
    options.view_as(DirectOptions).direct_running_mode = None  # else the runner puts its own command back
    info = beam_provision_api_pb2.ProvisionInfo(retrieval_token="unused-retrieval-token")
    # What a worker reads as its pipeline options: this runner gives it none otherwise.
    info.pipeline_options.update({"options": {"beam_plugins": [WORKER_PLUGIN]}})
    return FnApiRunner(default_environment=workers, provision_info=ExtendedProvisionInfo(info))


@contextlib.contextmanager
def quiet_stopped_workers() -> Iterator[None]:
    previous = threading.excepthook

    def hook(args) -> None:
        ended = _SIGNALLED_WORKER.match(str(args.exc_value)) if isinstance(args.exc_value, RuntimeError) else None
        if ended and int(ended.group(1)) in _STOP_SIGNALS:
            return  # the driver got the same signal, and says so in one line
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous
