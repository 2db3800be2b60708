"""Jobs, their checkpoints and their event log.

Every state change is one ``UPDATE … WHERE status IN (allowed sources)``: when no row changes the
move was illegal (or someone else made it first) and the caller learns so. Launcher writes are
also guarded by the lease (owner + attempt), so a launcher that lost its job — requeued, claimed
again, cancelled — can no longer change it.

The API side finds a job by (tenant, job_uuid), the client's name for it; everything after the
submit (scheduler, launcher, events, checkpoints) uses the service's own key ``jobs.id``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, func, insert, select, update
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.exc import IntegrityError

from posttrain.domain.jobs import (
    TERMINAL,
    Checkpoint,
    Job,
    JobEvent,
    JobKind,
    JobStatus,
    TrainingMetrics,
    sources_of,
)
from posttrain.domain.recipes import JobPlan
from posttrain.errors import DuplicateJob
from posttrain.store.tables import checkpoints, job_events, jobs


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we write is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def new_job_id() -> str:
    """The service's own key for a new job (random: it also names the job's folder)."""
    return uuid.uuid4().hex


def _checkpoint(row: RowMapping) -> Checkpoint:
    metrics = None
    if row["train_loss"] is not None and row["validation_loss"] is not None:
        metrics = TrainingMetrics(
            epoch=row["epoch"],
            train_loss=row["train_loss"],
            validation_loss=row["validation_loss"],
            perplexity=row["perplexity"],
        )
    return Checkpoint(
        identifier=row["identifier"],
        job_uuid=row["job_uuid"],
        epoch=row["epoch"],
        step=row["step"],
        path=row["path"],
        created_at=_aware(row["created_at"]),
        metrics=metrics,
    )


def _event(row: RowMapping) -> JobEvent:
    return JobEvent(seq=row["seq"], job_id=row["job_id"], created_at=_aware(row["created_at"]), type=row["type"],
                    data=row["data"])


def _job(row: RowMapping, ckpts: tuple[Checkpoint, ...] = ()) -> Job:
    return Job(
        id=row["id"],
        job_uuid=row["job_uuid"],
        kind=JobKind(row["kind"]),
        tenant=row["tenant"],
        status=JobStatus(row["status"]),
        request=row.get("request", {}),
        plan=JobPlan.model_validate(row["plan"]) if row.get("plan") is not None else None,
        scheduled_at=_aware(row["scheduled_at"]),
        started_at=_aware(row["started_at"]),
        completed_at=_aware(row["completed_at"]),
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        lease_owner=row["lease_owner"],
        lease_expires_at=_aware(row["lease_expires_at"]),
        cancel_requested=row["cancel_requested"],
        error_code=row["error_code"],
        error_message=row["error_message"],
        resources=row["resources"] or {},
        checkpoints=ckpts,
    )


class JobStore:
    """All reads and writes of jobs, checkpoints and job events."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- reads ---------------------------------------------------------------------------------

    def get(self, *, job_id: str) -> Job | None:
        """One job, by the service's key, with its checkpoints."""
        return self._one(jobs.c.id == job_id)

    def find(self, *, tenant: str, job_uuid: str, with_payload: bool = True) -> Job | None:
        """The tenant's job that the client named ``job_uuid``. ``with_payload=False`` leaves the
        request and plan JSON unread (an empty request, no plan): the status endpoint, polled hard, needs neither."""
        return self._one(and_(jobs.c.tenant == tenant, jobs.c.job_uuid == job_uuid), with_payload=with_payload)

    def _one(self, where, *, with_payload: bool = True) -> Job | None:  # noqa: ANN001
        columns = list(jobs.c) if with_payload else [c for c in jobs.c if c.name not in ("request", "plan")]
        with self.engine.connect() as conn:
            row = conn.execute(select(*columns).where(where)).mappings().first()
            if row is None:
                return None
            return _job(row, self._checkpoints(conn, row["id"]))

    def find_checkpoint(self, *, tenant: str, reference: str) -> Checkpoint | None:
        """The tenant's own checkpoint whose identifier or path is ``reference``, if any."""
        query = (select(checkpoints, jobs.c.job_uuid).join(jobs, jobs.c.id == checkpoints.c.job_id)
                 .where(jobs.c.tenant == tenant)
                 .where((checkpoints.c.identifier == reference) | (checkpoints.c.path == reference.rstrip("/")))
                 .limit(1))
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return _checkpoint(row) if row is not None else None

    def _checkpoints(self, conn: Connection, job_id: str) -> tuple[Checkpoint, ...]:
        rows = conn.execute(
            select(checkpoints, jobs.c.job_uuid).join(jobs, jobs.c.id == checkpoints.c.job_id)
            .where(checkpoints.c.job_id == job_id).order_by(checkpoints.c.epoch, checkpoints.c.step)
        ).mappings()
        return tuple(_checkpoint(r) for r in rows)

    def list(self, *, tenant: str | None = None, status: JobStatus | None = None, limit: int | None = None) -> list[Job]:
        query = select(jobs).order_by(jobs.c.scheduled_at, jobs.c.id)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        if status is not None:
            query = query.where(jobs.c.status == status.value)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [_job(r) for r in conn.execute(query).mappings()]

    def list_uuids(self, *, tenant: str | None = None) -> list[str]:
        query = select(jobs.c.job_uuid).order_by(jobs.c.scheduled_at, jobs.c.id)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def latest_event(self, *, job_id: str, type: str) -> JobEvent | None:  # noqa: A002
        query = (
            select(job_events)
            .where(job_events.c.job_id == job_id, job_events.c.type == type)
            .order_by(job_events.c.seq.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return _event(row) if row is not None else None

    def count_active(self, *, tenant: str) -> int:
        """Scheduled and running jobs of one tenant (for the queued-jobs quota)."""
        active = [JobStatus.SCHEDULED.value, JobStatus.IN_PROGRESS.value]
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.count()).select_from(jobs).where(jobs.c.tenant == tenant, jobs.c.status.in_(active))
            ).scalar_one()

    def count_by_status(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status))
            return {status: count for status, count in rows}

    def events(self, *, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        query = (
            select(job_events)
            .where(job_events.c.job_id == job_id, job_events.c.seq > after)
            .order_by(job_events.c.seq)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [_event(r) for r in conn.execute(query).mappings()]

    # -- submit and cancel (the API side) ------------------------------------------------------

    def create(
        self, *, job_id: str, job_uuid: str, tenant: str, kind: JobKind, request: dict[str, Any], plan: JobPlan,
        max_attempts: int,
    ) -> Job:
        """A new scheduled job; ``DuplicateJob`` when the tenant already has one named ``job_uuid``."""
        now = utcnow()
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(jobs).values(
                        id=job_id,
                        job_uuid=job_uuid,
                        tenant=tenant,
                        kind=kind.value,
                        status=JobStatus.SCHEDULED.value,
                        request=request,
                        plan=plan.model_dump(mode="json"),
                        scheduled_at=now,
                        attempt=0,
                        max_attempts=max_attempts,
                        cancel_requested=False,
                        resources={},
                    )
                )
                self._append(conn, job_id, "state", {"status": JobStatus.SCHEDULED.value})
        except IntegrityError as exc:
            raise DuplicateJob(f"a job with job_uuid '{job_uuid}' already exists") from exc
        job = self.get(job_id=job_id)
        assert job is not None
        return job

    def cancel(self, *, job_id: str, reason: str = "cancelled by the user") -> bool:
        """Cancel a scheduled or running job; True when this call moved it to ``cancelled``.

        A running job is marked cancelled at once (the user's word is final); its launcher sees
        that at its next lease renewal and stops the trainer.
        """
        now = utcnow()
        with self.engine.begin() as conn:
            result = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status.in_([s.value for s in sources_of(JobStatus.CANCELLED)]))
                .values(status=JobStatus.CANCELLED.value, cancel_requested=True, completed_at=now, error_message=None)
            )
            if result.rowcount == 1:
                self._append(conn, job_id, "state", {"status": JobStatus.CANCELLED.value, "reason": reason})
                return True
            return False

    # -- the scheduler and launcher side -------------------------------------------------------

    def claim_next(self, *, owner: str, lease_seconds: float) -> Job | None:
        """Atomically move the oldest scheduled job to in_progress under ``owner``'s lease.

        PostgreSQL locks the candidate row with ``FOR UPDATE SKIP LOCKED`` so concurrent
        schedulers pick different jobs; SQLite serialises writers, and the status guard in the
        UPDATE makes a lost race change nothing.
        """
        now = utcnow()
        candidate = (
            select(jobs.c.id)
            .where(jobs.c.status == JobStatus.SCHEDULED.value)
            .order_by(jobs.c.scheduled_at, jobs.c.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        with self.engine.begin() as conn:
            row = conn.execute(
                update(jobs)
                .where(jobs.c.id == candidate, jobs.c.status == JobStatus.SCHEDULED.value)
                .values(
                    status=JobStatus.IN_PROGRESS.value,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    attempt=jobs.c.attempt + 1,
                    started_at=func.coalesce(jobs.c.started_at, now),
                    cancel_requested=False,
                )
                .returning(jobs.c.id, jobs.c.attempt)
            ).first()
            if row is None:
                return None
            self._append(conn, row.id, "state", {"status": JobStatus.IN_PROGRESS.value, "attempt": row.attempt, "worker": owner})
        return self.get(job_id=row.id)

    def _lease_guard(self, job_id: str, owner: str, attempt: int):  # noqa: ANN202
        return and_(jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.attempt == attempt)

    def renew_lease(self, *, job_id: str, owner: str, attempt: int, lease_seconds: float) -> bool:
        """Extend the lease; False when the job moved on (cancelled, requeued, claimed again)."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(jobs)
                .where(self._lease_guard(job_id, owner, attempt), jobs.c.status == JobStatus.IN_PROGRESS.value)
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
            )
            return result.rowcount == 1

    def set_resources(self, *, job_id: str, owner: str, attempt: int, resources: dict[str, Any]) -> bool:
        with self.engine.begin() as conn:
            result = conn.execute(
                update(jobs)
                .where(self._lease_guard(job_id, owner, attempt), jobs.c.status == JobStatus.IN_PROGRESS.value)
                .values(resources=resources)
            )
            return result.rowcount == 1

    def finish(
        self,
        *,
        job_id: str,
        owner: str,
        attempt: int,
        status: JobStatus,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> bool:
        """Move a running job to a terminal state, if this launcher still holds it."""
        assert status in TERMINAL
        with self.engine.begin() as conn:
            result = conn.execute(
                update(jobs)
                .where(self._lease_guard(job_id, owner, attempt), jobs.c.status == JobStatus.IN_PROGRESS.value)
                .values(status=status.value, completed_at=utcnow(), error_code=error_code, error_message=error_message)
            )
            if result.rowcount != 1:
                return False
            data: dict[str, Any] = {"status": status.value}
            if error_message:
                data.update(code=error_code, message=error_message)
            self._append(conn, job_id, "state", data)
            return True

    def release(self, *, job_id: str, owner: str, attempt: int, reason: str, count_attempt: bool = True) -> JobStatus | None:
        """Give a running job back to the queue after its trainer stopped without finishing.

        The job resumes from its newest checkpoint on the next claim. With ``count_attempt`` off
        (a graceful shutdown of this worker) the attempt is not charged; otherwise a job that has
        used all its attempts is failed with the reason.
        """
        now = utcnow()
        guard = and_(self._lease_guard(job_id, owner, attempt), jobs.c.status == JobStatus.IN_PROGRESS.value)
        with self.engine.begin() as conn:
            row = conn.execute(select(jobs.c.max_attempts).where(guard)).first()
            if row is None:
                return None
            if count_attempt and attempt >= row.max_attempts:
                message = f"{reason}; no attempts left ({attempt} of {row.max_attempts} used)"
                values: dict[str, Any] = dict(status=JobStatus.FAILED.value, completed_at=now, error_code="trainer_lost", error_message=message)
                data = {"status": JobStatus.FAILED.value, "code": "trainer_lost", "message": message}
                target = JobStatus.FAILED
            else:
                values = dict(status=JobStatus.SCHEDULED.value, lease_owner=None, lease_expires_at=None)
                if not count_attempt:
                    values["attempt"] = jobs.c.attempt - 1
                data = {"status": JobStatus.SCHEDULED.value, "reason": reason}
                target = JobStatus.SCHEDULED
            if conn.execute(update(jobs).where(guard).values(**values)).rowcount != 1:
                return None
            self._append(conn, job_id, "state", data)
            return target

    def requeue_expired(self, *, now: datetime | None = None) -> list[tuple[str, JobStatus]]:
        """Requeue (or fail, when out of attempts) running jobs whose lease expired."""
        now = now or utcnow()
        moved: list[tuple[str, JobStatus]] = []
        with self.engine.connect() as conn:
            expired = conn.execute(
                select(jobs.c.id, jobs.c.attempt, jobs.c.max_attempts, jobs.c.lease_owner).where(
                    jobs.c.status == JobStatus.IN_PROGRESS.value, jobs.c.lease_expires_at < now
                )
            ).all()
        for job_id, attempt, max_attempts, owner in expired:
            guard = and_(
                jobs.c.id == job_id,
                jobs.c.status == JobStatus.IN_PROGRESS.value,
                jobs.c.attempt == attempt,
                jobs.c.lease_expires_at < now,
            )
            with self.engine.begin() as conn:
                if attempt < max_attempts:
                    values: dict[str, Any] = dict(status=JobStatus.SCHEDULED.value, lease_owner=None, lease_expires_at=None)
                    target = JobStatus.SCHEDULED
                    data = {"status": target.value, "reason": "worker_lost", "lost_worker": owner, "attempt": attempt}
                else:
                    message = f"the worker running this job was lost {attempt} time(s); no attempts left"
                    values = dict(status=JobStatus.FAILED.value, completed_at=now, error_code="worker_lost", error_message=message)
                    target = JobStatus.FAILED
                    data = {"status": target.value, "code": "worker_lost", "message": message}
                if conn.execute(update(jobs).where(guard).values(**values)).rowcount == 1:
                    self._append(conn, job_id, "state", data)
                    moved.append((job_id, target))
        return moved

    def record_checkpoint(
        self,
        *,
        job_id: str,
        owner: str,
        attempt: int,
        identifier: str,
        epoch: int,
        step: int,
        path: str,
        train_loss: float | None,
        validation_loss: float | None,
        perplexity: float | None,
    ) -> bool:
        """Record a checkpoint that is complete on disk; idempotent per identifier."""
        with self.engine.begin() as conn:
            holder = conn.execute(select(jobs.c.id).where(self._lease_guard(job_id, owner, attempt))).first()
            if holder is None:
                return False
            exists = conn.execute(
                select(checkpoints.c.id).where(checkpoints.c.job_id == job_id, checkpoints.c.identifier == identifier)
            ).first()
            if exists is not None:
                return True
            conn.execute(
                insert(checkpoints).values(
                    job_id=job_id,
                    identifier=identifier,
                    epoch=epoch,
                    step=step,
                    path=path,
                    created_at=utcnow(),
                    train_loss=train_loss,
                    validation_loss=validation_loss,
                    perplexity=perplexity,
                )
            )
            self._append(
                conn,
                job_id,
                "checkpoint",
                {"identifier": identifier, "epoch": epoch, "step": step, "path": path,
                 "train_loss": train_loss, "validation_loss": validation_loss, "perplexity": perplexity},
            )
            return True

    def append_event(self, *, job_id: str, type: str, data: dict[str, Any]) -> None:  # noqa: A002
        with self.engine.begin() as conn:
            self._append(conn, job_id, type, data)

    def append_events(self, *, job_id: str, events: list[tuple[str, dict[str, Any]]]) -> None:
        if not events:
            return
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(insert(job_events), [dict(job_id=job_id, created_at=now, type=t, data=d) for t, d in events])

    @staticmethod
    def _append(conn: Connection, job_id: str, type_: str, data: dict[str, Any]) -> None:
        conn.execute(insert(job_events).values(job_id=job_id, created_at=utcnow(), type=type_, data=data))
