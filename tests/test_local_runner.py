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
