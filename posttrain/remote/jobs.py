"""``posttrain jobs submit|list|status|watch|cancel|pause|resume|artifacts|logs``: training jobs from the shell.

``submit`` takes a YAML or JSON file in the shape of the API's request body (so a job's config can
live in git). ``watch`` follows each job's event stream (``/v1/post-training/job/events``) and
shows a live progress bar per job; it exits 0 only when every job it watched completed.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from posttrain.remote.common import (
    ApiKeyOption,
    JsonOption,
    RemoteGroup,
    UrlOption,
    client,
    fmt_float,
    fmt_time,
    group_callback,
    out,
    print_json,
)
from posttrain.remote.watching import JobView, count_label, log_line, say, watch_or_exit

app = typer.Typer(help="Training jobs on a posttrain server (submit, list, status, watch, cancel, pause, resume, "
                       "artifacts, logs).",
                  no_args_is_help=True, cls=RemoteGroup)
app.callback()(group_callback)

JobArgument = Annotated[str, typer.Argument(metavar="JOB", help="The job's job_uuid.")]


class ConfigError(Exception):
    """A job config file that cannot be used as a request body."""


# -- config files -------------------------------------------------------------------------------


def load_config(path: str) -> dict[str, Any]:
    """A request body from a YAML or JSON file (``-``: standard input)."""
    import yaml

    name = "standard input" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {name}: {exc.strerror or exc}") from exc
    try:
        body = json.loads(text) if path.lower().endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{name}: not valid YAML: {getattr(exc, 'problem', None) or exc}{where}") from None
    if not isinstance(body, dict):
        raise ConfigError(f"{name}: the top level must be a mapping in the shape of the API's request body, "
                          f"not {type(body).__name__}")
    return json.loads(json.dumps(body, default=str))  # YAML dates and the like as plain JSON values


def method_of(body: dict[str, Any]) -> str:
    """Which endpoint takes this body: a body with a ``grader`` is reinforcement fine-tuning (our own
    endpoint, GRPO), one naming ``finetuned_model`` preference optimisation, any other supervised."""
    if "grader" in body:
        return "reinforcement-fine-tune"
    return "preference-optimize" if "finetuned_model" in body else "supervised-fine-tune"


def endpoint_of(body: dict[str, Any]) -> str:
    """The path that takes this body (reinforcement is ours, beside the Llama Stack paths)."""
    method = method_of(body)
    return f"/v1/posttrain/{method}" if method == "reinforcement-fine-tune" else f"/v1/post-training/{method}"


# -- event text ---------------------------------------------------------------------------------


# -- commands -----------------------------------------------------------------------------------


@app.command()
def submit(
    ctx: typer.Context,
    config: Annotated[str, typer.Argument(metavar="CONFIG", help="YAML or JSON request body ('-': standard input).")],
    job_uuid: Annotated[str | None, typer.Option(help="Set the job_uuid (default: the file's, else a new uuid4).",
                                                    show_default=False)] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Watch the job to its end (exit 1 unless completed).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the endpoint and the body; send nothing.")] = False,
    poll: Annotated[bool, typer.Option("--poll", help="With --watch: poll event pages instead of streaming.")] = False,
    keep_checkpoints: Annotated[int | None, typer.Option(
        help="Keep only the newest N epoch checkpoints (sent as the X-Posttrain-Keep-Checkpoints header; the "
             "server's POSTTRAIN_MAX_CHECKPOINTS_PER_JOB bounds it; default: the server's POSTTRAIN_KEEP_CHECKPOINTS).",
        show_default=False)] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Submit a job from a config file in the API's request shape; prints its job_uuid.

    A body with 'grader' goes to /v1/posttrain/reinforcement-fine-tune (GRPO), one with
    'finetuned_model' to preference-optimize, any other to supervised-fine-tune.
    'hyperparam_search_config' and 'logger_config' default to {} when the file leaves them out.
    """
    body = load_config(config)
    if job_uuid:
        body["job_uuid"] = job_uuid
    elif not body.get("job_uuid"):
        body["job_uuid"] = str(uuid.uuid4())
    body.setdefault("hyperparam_search_config", {})
    body.setdefault("logger_config", {})
    path = endpoint_of(body)
    headers = {"X-Posttrain-Keep-Checkpoints": str(keep_checkpoints)} if keep_checkpoints is not None else None
    if dry_run:
        say(f"POST {path}" + "".join(f"\n{name}: {value}" for name, value in (headers or {}).items()))
        print_json(body)
        return
    with client(ctx, url, api_key) as api:
        created = api.post(path, body, headers=headers)
        say(created.get("job_uuid", body["job_uuid"]) if isinstance(created, dict) else body["job_uuid"])
        if watch:
            watch_or_exit(api, [body["job_uuid"]], poll)


LIST_COLUMNS = ("method", "model", "dataset_id", "created_at", "scheduled_at", "started_at", "completed_at",
                "attempt", "epoch", "step", "progress", "loss", "checkpoints", "train_loss", "validation_loss", "error")


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("_at"):
        return fmt_time(value)
    if key == "model" and isinstance(value, str) and "/" in value.rstrip("/"):
        return value.rstrip("/").rsplit("/", 1)[-1]  # the folder's name; --json has the whole path
    if key == "error" and isinstance(value, dict):
        text = ": ".join(str(v) for v in (value.get("code"), value.get("message")) if v)
        return text if len(text) <= 60 else text[:59] + "…"
    if isinstance(value, list):
        return str(len(value))
    if isinstance(value, float):
        return fmt_float(value)
    if isinstance(value, dict):
        return json.dumps(value, default=str)[:40]
    return str(value)


def _table_row(row: dict[str, Any]) -> dict[str, Any]:
    """A listing row as shown: ``step`` as step/total."""
    shown = dict(row)
    if shown.get("total_steps") is not None:
        shown["step"] = f"{shown.get('step') or 0}/{shown['total_steps']}"
    return shown


def _rich_job_list(api) -> list[dict[str, Any]] | None:  # noqa: ANN001
    """``GET /v1/posttrain/jobs`` (a richer listing) when this server has it."""
    from posttrain.remote.http import ApiError

    try:
        answer = api.get("/v1/posttrain/jobs")
    except ApiError as exc:
        if exc.status in (404, 405):
            return None
        raise
    rows = answer.get("data") if isinstance(answer, dict) else answer
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "job_uuid" in r for r in rows):
        return None
    return rows


def _job_rows_from_status(api) -> list[dict[str, Any]]:  # noqa: ANN001
    from posttrain.remote.http import ApiError

    rows = []
    for item in api.get("/v1/post-training/jobs")["data"]:
        try:
            status = api.get("/v1/post-training/job/status", job_uuid=item["job_uuid"])
        except ApiError as exc:  # removed between the two calls
            if exc.status != 404:
                raise
            continue
        last = status["checkpoints"][-1] if status.get("checkpoints") else None
        metrics = (last or {}).get("training_metrics") or {}
        rows.append({"job_uuid": status["job_uuid"], "status": status["status"],
                     "scheduled_at": status.get("scheduled_at"), "started_at": status.get("started_at"),
                     "completed_at": status.get("completed_at"), "checkpoints": status.get("checkpoints", []),
                     "validation_loss": metrics.get("validation_loss")})
    rows.sort(key=lambda r: str(r.get("scheduled_at") or ""), reverse=True)  # newest first
    return rows


@app.command("list")
def list_(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="Only jobs with this status.", show_default=False)] = None,
    as_json: JsonOption = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """List the jobs with their status."""
    with client(ctx, url, api_key) as api:
        rows = _rich_job_list(api)
        if rows is None:
            rows = _job_rows_from_status(api)
    if status:
        rows = [r for r in rows if r.get("status") == status]
    if as_json:
        print_json(rows)
        return
    if not rows:
        say("no jobs")
        return
    rows = [_table_row(r) for r in rows]
    present = [k for k in LIST_COLUMNS if any(r.get(k) is not None for r in rows)]
    # The ids and statuses are never wrapped or cut, however narrow the terminal: scripts grep for them.
    table = Table(Column("job_uuid", no_wrap=True), Column("status", no_wrap=True), *present, box=None,
                  header_style="bold", pad_edge=False)
    for r in rows:
        table.add_row(str(r["job_uuid"]), str(r.get("status", "?")), *(_cell(k, r.get(k)) for k in present))
    out.print(table)


def _checkpoint_table(checkpoints: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("epoch", "train loss", "val loss", "perplexity", "created"):
        table.add_column(name, no_wrap=True)
    table.add_column("path", overflow="fold", min_width=24)
    for c in checkpoints:
        m = c.get("training_metrics") or {}
        table.add_row(str(c.get("epoch", "?")), fmt_float(m.get("train_loss")), fmt_float(m.get("validation_loss")),
                      fmt_float(m.get("perplexity"), 3), fmt_time(c.get("created_at")), str(c.get("path", "?")))
    return table


@app.command()
def status(
    ctx: typer.Context,
    job_uuid: JobArgument,
    as_json: JsonOption = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Show a job: status, times, resources, latest metrics, error, and its checkpoints."""
    from posttrain.remote.http import ApiError

    with client(ctx, url, api_key) as api:
        answer = api.get("/v1/post-training/job/status", job_uuid=job_uuid)
        if as_json:
            print_json(answer)
            return
        try:
            own_status, events = api.all_events(job_uuid)
        except ApiError:
            own_status, events = answer["status"], []  # a server without the events extension
    view = JobView(job_uuid, answer["status"])
    for event in events:
        view.apply(event)
    view.status = answer["status"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("job", answer["job_uuid"])
    # The events page has the job's own status: the Llama Stack one shows a paused job as scheduled.
    grid.add_row("status", own_status if own_status in ("pausing", "paused") else answer["status"])
    for key in ("scheduled_at", "started_at", "completed_at"):
        if answer.get(key):
            grid.add_row(key.removesuffix("_at"), fmt_time(answer[key]))
    resources = answer.get("resources_allocated") or {}
    if resources:
        dtype = str(resources.get("dtype", "?"))
        if resources.get("requested_dtype") and resources["requested_dtype"] != dtype:
            dtype += f" (requested {resources['requested_dtype']})"
        grid.add_row("resources", f"{resources.get('device', '?')}, {dtype}, {resources.get('threads', '?')} threads, "
                                  f"{count_label(resources.get('trainable_parameters'))} of "
                                  f"{count_label(resources.get('parameters'))} parameters trained"
                                  + (f", worker {resources['worker']}" if resources.get("worker") else "")
                                  + (f", attempt {resources['attempt']}" if resources.get("attempt") else ""))
    info = view.info()
    if info:
        grid.add_row("progress", info)
    if answer["status"] == "failed" and view.failure:
        grid.add_row("error", view.failure)
    if answer["status"] == "cancelled" and view.reason:
        grid.add_row("reason", view.reason)
    out.print(grid)
    checkpoints = answer.get("checkpoints") or []
    out.print(f"\n[bold]checkpoints[/bold] ({len(checkpoints)})")
    if checkpoints:
        out.print(_checkpoint_table(checkpoints))


@app.command()
def watch(
    ctx: typer.Context,
    job_uuids: Annotated[list[str], typer.Argument(metavar="JOB...", help="The job(s) to watch.")],
    poll: Annotated[bool, typer.Option("--poll", help="Poll event pages instead of streaming.")] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Live progress of job(s) until they end: epoch, step, tokens/s, ETA, train and validation loss.

    Exits 0 when every job completed, 1 when any failed or was cancelled.
    """
    with client(ctx, url, api_key) as api:
        watch_or_exit(api, job_uuids, poll)


@app.command()
def cancel(
    ctx: typer.Context,
    job_uuids: Annotated[list[str], typer.Argument(metavar="JOB...", help="The job(s) to cancel.")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Cancel job(s): a scheduled one at once, a running one's trainer stops within seconds."""
    with client(ctx, url, api_key) as api:
        for job_uuid in job_uuids:
            api.post("/v1/post-training/job/cancel", {"job_uuid": job_uuid})
            now = api.get("/v1/post-training/job/status", job_uuid=job_uuid)["status"]
            say(f"{job_uuid}  {now}")


def _control(ctx: typer.Context, action: str, job_uuids: list[str], url: str | None, api_key: str | None) -> None:
    """``POST /v1/posttrain/jobs/{job}/{action}`` for each job, printing the status it answers."""
    from urllib.parse import quote

    with client(ctx, url, api_key) as api:
        for job_uuid in job_uuids:
            answer = api.post(f"/v1/posttrain/jobs/{quote(job_uuid, safe='')}/{action}", None)
            say(f"{job_uuid}  {answer['status']}")


@app.command()
def pause(
    ctx: typer.Context,
    job_uuids: Annotated[list[str], typer.Argument(metavar="JOB...", help="The job(s) to pause.")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Pause job(s): a scheduled one at once; a running one writes where it stands and frees its
    slot within seconds (pausing, then paused). ``resume`` continues it from that step."""
    _control(ctx, "pause", job_uuids, url, api_key)


@app.command()
def resume(
    ctx: typer.Context,
    job_uuids: Annotated[list[str], typer.Argument(metavar="JOB...", help="The paused job(s) to resume.")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Resume paused job(s): back to the queue, continuing from the step where each paused."""
    _control(ctx, "resume", job_uuids, url, api_key)


@app.command()
def artifacts(
    ctx: typer.Context,
    job_uuid: JobArgument,
    as_json: JsonOption = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """List a job's checkpoints with their metrics and folders."""
    with client(ctx, url, api_key) as api:
        answer = api.get("/v1/post-training/job/artifacts", job_uuid=job_uuid)
    if as_json:
        print_json(answer)
        return
    checkpoints = answer.get("checkpoints") or []
    if not checkpoints:
        say(f"{job_uuid} has no checkpoints yet")
        return
    out.print(_checkpoint_table(checkpoints))


@app.command()
def logs(
    ctx: typer.Context,
    job_uuid: JobArgument,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing events until the job ends.")] = False,
    types: Annotated[list[str] | None, typer.Option(
        "--type", help="Only these event types (state, started, metric, checkpoint, log); repeatable.",
        show_default=False)] = None,
    poll: Annotated[bool, typer.Option("--poll", help="With --follow: poll event pages instead of streaming.")] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Print a job's events (state changes, metrics, checkpoints, log lines) as readable lines."""
    wanted = {t for item in types or [] for t in item.split(",") if t}

    def show(event: dict[str, Any]) -> None:
        if not wanted or event.get("type") in wanted:
            say(log_line(event))

    with client(ctx, url, api_key) as api:
        if not follow:
            _, events = api.all_events(job_uuid)
            for event in events:
                show(event)
            return
        api.get("/v1/post-training/job/status", job_uuid=job_uuid)  # a clear 404 before following
        try:
            for event in api.follow_events(job_uuid, stream=not poll):
                if event.get("type") == "end":
                    break
                show(event)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
