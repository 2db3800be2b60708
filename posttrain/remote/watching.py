"""Following jobs from the shell: one readable line per event, and a live progress bar per job
(epoch, step of total, tokens/s, ETA, latest train and validation loss) fed by the events stream."""

from __future__ import annotations

import json
import math
import queue
import threading
from collections import deque
from datetime import datetime
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn

from posttrain.remote.common import fmt_float, fmt_time, out

TERMINAL = ("completed", "failed", "cancelled")


def say(text: str) -> None:
    out.out(text, highlight=False)


def count_label(value: Any) -> str:
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
                f"{count_label(r.get('parameters'))} parameters ({count_label(r.get('trainable_parameters'))} trainable), "
                f"{data.get('total_steps', '?')} steps")
        return text + (f", resumed from {data['resumed_from']}" if data.get("resumed_from") else "")
    if kind == "metric":
        lr = data.get("lr")
        return (f"epoch {data.get('epoch', '?')} step {data.get('step', '?')}/{data.get('total_steps', '?')} "
                f"loss {fmt_float(data.get('loss'))} lr {f'{lr:.2e}' if isinstance(lr, (int, float)) else '-'} "
                f"{fmt_float(data.get('tokens_per_s'), 0)} tok/s" + _reward_text(data))
    if kind == "checkpoint":
        return (f"checkpoint epoch {data.get('epoch', '?')}: train loss {fmt_float(data.get('train_loss'))}, "
                f"validation loss {fmt_float(data.get('validation_loss'))}, "
                f"perplexity {fmt_float(data.get('perplexity'), 3)} -> {data.get('path', '?')}")
    if kind == "log":
        return f"[{data.get('level', 'info')}] {data.get('message', '')}"
    return json.dumps(data, ensure_ascii=False, default=str)


#: A GRPO step's numbers the live line shows, and their labels there.
REWARD_FIELDS = (("reward_mean", "reward"), ("kl", "kl"), ("valid_reward_mean", "val reward"))


def _reward_text(data: dict[str, Any]) -> str:
    """A GRPO step's reward numbers (mean, KL, validation reward), or "" for a step without them."""
    parts = [f"{label} {fmt_float(data[key])}" for key, label in REWARD_FIELDS if isinstance(data.get(key), (int, float))]
    return (" " + " ".join(parts)) if parts else ""


def log_line(event: dict[str, Any]) -> str:
    return f"{fmt_time(event.get('created_at'))}  {event.get('type', '?'):<10}  {describe(event)}"


# -- watching -----------------------------------------------------------------------------------


def _timestamp(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _duration(seconds: float) -> str:
    seconds = round(seconds)
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
        #: A GRPO job's latest reward numbers (reward_mean, kl, valid_reward_mean), by REWARD_FIELDS key.
        self.rewards: dict[str, float] = {}
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
            self.rewards |= {key: float(data[key]) for key, _ in REWARD_FIELDS
                             if isinstance(data.get(key), (int, float))}
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
        parts += [f"{label} {fmt_float(self.rewards[key])}" for key, label in REWARD_FIELDS if key in self.rewards]
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
        facts += [f"{label} {fmt_float(self.rewards[key])}" for key, label in REWARD_FIELDS if key in self.rewards]
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
            say(f"{job_uuid}  unknown: {type(errors[job_uuid]).__name__}: {errors[job_uuid]}")
        else:
            say(view.summary())
    return 0 if all(v.status == "completed" and j not in errors for j, v in views.items()) else 1


def watch_or_exit(api, job_uuids: list[str], poll: bool) -> None:  # noqa: ANN001
    try:
        code = watch_jobs(api, job_uuids, poll=poll)
    except KeyboardInterrupt:
        say("stopped watching; the job(s) keep running")
        raise typer.Exit(130) from None
    raise typer.Exit(code)
