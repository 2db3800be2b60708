"""The job state machine, declared once as data.

Five statuses are the ones the Llama Stack spec lets a client parse; two more, ``pausing`` and
``paused``, hold a job the user paused (its trainer writing a resume point, then no process at
all until it is resumed). The Llama Stack door shows those two as spec statuses
(``services/job_views.py`` ``llama_stack_status``). Why a job is where it is (worker lost,
cancelled by the user, bad row) is kept beside the status as a reason code, never as an extra
status.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from posttrain.domain.recipes import JobKind, JobPlan

__all__ = [
    "LEASED_STATUSES",
    "TERMINAL",
    "TRANSITIONS",
    "Checkpoint",
    "Job",
    "JobEvent",
    "JobKind",
    "JobPlan",
    "JobStatus",
    "TrainingMetrics",
    "sources_of",
]


class JobStatus(str, enum.Enum):
    SCHEDULED = "scheduled"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSING = "pausing"  # the user paused it while it ran: its trainer is writing a resume point
    PAUSED = "paused"  # no process, not claimed, not reaped, until the user resumes it


TERMINAL: frozenset[JobStatus] = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})

#: Every allowed move. IN_PROGRESS -> SCHEDULED is the requeue of a job whose worker was lost;
#: PAUSED -> SCHEDULED is the user's resume. A pausing job still has its trainer, which may
#: finish, fail or be lost before it has paused.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.SCHEDULED: frozenset({JobStatus.IN_PROGRESS, JobStatus.CANCELLED, JobStatus.PAUSED}),
    JobStatus.IN_PROGRESS: frozenset(
        {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.SCHEDULED, JobStatus.PAUSING}
    ),
    JobStatus.PAUSING: frozenset(
        {JobStatus.PAUSED, JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    JobStatus.PAUSED: frozenset({JobStatus.SCHEDULED, JobStatus.CANCELLED}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def sources_of(target: JobStatus) -> frozenset[JobStatus]:
    """The statuses a job may be in for a move to ``target`` to be legal."""
    return frozenset(src for src, targets in TRANSITIONS.items() if target in targets)


class Move(str, enum.Enum):
    """The table's moves by name, so each write in the store says which one it makes. A move
    ends in one status and starts from the statuses the table lets reach it, narrowed by
    ``MOVE_SOURCES`` where two moves end in the same status (a requeue and a resume both end in
    ``scheduled``, but only a resume starts from ``paused``)."""

    CLAIM = "claim"  # a launcher takes a scheduled job under its lease
    COMPLETE = "complete"  # the trainer finished
    FAIL = "fail"  # the trainer failed, or the job ran out of attempts
    CANCEL = "cancel"  # the user's word, final whether the job was queued, running or paused
    REQUEUE = "requeue"  # back to the queue: the trainer or its worker was lost, or the worker stopped
    PAUSE = "pause"  # the user pauses a running job: its trainer is told to write a resume point and stop
    HOLD = "hold"  # the user pauses a queued job: nothing runs, so it is paused at once
    PARK = "park"  # a pausing job's trainer has stopped (paused, or lost): it now holds nothing
    RESUME = "resume"  # the user resumes a paused job: back to the queue, to continue where it stopped

    @property
    def target(self) -> JobStatus:
        return MOVE_TARGETS[self]

    @property
    def sources(self) -> frozenset[JobStatus]:
        return sources_of(self.target) & MOVE_SOURCES.get(self, frozenset(JobStatus))


MOVE_TARGETS: dict[Move, JobStatus] = {
    Move.CLAIM: JobStatus.IN_PROGRESS,
    Move.COMPLETE: JobStatus.COMPLETED,
    Move.FAIL: JobStatus.FAILED,
    Move.CANCEL: JobStatus.CANCELLED,
    Move.REQUEUE: JobStatus.SCHEDULED,
    Move.PAUSE: JobStatus.PAUSING,
    Move.HOLD: JobStatus.PAUSED,
    Move.PARK: JobStatus.PAUSED,
    Move.RESUME: JobStatus.SCHEDULED,
}

#: Where two moves share a target, where each may start.
MOVE_SOURCES: dict[Move, frozenset[JobStatus]] = {
    Move.REQUEUE: frozenset({JobStatus.IN_PROGRESS}),
    Move.RESUME: frozenset({JobStatus.PAUSED}),
    Move.HOLD: frozenset({JobStatus.SCHEDULED}),
    Move.PARK: frozenset({JobStatus.PAUSING}),
}

#: The status a claim moves to, where a launcher's lease begins.
LEASED: JobStatus = MOVE_TARGETS[Move.CLAIM]

#: The statuses in which a launcher's lease means anything: running, or running until its trainer
#: has paused. Every write a launcher makes (lease renewal, resources, checkpoints, the trainer's
#: events) needs the job still in one of them under that launcher's (owner, attempt).
LEASED_STATUSES: frozenset[JobStatus] = frozenset({LEASED, JobStatus.PAUSING})


@dataclass(frozen=True)
class TrainingMetrics:
    epoch: int
    train_loss: float
    validation_loss: float
    perplexity: float


@dataclass(frozen=True)
class Checkpoint:
    identifier: str
    job_uuid: str
    epoch: int
    step: int
    path: str
    created_at: datetime
    metrics: TrainingMetrics | None = None


@dataclass(frozen=True)
class Job:
    """A training job. ``request`` is the body as the client sent it; ``plan`` is what the
    service resolved from it at submit time (the typed recipe, the model folder, the job's own
    copy of its rows, the output folder) and is all a launcher needs.

    ``job_uuid`` is the client's name for the job, unique within its tenant; ``id`` is the
    service's own key (events, checkpoints, the launcher's lease and the job's folder use it)."""

    id: str
    job_uuid: str
    kind: JobKind
    tenant: str
    status: JobStatus
    request: dict[str, Any]
    #: None when the job was read without its payload (``with_payload=False``).
    plan: JobPlan | None
    scheduled_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    attempt: int = 0
    max_attempts: int = 1
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    cancel_requested: bool = False
    error_code: str | None = None
    error_message: str | None = None
    resources: dict[str, Any] = field(default_factory=dict)
    checkpoints: tuple[Checkpoint, ...] = ()
    #: A hyperparameter search's trial: the search's ``id`` (docs/hyperparameter-search.md).
    parent_job_id: str | None = None
    #: On a search: its ``SearchConfig`` as JSON; on a trial: ``{"trial": n, "params": {...}}``.
    search: dict[str, Any] | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's append-only log: a state change, a metric, a checkpoint, a log line."""

    seq: int
    job_id: str
    created_at: datetime
    type: str
    data: dict[str, Any]
