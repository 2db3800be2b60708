"""``posttrain jobs submit|list|status|watch|cancel|artifacts|logs``: training jobs from the shell.

``submit`` takes a YAML or JSON file in the shape of the API's request body (so a job's config can
live in git). ``watch`` follows each job's event stream (``/v1/post-training/job/events``) and
shows a live progress bar per job; it exits 0 only when every job it watched completed.
"""

from __future__ import annotations

import json
import math
import queue
import sys
import threading
import uuid
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

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

app = typer.Typer(help="Training jobs on a posttrain server (submit, list, status, watch, cancel, artifacts, logs).",
                  no_args_is_help=True, cls=RemoteGroup)
app.callback()(group_callback)

TERMINAL = ("completed", "failed", "cancelled")
JobArgument = Annotated[str, typer.Argument(metavar="JOB", help="The job's job_uuid.")]


class ConfigError(Exception):
    """A job config file that cannot be used as a request body."""


def _say(text: str) -> None:
    out.out(text, highlight=False)


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
    """Which endpoint takes this body: a body naming ``finetuned_model`` is preference optimisation."""
    return "preference-optimize" if "finetuned_model" in body else "supervised-fine-tune"


# -- event text ---------------------------------------------------------------------------------


def _count(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(int(value))


def describe(event: dict[str, Any]) -> str:
    """One readable line for one job event."""
    kind, data = event.get("type", "?"), event.get("data") or {}
    if kind == "state":
        text = data.get("status", "?")
        extras = []
        if data.get("code") or data.get("message"):
            extras.append(f"{data.get('code') or 'error'}: {data.get('message', '')}")
        if data.get("reason"):
            extras.append(str(data["reason"]))
        if data.get("attempt"):
            extras.append(f"attempt {data['attempt']}")
        if data.get("worker"):
            extras.append(f"worker {data['worker']}")
        return text + (f" ({'; '.join(extras)})" if extras else "")
    if kind == "started":
        r = data.get("resources") or {}
        dtype = r.get("dtype", "?")
        if r.get("requested_dtype") and r.get("requested_dtype") != dtype:
            dtype += f" (asked {r['requested_dtype']})"
        text = (f"trainer started: {r.get('device', '?')}, {dtype}, {r.get('threads', '?')} threads, "
                f"{_count(r.get('parameters'))} parameters ({_count(r.get('trainable_parameters'))} trainable), "
                f"{data.get('total_steps', '?')} steps")
        return text + (f", resumed from {data['resumed_from']}" if data.get("resumed_from") else "")
    if kind == "metric":
        lr = data.get("lr")
        return (f"epoch {data.get('epoch', '?')} step {data.get('step', '?')}/{data.get('total_steps', '?')} "
                f"loss {fmt_float(data.get('loss'))} lr {f'{lr:.2e}' if isinstance(lr, (int, float)) else '-'} "
                f"{fmt_float(data.get('tokens_per_s'), 0)} tok/s")
    if kind == "checkpoint":
        return (f"checkpoint epoch {data.get('epoch', '?')}: train loss {fmt_float(data.get('train_loss'))}, "
                f"validation loss {fmt_float(data.get('validation_loss'))}, "
                f"perplexity {fmt_float(data.get('perplexity'), 3)} -> {data.get('path', '?')}")
    if kind == "log":
        return f"[{data.get('level', 'info')}] {data.get('message', '')}"
    return json.dumps(data, ensure_ascii=False, default=str)


def log_line(event: dict[str, Any]) -> str:
    return f"{fmt_time(event.get('created_at'))}  {event.get('type', '?'):<10}  {describe(event)}"


# -- watching -----------------------------------------------------------------------------------


def _timestamp(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class JobView:
    """What ``watch`` knows of one job, built from its events."""

    RATE_WINDOW_S = 60.0

    def __init__(self, job_uuid: str, status: str) -> None:
        self.job_uuid, self.status = job_uuid, status
        self.epoch: int | None = None
        self.step = 0
        self.total_steps: int | None = None
        self.steps_per_epoch: int | None = None
        self.tokens_per_s: float | None = None
        self.loss: float | None = None
        self.validation_loss: float | None = None
        self.checkpoint_train_loss: float | None = None
        self.perplexity: float | None = None
        self.checkpoints = 0
        self.failure: str | None = None
        self.reason: str | None = None
        self.ended = False
        self._last_step_of_epoch = 0
        self._speeds: deque[float] = deque(maxlen=8)
        self._samples: deque[tuple[float, int]] = deque()

    @property
    def label(self) -> str:
        return self.job_uuid if len(self.job_uuid) <= 20 else self.job_uuid[:8] + "…"

    @property
    def n_epochs(self) -> int | None:
        if self.total_steps and self.steps_per_epoch:
            return max(1, math.ceil(self.total_steps / self.steps_per_epoch))
        return None

    def apply(self, event: dict[str, Any]) -> list[str]:
        """Take in one event; return the lines worth keeping above the progress bars."""
        kind, data = event.get("type"), event.get("data") or {}
        lines: list[str] = []
        if kind == "end":
            self.status, self.ended = data.get("status", self.status), True
        elif kind == "state":
            previous, self.status = self.status, data.get("status", self.status)
            if data.get("message"):
                self.failure = f"{data.get('code') or 'error'}: {data['message']}"
            if data.get("reason"):
                self.reason = str(data["reason"])
            if self.status not in TERMINAL and (self.status != previous or data.get("reason")):
                lines.append(describe(event))
        elif kind == "started":
            self.total_steps = data.get("total_steps") or self.total_steps
            lines.append(describe(event))
        elif kind == "metric":
            self.step = int(data.get("step", self.step))
            epoch = data.get("epoch")
            if isinstance(epoch, int):
                if self.epoch == 1 and epoch == 2 and self.steps_per_epoch is None:
                    self.steps_per_epoch = self._last_step_of_epoch
                self.epoch = epoch
                self._last_step_of_epoch = self.step
            self.total_steps = data.get("total_steps") or self.total_steps
            self.loss = data.get("loss", self.loss)
            if isinstance(data.get("tokens_per_s"), (int, float)):
                self._speeds.append(float(data["tokens_per_s"]))
                self.tokens_per_s = sum(self._speeds) / len(self._speeds)  # steady over the last few steps
            at = _timestamp(event.get("created_at"))
            if at is not None:
                self._samples.append((at, self.step))
                while self._samples and self._samples[0][0] < at - self.RATE_WINDOW_S:
                    self._samples.popleft()
        elif kind == "checkpoint":
            self.checkpoints += 1
            epoch = data.get("epoch")
            if epoch == 1 and data.get("step") and self.steps_per_epoch is None:
                self.steps_per_epoch = int(data["step"])
            self.checkpoint_train_loss = data.get("train_loss")
            self.validation_loss = data.get("validation_loss")
            self.perplexity = data.get("perplexity")
            lines.append(describe(event))
        elif kind == "log" and data.get("level") in ("warning", "error", "critical"):
            lines.append(describe(event))
        return [f"{self.job_uuid}  {line}" for line in lines]

    def eta_seconds(self) -> float | None:
        if self.status != "in_progress" or not self.total_steps or len(self._samples) < 2:
            return None
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 1.0 or s1 <= s0:
            return None
        return max(0.0, (self.total_steps - self.step) / ((s1 - s0) / (t1 - t0)))

    def info(self) -> str:
        parts = []
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch}" + (f"/{self.n_epochs}" if self.n_epochs else ""))
        if self.total_steps or self.step:
            parts.append(f"step {self.step}/{self.total_steps or '?'}")
        if self.tokens_per_s is not None and self.status == "in_progress":
            parts.append(f"{self.tokens_per_s:,.0f} tok/s")
        eta = self.eta_seconds()
        if eta is not None:
            parts.append(f"ETA {_duration(eta)}")
        if self.loss is not None:
            parts.append(f"loss {fmt_float(self.loss)}")
        if self.validation_loss is not None:
            parts.append(f"val {fmt_float(self.validation_loss)}")
        if not parts and self.status == "scheduled":
            parts.append("waiting for a worker")
        return " · ".join(parts)

    def summary(self) -> str:
        head = f"{self.job_uuid}  {self.status}"
        if self.status == "failed":
            return f"{head}: {self.failure or 'no error message'}"
        if self.status == "cancelled":
            detail = self.reason or "cancelled"
            return f"{head} ({detail}) after step {self.step}" + (f"/{self.total_steps}" if self.total_steps else "")
        facts = [f"{self.checkpoints} checkpoint(s)", f"{self.step} steps"]
        if self.checkpoint_train_loss is not None:
            facts.append(f"train loss {fmt_float(self.checkpoint_train_loss)}")
        if self.validation_loss is not None:
            facts.append(f"validation loss {fmt_float(self.validation_loss)}")
        if self.perplexity is not None:
            facts.append(f"perplexity {fmt_float(self.perplexity, 3)}")
        return f"{head}: " + ", ".join(facts)


def _follow(url: str, api_key: str | None, job_uuid: str, poll: bool, sink: queue.Queue) -> None:
    from posttrain.remote.http import Client

    try:
        with Client.from_options(url, api_key) as api:
            for event in api.follow_events(job_uuid, stream=not poll):
                sink.put((job_uuid, event))
    except Exception as exc:  # noqa: BLE001 - handed to the main thread, which reports it
        sink.put((job_uuid, exc))


def watch_jobs(api, job_uuids: list[str], *, poll: bool = False) -> int:  # noqa: ANN001
    """Follow the jobs to their end with a progress bar each; 0 when all completed, else 1."""
    views: dict[str, JobView] = {}
    for job_uuid in dict.fromkeys(job_uuids):
        views[job_uuid] = JobView(job_uuid, api.get("/v1/post-training/job/status", job_uuid=job_uuid)["status"])
    sink: queue.Queue = queue.Queue()
    progress = Progress(
        TextColumn("{task.description}"),
        TextColumn("{task.fields[status]:<11}"),
        BarColumn(bar_width=24),
        TextColumn("{task.fields[info]}"),
        console=out,
        refresh_per_second=4,
    )
    tasks = {j: progress.add_task(v.label, total=None, status=v.status, info=v.info()) for j, v in views.items()}
    for job_uuid in views:
        threading.Thread(target=_follow, args=(api.base_url, api.api_key, job_uuid, poll, sink), daemon=True,
                         name=f"watch-{job_uuid}").start()
    errors: dict[str, Exception] = {}
    with progress:
        while not all(v.ended or j in errors for j, v in views.items()):
            try:
                job_uuid, item = sink.get(timeout=0.25)
            except queue.Empty:
                for j, v in views.items():
                    progress.update(tasks[j], info=v.info())
                continue
            view = views[job_uuid]
            if isinstance(item, Exception):
                errors[job_uuid] = item
                progress.console.print(f"{job_uuid}  stopped following: {item}", markup=False, highlight=False)
                continue
            for line in view.apply(item):
                progress.console.print(line, markup=False, highlight=False)
            done = view.step if view.status != "completed" else (view.total_steps or view.step)
            progress.update(tasks[job_uuid], total=view.total_steps, completed=done, status=view.status,
                            info=view.info())
    for job_uuid, view in views.items():
        if job_uuid in errors:
            _say(f"{job_uuid}  unknown: {type(errors[job_uuid]).__name__}: {errors[job_uuid]}")
        else:
            _say(view.summary())
    return 0 if all(v.status == "completed" and j not in errors for j, v in views.items()) else 1


def _watch_or_exit(api, job_uuids: list[str], poll: bool) -> None:  # noqa: ANN001
    try:
        code = watch_jobs(api, job_uuids, poll=poll)
    except KeyboardInterrupt:
        _say("stopped watching; the job(s) keep running")
        raise typer.Exit(130) from None
    raise typer.Exit(code)


# -- commands -----------------------------------------------------------------------------------


@app.command()
def submit(
    ctx: typer.Context,
    config: Annotated[str, typer.Argument(metavar="CONFIG", help="YAML or JSON request body ('-': standard input).")],
    job_uuid: Annotated[Optional[str], typer.Option(help="Set the job_uuid (default: the file's, else a new uuid4).",
                                                    show_default=False)] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Watch the job to its end (exit 1 unless completed).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the endpoint and the body; send nothing.")] = False,
    poll: Annotated[bool, typer.Option("--poll", help="With --watch: poll event pages instead of streaming.")] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Submit a job from a config file in the API's request shape; prints its job_uuid.

    A body with 'finetuned_model' goes to preference-optimize, any other to supervised-fine-tune.
    'hyperparam_search_config' and 'logger_config' default to {} when the file leaves them out.
    """
    body = load_config(config)
    if job_uuid:
        body["job_uuid"] = job_uuid
    elif not body.get("job_uuid"):
        body["job_uuid"] = str(uuid.uuid4())
    body.setdefault("hyperparam_search_config", {})
    body.setdefault("logger_config", {})
    path = f"/v1/post-training/{method_of(body)}"
    if dry_run:
        _say(f"POST {path}")
        print_json(body)
        return
    with client(ctx, url, api_key) as api:
        created = api.post(path, body)
        _say(created.get("job_uuid", body["job_uuid"]) if isinstance(created, dict) else body["job_uuid"])
        if watch:
            _watch_or_exit(api, [body["job_uuid"]], poll)


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
    status: Annotated[Optional[str], typer.Option(help="Only jobs with this status.", show_default=False)] = None,
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
        _say("no jobs")
        return
    rows = [_table_row(r) for r in rows]
    present = [k for k in LIST_COLUMNS if any(r.get(k) is not None for r in rows)]
    table = Table("job_uuid", "status", *present, box=None, header_style="bold", pad_edge=False)
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
            _, events = api.all_events(job_uuid)
        except ApiError:
            events = []  # a server without the events extension
    view = JobView(job_uuid, answer["status"])
    for event in events:
        view.apply(event)
    view.status = answer["status"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("job", answer["job_uuid"])
    grid.add_row("status", answer["status"])
    for key in ("scheduled_at", "started_at", "completed_at"):
        if answer.get(key):
            grid.add_row(key.removesuffix("_at"), fmt_time(answer[key]))
    resources = answer.get("resources_allocated") or {}
    if resources:
        dtype = str(resources.get("dtype", "?"))
        if resources.get("requested_dtype") and resources["requested_dtype"] != dtype:
            dtype += f" (requested {resources['requested_dtype']})"
        grid.add_row("resources", f"{resources.get('device', '?')}, {dtype}, {resources.get('threads', '?')} threads, "
                                  f"{_count(resources.get('trainable_parameters'))} of "
                                  f"{_count(resources.get('parameters'))} parameters trained"
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
        _watch_or_exit(api, job_uuids, poll)


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
            _say(f"{job_uuid}  {now}")


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
        _say(f"{job_uuid} has no checkpoints yet")
        return
    out.print(_checkpoint_table(checkpoints))


@app.command()
def logs(
    ctx: typer.Context,
    job_uuid: JobArgument,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing events until the job ends.")] = False,
    types: Annotated[Optional[list[str]], typer.Option(
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
            _say(log_line(event))

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
