"""The driver's report of its threads' errors while the local runner's workers run: each error
whole, in one piece, however many threads fail together (a killed worker fails three at once)."""

import threading

from preprocessing.local_runner import quiet_stopped_workers


def test_errors_of_threads_failing_together_are_reported_whole(capsys, monkeypatch):
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)  # as in run_beam.py, not pytest's own
    threads, together = 8, threading.Barrier(8)

    def fail(i: int) -> None:
        together.wait()
        raise ValueError(f"thread {i} failed")

    with quiet_stopped_workers(stopping=lambda: False) as failed:
        workers = [threading.Thread(target=fail, args=(i,), name=f"t{i}") for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    err = capsys.readouterr().err
    reports = err.split("Exception in thread ")[1:]
    assert len(reports) == threads and failed == {}
    for report in reports:
        name, _, rest = report.partition(":\n")
        lines = rest.splitlines()
        assert lines[0] == "Traceback (most recent call last):"
        assert lines[-1] == f"ValueError: thread {name[1:]} failed"
        assert not [line for line in lines[1:-1] if not line.startswith("  ")], report


def test_the_previous_hook_is_back_after_the_run():
    before = threading.excepthook
    with quiet_stopped_workers(stopping=lambda: False):
        assert threading.excepthook is not before
    assert threading.excepthook is before


def test_a_workers_end_reported_once_and_its_streams_errors_dropped_as_its_echo(capsys, monkeypatch):
    """A worker killed while the driver got no signal: the thread that waits on it reports its end
    (after a grace in which a stop signal would have made it an echo), the gRPC stream threads'
    errors raised meanwhile are dropped, and the driver's main thread gets a SIGINT."""
    import signal
    import time

    import grpc

    from preprocessing import local_runner

    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    monkeypatch.setattr(local_runner, "_DRIVER_GRACE_SECONDS", 0.5)
    interrupts = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: interrupts.append(signum))

    def stream() -> None:
        raise grpc.RpcError()

    def waiter() -> None:
        time.sleep(0.1)  # the streams fail first, as they do when a worker dies
        raise RuntimeError("Worker subprocess exited with return code -15")

    try:
        with quiet_stopped_workers(stopping=lambda: False) as failed:
            threads = [threading.Thread(target=stream, name="beam_control_read"),
                       threading.Thread(target=stream, name="read_grpc_client_inputs"),
                       threading.Thread(target=waiter, name="run_worker")]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            time.sleep(0.1)  # the signal's handler runs in this thread between bytecodes
    finally:
        signal.signal(signal.SIGINT, before)
    err = capsys.readouterr().err
    assert err.count("Exception in thread ") == 1 and "Exception in thread run_worker:" in err, err
    assert err.rstrip().endswith("RuntimeError: Worker subprocess exited with return code -15")
    assert failed == {"worker_exit": -15} and interrupts == [signal.SIGINT]


def test_a_grpc_error_with_no_workers_end_behind_it_still_shows(capsys, monkeypatch):
    import grpc

    from preprocessing import local_runner

    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    monkeypatch.setattr(local_runner, "_DRIVER_GRACE_SECONDS", 0.2)

    def stream() -> None:
        raise grpc.RpcError("the stream's own failure")

    with quiet_stopped_workers(stopping=lambda: False) as failed:
        thread = threading.Thread(target=stream, name="read_grpc_client_inputs")
        thread.start()
        thread.join()
    err = capsys.readouterr().err
    assert "Exception in thread read_grpc_client_inputs:" in err and "RpcError: the stream's own failure" in err
    assert failed == {}
