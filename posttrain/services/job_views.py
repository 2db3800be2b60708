"""Read-only views of jobs for the dashboard: one summary per job with its latest progress.

A job's progress (step, total steps, epoch, the last step's loss) lives in its event log, which
only grows. ``JobViews`` remembers, per job, the last event it has read and the progress seen
so far, so refreshing the jobs table reads only the events appended since the last refresh.
The memory is per process and rebuilt from the store, so several API servers agree. It reads
jobs only through ``JobService``, never its store.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from posttrain.domain.jobs import Job, JobKind, JobStatus
from posttrain.services.jobs import JobService

EVENT_PAGE = 1000
SETTLE = timedelta(minutes=2)

#: The statuses the Llama Stack spec's ``JobStatus`` has.
LlamaStackStatus = Literal["completed", "in_progress", "failed", "scheduled", "cancelled"]

#: How a job shows on the Llama Stack door, which has no word for a pause: a pausing job still
#: trains (its trainer is writing its resume point), so it is ``in_progress``; a paused one waits
#: to be trained again, as a queued job does, so it is ``scheduled``. Our own endpoints, the CLI
#: and the dashboard show the real status.
_LLAMA_STACK_STATUS: dict[JobStatus, LlamaStackStatus] = {
    JobStatus.SCHEDULED: "scheduled",
    JobStatus.IN_PROGRESS: "in_progress",
    JobStatus.COMPLETED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.PAUSING: "in_progress",
    JobStatus.PAUSED: "scheduled",
}


def llama_stack_status(status: JobStatus) -> LlamaStackStatus:
    """The one mapping from a job's status to the Llama Stack spec's five (see ``_LLAMA_STACK_STATUS``)."""
    return _LLAMA_STACK_STATUS[status]


@dataclass(frozen=True)
class Progress:
    """The latest training progress a job has reported."""

    step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    loss: float | None = None  # the last step's loss (an epoch's mean is on its checkpoint)
    checkpoints: int = 0


@dataclass(frozen=True)
class JobSummary:
    job_uuid: str
    status: str
    kind: str
    method: str
    model: str | None
    scheduled_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    attempt: int
    progress: Progress
    error_code: str | None
    error_message: str | None


def method_of(job: Job) -> str:
    """``LoRA`` or ``full`` for a fine-tune, ``DPO`` for preference optimisation, ``GRPO`` for
    reinforcement."""
    if job.kind is JobKind.DPO:
        return "DPO"
    if job.kind is JobKind.GRPO:
        return "GRPO"
    recipe = job.plan.recipe if job.plan is not None else None
    if recipe is None:
        return "?"
    return "LoRA" if recipe.adapter is not None else "QAT" if recipe.qat is not None else "full"


def model_of(job: Job) -> str | None:
    """The model as the client named it."""
    name = job.request.get("finetuned_model" if job.kind is JobKind.DPO else "model")
    if name is not None:
        return str(name)
    return job.plan.model if job.plan is not None else None


def _progress(previous: Progress, event_type: str, data: dict[str, Any]) -> Progress:
    if event_type == "metric":
        return Progress(
            step=data.get("step", previous.step),
            total_steps=data.get("total_steps", previous.total_steps),
            epoch=data.get("epoch", previous.epoch),
            loss=data.get("loss", previous.loss),
            checkpoints=previous.checkpoints,
        )
    if event_type == "started" and data.get("total_steps") is not None:
        return replace(previous, total_steps=data["total_steps"])
    if event_type == "checkpoint":  # recorded once per checkpoint, even when a resumed job re-sends it
        return replace(previous, checkpoints=previous.checkpoints + 1)
    return previous


def _settled(job: Job) -> bool:
    """Ended long enough ago that no late event (a trainer's last buffered metrics) can follow."""
    if not job.is_terminal or job.completed_at is None:
        return False
    return datetime.now(UTC) - job.completed_at > SETTLE


class JobViews:
    """Job summaries for one tenant, newest first, each with its latest progress."""

    def __init__(self, *, jobs: JobService) -> None:
        self.jobs = jobs
        self._seen: dict[str, tuple[int, Progress, bool]] = {}  # job id -> (cursor, progress, read while terminal)
        self._lock = threading.Lock()

    def find(self, *, tenant: str, job_uuid: str) -> Job | None:
        """The job, or None when the tenant has no job with this id."""
        return self.jobs.find(tenant=tenant, job_uuid=job_uuid)

    def summaries(self, *, tenant: str, limit: int = 200) -> list[JobSummary]:
        listed = self.jobs.list_jobs(tenant=tenant)
        newest = sorted(listed, key=lambda j: (j.scheduled_at, j.job_uuid), reverse=True)[:limit]
        return [self.summary(job) for job in newest]

    def summary(self, job: Job) -> JobSummary:
        return JobSummary(
            job_uuid=job.job_uuid,
            status=job.status.value,
            kind=job.kind.value,
            method=method_of(job),
            model=model_of(job),
            scheduled_at=job.scheduled_at,
            started_at=job.started_at,
            completed_at=job.completed_at,
            attempt=job.attempt,
            progress=self.progress(job),
            error_code=job.error_code,
            error_message=job.error_message,
        )

    def progress(self, job: Job) -> Progress:
        with self._lock:
            cursor, progress, final = self._seen.get(job.id, (0, Progress(), False))
        if final:
            return progress
        while True:
            events = self.jobs.events(job, after=cursor, limit=EVENT_PAGE)
            for event in events:
                progress = _progress(progress, event.type, event.data)
            if events:
                cursor = events[-1].seq
            if len(events) < EVENT_PAGE:
                break
        with self._lock:
            known = self._seen.get(job.id)
            if known is None or known[0] <= cursor:
                self._seen[job.id] = (cursor, progress, _settled(job))
        return progress
