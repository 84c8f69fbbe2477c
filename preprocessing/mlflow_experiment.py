"""The MLflow experiment of every stage's run, resolved in one place: ``--experiment`` if
given, else ``MLFLOW_EXPERIMENT_NAME`` (MLflow's own variable), else ``bert-pipeline``.

It lives in preprocessing, which the training stages import and not the reverse (a Beam
worker installs preprocessing alone); it imports nothing, so neither stage pays for it.
"""

from __future__ import annotations

import os

DEFAULT_EXPERIMENT = "bert-pipeline"
ENV = "MLFLOW_EXPERIMENT_NAME"
# The --experiment flags' help (the empty format: no "(default: None)" after the real default).
HELP = f"MLflow experiment (default: ${ENV}, else {DEFAULT_EXPERIMENT})%(default).0s"


def experiment_flag(value: str) -> str:
    """--experiment's type: an empty name (an unset shell variable, ``--experiment "$EXP"``) is
    refused, not read as the default, so runs never land unnoticed in another experiment."""
    if not value.strip():
        import argparse

        raise argparse.ArgumentTypeError(f"an empty name: name the experiment, or leave the flag out for "
                                         f"${ENV}, else {DEFAULT_EXPERIMENT}")
    return value


def experiment_name(given: str | None) -> str:
    return given or os.environ.get(ENV) or DEFAULT_EXPERIMENT


def browse_hint(uri: str | None = None) -> str:
    """How to look at the runs logged to ``uri`` (default: $MLFLOW_TRACKING_URI, else MLflow's
    own default, sqlite:///mlflow.db): a server's page, or the command that serves a local store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {_from_anywhere(uri)}  (then http://127.0.0.1:5000)"


def _from_anywhere(uri: str) -> str:
    """A local store's URI with an absolute path: the hint is read, and run, from another directory
    than the run's (sqlite:///mlflow.db is relative to where the stage ran)."""
    if uri in _BARE_SCHEMES:  # databricks: a scheme of its own, no path
        return uri
    if uri.startswith("sqlite:///") and not uri[len("sqlite:///"):].startswith("/"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if ":" not in uri.split("/", 1)[0]:  # a plain directory: MLflow's file store
        return os.path.abspath(uri)
    return uri


def announce_run(log, run_id: str, stage: str, experiment: str, uri: str) -> None:
    """Says the run's id once, at its start: the id that report.py and the lineage tags of later
    stages take, and the one to look for when a stage stops early. A password in the URI is not
    logged."""
    log.info("MLflow run %s (stage %s, experiment %r, store %s)", run_id, stage, experiment, _without_password(uri))


def _without_password(uri: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" in parts.netloc:  # the host as written after it: an IPv6 host keeps its brackets
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return uri


def tracking_errors() -> tuple[type[BaseException], ...]:
    """What a failing tracking store raises: MLflow's errors (its SQL store wraps the database's in
    them), the file system's and HTTP's (OSErrors). Anything else from a tracking call is a bug.
    Called on the launcher with MLflow on only: a Beam worker has no mlflow."""
    from mlflow.exceptions import MlflowException

    return (MlflowException, OSError)


def tracking_failure(err: BaseException) -> str:
    """The line of a tracking store's error that says what failed ("(sqlite3.OperationalError)
    database or disk is full"), not SQLAlchemy's notes around it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()
             and not line.strip().startswith(("(raised as a result", "(Background on this error"))]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


class QuietRepeats:
    """A logging filter for MLflow's own loggers once its store fails: every metrics batch logs the
    same database error again (7 lines a step on SQLite). The first error passes, then one in
    ``every``, saying how many were held back since the last that passed. ``level``: the lowest
    level held back (urllib3 warns of each retry of each queued metrics batch to a server gone)."""

    def __init__(self, every: int = 100, level: int = 40):
        self.every, self.level, self.seen, self.held = every, level, 0, 0

    def filter(self, record) -> bool:
        if record.levelno < self.level:
            return True
        self.seen += 1
        if self.seen > 1 and self.seen % self.every:
            self.held += 1
            return False
        if self.held:
            record.msg = f"{record.msg} [{self.held} more errors of this logger held back]"
            self.held = 0
        return True


class TrackingServerError(ValueError):
    """The tracking server named by MLFLOW_TRACKING_URI does not answer, or the URI names none."""


# MLflow's HTTP client retries a failed call 7 times with doubling waits and waits 120 s for an
# answer: a server that went away mid-run held a finished stage about 4 minutes a call (its
# metrics, its report, its model, the run's end). Bounded at the start (a value set is kept), and
# once a call has failed, each later one is tried once (``fail_fast``).
_HTTP_START = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_HTTP_FAILED = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# Tracking URIs without "://" that MLflow takes as a scheme of its own, not as a folder.
_BARE_SCHEMES = ("databricks", "databricks-uc", "uc")


def fail_fast() -> None:
    """After a tracking call failed: each later one is tried once, with a short wait for an answer
    (MLflow reads these for every request)."""
    os.environ.update(_HTTP_FAILED)


def check_tracking_server(uri: str | None = None, timeout: float = 10.0, given_as: str = "MLFLOW_TRACKING_URI",
                          way_out: str = ", or pass --no-mlflow") -> None:
    """An http(s) tracking URI must answer before a stage starts its work: MLflow's client retries
    for minutes, then fails with a traceback after the stage's whole start-up (data conversion,
    DeepSpeed). A local database (sqlite:, postgresql:, …) needs no server; a folder, which
    MLflow 3 no longer keeps runs in, is refused in one line (before: its traceback, after the
    stage's start-up; "127.0.0.1:5000" without http:// reads as one)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if uri and ("://" not in uri and uri not in _BARE_SCHEMES or uri.startswith("file:")):
        if os.path.isfile(uri):  # a database file named by its path
            raise TrackingServerError(f"{given_as} {uri}: a file's path; name a database by its URI: "
                                      f"sqlite:///{os.path.abspath(uri)}")
        raise TrackingServerError(f"{given_as} {uri}: a folder, where MLflow 3 keeps no runs; name a server "
                                  f"(http://HOST:PORT) or a database (sqlite:///PATH.db){way_out}")
    if not uri.startswith(("http://", "https://")):
        return
    for name, value in _HTTP_START.items():
        os.environ.setdefault(name, value)
    import urllib.error
    import urllib.request

    uri = _without_password(uri)  # urllib reads "user:password@host" as a host name, and it is no one's to see
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (a server behind authentication, or one without /health)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingServerError(f"MLflow tracking server {uri} does not answer ({reason}): start it, set "
                                  f"{given_as} to one that runs{way_out}") from None


def check_tracking(experiment: str | None) -> None:
    """A stage's check before its work: the tracking store (``check_tracking_server``), and its
    experiment (--experiment, else the default), which must not be a deleted one: MLflow neither
    logs to it nor makes another of that name, and said so in a traceback after the start-up."""
    check_tracking_server()
    import mlflow

    name = experiment_name(experiment)
    try:
        found = mlflow.MlflowClient().get_experiment_by_name(name)
    except tracking_errors() as err:
        # A server whose /health answers but whose API fails (its database down behind it, a login
        # it asks for: 401): before, the stage's start-up ran, then MLflow's chained tracebacks.
        uri = mlflow.get_tracking_uri()
        raise TrackingServerError(f"MLflow tracking store {_without_password(uri)} fails ({tracking_failure(err)[:300]}): "
                                  "fix it, set MLFLOW_TRACKING_URI to one that works, or pass --no-mlflow") from None
    if found is not None and found.lifecycle_stage == "deleted":
        raise TrackingServerError(f"MLflow experiment {name!r} is deleted: restore it (mlflow experiments restore "
                                  f"--experiment-id {found.experiment_id}) or name another with --experiment")
