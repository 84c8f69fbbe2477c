"""Corpus → sharded, masked BERT pretraining examples with a trained SentencePiece vocabulary.

    python preprocessing/run_beam.py                       # the bundled real sample
    python preprocessing/run_beam.py --input 'enwiki-*-pages-articles*.xml.bz2' \
        --output data/wiki128 --direct_num_workers=8 --direct_running_mode=multi_processing

Run with --help for every flag; flags it does not know go to Apache Beam.
"""

import atexit
import logging
import os
import signal
import sys
import threading

if __package__ in (None, ""):  # run as a file: see pipeline/__init__.py
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[0] = _root
    # Beam's worker processes must find it too.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_root, os.environ.get("PYTHONPATH")]))

# Before Beam is imported: it logs an irrelevant GCP warning on import, which would
# also configure the root logger with its own format.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())
for _noisy in ("apache_beam", "alembic", "mlflow", "urllib3"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)

from preprocessing import driver  # noqa: E402
from preprocessing.errors import explain, interrupted, refused_write  # noqa: E402
from preprocessing.local_runner import quiet_stopped_workers  # noqa: E402
from preprocessing.mlflow_experiment import check_tracking  # noqa: E402
from preprocessing.options import parse_args  # noqa: E402
from preprocessing.vocab import TRAINING_THREAD  # noqa: E402


def _not_a_known_error(record: logging.LogRecord) -> bool:
    """Beam logs a worker's exception with its traceback before the driver sees it; for the errors
    main() turns into one line (bad input, flags, vocabulary), that traceback is noise."""
    error = record.exc_info[1] if record.exc_info else None
    return not (error is not None and (explain(error) is not None or refused_write(error, "") is not None
                                       or interrupted(error)))


for _handler in logging.getLogger().handlers:
    _handler.addFilter(_not_a_known_error)


def main(argv=None) -> int:
    config, beam_args = parse_args(argv)
    stop, workers = _stop_signals(), {}
    try:
        if config.mlflow:
            check_tracking(config.experiment)
        with quiet_stopped_workers(stopping=lambda: "signum" in stop) as workers:
            summary = driver.run(config, beam_args)
    except BaseException as err:  # noqa: BLE001 - turned into one readable line, then re-raised if unknown
        if interrupted(err) and "worker_exit" in workers:  # the SIGINT local_runner sent this process
            code = workers["worker_exit"]
            if code == -signal.SIGKILL:
                why, advice = ("killed by SIGKILL, as the kernel's out-of-memory killer does",
                               ", with fewer --direct_num_workers if memory ran out")
            else:
                why, advice = (f"killed by {signal.Signals(-code).name}" if -code in signal.valid_signals()
                               else f"exit {code}", "")
            print(f"error: a worker process of the local runner ended ({why}): {_output_state(err, config.output)}; "
                  f"rerun into the same --output{advice}", file=sys.stderr)
            return 1
        if interrupted(err):  # Ctrl-C, scancel, timeout: said, and the data dir's state with it
            name = signal.Signals(stop.get("signum", signal.SIGINT)).name
            if getattr(err, "restored_previous", False):
                state = f"{_output_state(err, config.output)}; rerun into the same --output"
            elif "://" not in config.output and os.path.exists(os.path.join(config.output, "manifest.json")):
                state = (f"the data dir {config.output} has its manifest.json, so it is complete (its MLflow run "
                         "may lack what came after)")
            else:
                state = (f"the data dir {config.output} is not complete (a finished one has manifest.json); rerun "
                         "into the same --output")
            print(f"error: stopped by {name}: {state}", file=sys.stderr)
            _exit_past_the_vocabulary_training(128 + stop.get("signum", signal.SIGINT))
            return 128 + stop.get("signum", signal.SIGINT)
        if not isinstance(err, Exception):
            raise
        full = refused_write(err, config.output)
        if full:  # not the input's fault: exit 1, as a failed save in pretraining
            print(f"error: {full}", file=sys.stderr)
            return 1
        message = explain(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    finally:
        for signum, handler in stop.pop("restore").items():
            signal.signal(signum, handler)
    print(driver.format_summary(summary))
    return 0


def _output_state(err: BaseException, output: str) -> str:
    """What a run that did not finish left at ``output``."""
    if getattr(err, "restored_previous", False):
        return f"{output} holds the previous data dir again, whole (this run's files are deleted)"
    return f"the data dir {output} is not complete"


def _exit_past_the_vocabulary_training(code: int) -> None:
    """A stop leaves SentencePiece's training running in its thread (preprocessing/vocab.py): in
    C++ now, it returns into Python at its end, which aborts a process in its shutdown (exit 134).
    Such a process ends here, once the exit handlers (MLflow's, the temporary folders') have run."""
    if any(t.name == TRAINING_THREAD and t.is_alive() for t in threading.enumerate()):
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _stop_signals() -> dict:
    """SIGTERM (scancel, timeout, a pod's end) stops the run as Ctrl-C does: with one line, and its
    MLflow run marked KILLED (before: exit 143 in silence, the run left RUNNING for ever). The
    returned dict gets the signal's number once either arrives (Ctrl-C still raises Python's
    KeyboardInterrupt), and the handlers to restore when main() returns."""
    received: dict = {"restore": {}}

    def handle(signum, frame):
        received["signum"] = signum
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        for signum, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
            if signal.getsignal(signum) is default:  # not one a shell made its background job ignore
                received["restore"][signum] = signal.signal(signum, handle)
    return received


if __name__ == "__main__":
    sys.exit(main())
