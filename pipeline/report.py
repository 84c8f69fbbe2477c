"""Draw a run's curves from MLflow to one image (PNG, PDF or SVG): losses, accuracies, throughput, learning rate.

    python pipeline/report.py RUN_ID                         # -> RUN_ID.png
    python pipeline/report.py RUN_ID --out curves.png --log-artifact
    MLFLOW_TRACKING_URI=http://host:5000 python pipeline/report.py RUN_ID

For the stages that log series, pretraining and fine-tuning (preprocessing and embedding log
single figures, and are refused in one line): every metric with a history (two or more points)
becomes a line, and metrics are grouped into panels by what they measure, so a pretraining run shows
its train/eval losses together and a fine-tuning run its per-epoch validation metrics. A
metric of one point (the final held-out evaluation, a fine-tuning's test scores) is drawn as a
point in the panel of its kind, where one has a line. A resumed pretraining run is drawn with
the runs it resumed, from the first step on.
The tracking URI is MLflow's default (or MLFLOW_TRACKING_URI, or --tracking-uri).
"""

from __future__ import annotations

import math
import os
import sys

if __package__ in (None, ""):  # run as a file: see pipeline/__init__.py
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from preprocessing import cli_parser  # noqa: E402
from preprocessing.mlflow_experiment import TrackingServerError, check_tracking_server  # noqa: E402

# Panel title -> predicate on the metric name. The first match wins; the rest go in "other".
# One scale per panel: an fp16 loss scale (65,536) beside the losses, or tokens/s (1e5) beside
# an MFU (< 1), drew the smaller ones flat on zero.
PANELS = (
    ("loss", lambda name: "loss" in name and name != "loss_scale"),
    ("accuracy and scores", lambda name: any(k in name for k in ("accuracy", "f1", "mcc", "pearson", "spearman"))),
    ("sequences per second", lambda name: name.endswith("_per_second") and "token" not in name),
    ("tokens per second", lambda name: name.endswith("_per_second") and "token" in name),
    ("model FLOPs utilization", lambda name: name.startswith("mfu_")),
    ("learning rate", lambda name: name == "learning_rate"),
    ("gradients", lambda name: name in ("grad_norm", "skipped_steps")),
    ("shares", lambda name: name.endswith("_share")),  # in [0, 1]: drawn flat beside eval_sequences' thousands
    ("fp16 loss scale", lambda name: name == "loss_scale"),
)


class ReportError(ValueError):
    """A run that cannot be drawn; the message says why."""


def resume_chain(client, run) -> list:
    """The run, then the runs it resumed, newest first (a resumed pretraining run's MLflow run holds
    its own steps only; its tag ``resumed_from_run_id`` names the run whose checkpoint it continued).
    A run deleted from the store ends the chain there."""
    chain, seen = [run], {run.info.run_id}
    while (earlier := chain[-1].data.tags.get("resumed_from_run_id")) and earlier not in seen:
        try:
            chain.append(client.get_run(earlier))
        except Exception:  # noqa: BLE001 - deleted, or in a store this one does not reach: draw what is here
            break
        seen.add(earlier)
    return chain


def histories(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of every metric with at least two points, and of each one-point
    metric whose panel (``group``) has such a line, over the run and the runs it resumed
    (``resume_chain``): an earlier run gives the steps up to the checkpoint a later
    one resumed (its tag ``resumed_at_step``); its steps past it, which the later run trained
    again, are left out, for every metric."""
    try:
        run = client.get_run(run_id)
    except Exception as err:  # MlflowException, or a server that is not there
        raise ReportError(f"run {run_id}: {err}") from None
    merged: dict[str, list[tuple[int, float]]] = {}
    cut = math.inf  # the earlier runs' steps from here on were trained again by a later one
    for part in resume_chain(client, run):
        own = {}
        for name in sorted(part.data.metrics):
            points = sorted((m.step, m.value) for m in client.get_metric_history(part.info.run_id, name))
            own[name] = [(s, v) for s, v in points if math.isfinite(v) and s < cut]
        for name, points in own.items():
            merged[name] = points + merged.get(name, [])
        resumed_at = part.data.tags.get("resumed_at_step")
        firsts = [points[0][0] for points in own.values() if points]
        if resumed_at is not None and resumed_at.isdigit():
            cut = min(cut, int(resumed_at) + 1)
        elif firsts:  # a run that did not record its step: its first logged step bounds it
            cut = min(cut, min(firsts))
    lines = {name: points for name, points in merged.items() if len(points) >= 2}
    if not lines:
        raise ReportError(f"run {run_id} ({run.data.tags.get('stage', 'no stage tag')}) has no metric with two "
                          "or more points to draw")
    drawn = {panel for panel, names in group(lines) for _ in names}
    points = {name: p for name, p in merged.items() if len(p) == 1 and group([name])[0][0] in drawn}
    return dict(sorted({**lines, **points}.items()))


def group(names) -> list[tuple[str, list[str]]]:
    panels: dict[str, list[str]] = {}
    for name in names:
        title = next((t for t, match in PANELS if match(name.split("/")[-1])), "other")
        panels.setdefault(title, []).append(name)
    order = [t for t, _ in PANELS] + ["other"]
    return [(t, panels[t]) for t in order if t in panels]


def draw(curves: dict[str, list[tuple[int, float]]], title: str, out: str, xlabel: str = "step") -> str:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = group(curves)
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    for ax, (panel, names) in zip(axes.flat, panels):
        for name in names:
            steps, values = zip(*curves[name])
            if len(steps) == 1:  # a final figure: a point that stands out from the lines' markers
                ax.plot(steps, values, label=name, linestyle="none", marker="D", markersize=6)
            else:
                ax.plot(steps, values, label=name, marker="o" if len(steps) <= 20 else None, markersize=3)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs are whole
        if panel in ("learning rate", "sequences per second", "tokens per second"):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def report(run_id: str, out: str | None = None, tracking_uri: str | None = None, log_artifact: bool = False) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.output_path import OutputPathError, check_output_file

    out = out or f"{run_id}.png"
    try:  # before the run is read: a bad path is found at once
        check_output_file("--out", out, f"{run_id}.png", (".png", ".pdf", ".svg"))
    except OutputPathError as err:
        raise ReportError(str(err)) from None
    uri = tracking_uri or mlflow.get_tracking_uri()
    check_local_store(uri)
    try:
        check_tracking_server(uri, timeout=10.0, given_as="--tracking-uri" if tracking_uri else "MLFLOW_TRACKING_URI",
                              way_out="")  # a server that does not answer: MLflow retries for minutes
        client = mlflow.MlflowClient(tracking_uri=uri)
        return _draw_run(client, full_run_id(client, run_id, uri), out, log_artifact)
    except (MlflowException, TrackingServerError) as err:
        raise ReportError(f"the tracking store {uri}: {' '.join(str(err).split())[:300]}") from None


WHERE = "run from the folder the stages ran in, or name their store with MLFLOW_TRACKING_URI or --tracking-uri"


def check_local_store(uri: str) -> None:
    """A local store that is not there: MLflow would create an empty one and then not find the run
    (the default sqlite:///mlflow.db is relative to the working directory)."""
    from urllib.parse import unquote, urlparse

    from mlflow.utils.file_utils import local_file_uri_to_path
    from mlflow.utils.uri import is_databricks_uri

    if is_databricks_uri(uri):
        return
    scheme = urlparse(uri).scheme
    if scheme == "sqlite":  # sqlite:///relative.db, sqlite:////absolute.db, ?query for the driver
        path = unquote(uri[len("sqlite:///"):].split("?", 1)[0]) if uri.startswith("sqlite:///") else ""
        if path in ("", ":memory:"):
            return
    elif scheme in ("", "file") or len(scheme) == 1:  # a path (C:\... parses as scheme "c")
        path = local_file_uri_to_path(uri)
    else:
        return
    if not os.path.exists(path):
        raise ReportError(f"the tracking store {uri} does not exist: {WHERE}")


def full_run_id(client, run_id: str, uri: str) -> str:
    """``run_id``, or the one run whose id it begins (as run_all.py's summary and a log show them):
    a unique prefix of 6 or more hex digits is enough, as with git."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode

    run_id = run_id.strip().lower()
    try:
        client.get_run(run_id)
        return run_id
    except MlflowException as err:
        not_found = err.error_code in (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE))
        if not not_found:  # the store's own failure (a refused login, a server error): said as it is
            raise
        if not (6 <= len(run_id) < 32 and all(c in "0123456789abcdef" for c in run_id)):
            raise ReportError(f"run {run_id} is not in the tracking store {uri}: {WHERE}") from err
    experiments = _all_pages(lambda token: client.search_experiments(view_type=ViewType.ALL, page_token=token))
    ids = [e.experiment_id for e in experiments]
    matches = [r.info.run_id for r in _all_pages(lambda token: client.search_runs(
        ids, run_view_type=ViewType.ALL, max_results=5000, page_token=token)) if r.info.run_id.startswith(run_id)
               ] if ids else []
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ReportError(f"{run_id} begins {len(matches)} run ids in {uri} ({', '.join(sorted(matches)[:5])}): "
                          "give more of it")
    raise ReportError(f"no run id in the tracking store {uri} begins {run_id}: {WHERE}")


def _all_pages(search):
    """Every item of a paged MLflow search (``search(page_token)`` gives a PagedList)."""
    token = None
    while True:
        page = search(token)
        yield from page
        token = page.token
        if not token:
            return


def title_of(run, earlier: int) -> str:
    """The figure's title: the run, its stage, the runs it resumed, and its status unless it
    finished (a curve that stops early then reads as a run that did, not one that ended)."""
    run_id = run.info.run_id
    title = f"{run.info.run_name or run_id} · stage {run.data.tags.get('stage', '?')} · run {run_id[:12]}"
    if earlier:
        title += f" · with the {earlier} run{'s' if earlier > 1 else ''} it resumed"
    if run.info.status != "FINISHED":
        title += f" · {run.info.status}"
    return title


def _draw_run(client, run_id: str, out: str, log_artifact: bool) -> str:
    curves = histories(client, run_id)
    run = client.get_run(run_id)
    title = title_of(run, len(resume_chain(client, run)) - 1)
    # fine-tuning logs by epoch (its MLflow step); the other stages by optimizer step
    path = draw(curves, title, out, "epoch" if run.data.tags.get("stage") == "finetune" else "step")
    if log_artifact:
        client.log_artifact(run_id, path)
    return path


def main(argv=None) -> int:
    p = cli_parser.Parser(prog="python pipeline/report.py", description=__doc__.splitlines()[0],
                          formatter_class=cli_parser.DefaultsFormatter)
    p.add_argument("run_id", help="the MLflow run id, or a unique beginning of it (mlflow ui shows them; each stage "
                   "logs its own at its start, and run_all.py's summary lists them)")
    p.add_argument("--out", help="the image to write: .png, .pdf or .svg (default: RUN_ID.png)%(default).0s")
    p.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db)%(default).0s")
    p.add_argument("--log-artifact", action="store_true", help="also attach the image to the run")
    args = p.parse_args(argv)
    try:
        print(report(args.run_id, args.out, args.tracking_uri, args.log_artifact))
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
