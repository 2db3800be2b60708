"""Jobs, their checkpoints and their event log.

Every state change is a named ``Move`` of the table in ``posttrain.domain.jobs``, made by
``JobStore._transition`` as one ``UPDATE … WHERE status IN (the move's sources in the table)``:
when no row changes the move was illegal (or someone else made it first) and the caller gets a
``TransitionRefused`` carrying the job's status. Launcher writes are also guarded by the lease
(owner + attempt, with the job still in progress or pausing), and a launcher that lost its job — requeued,
claimed again, cancelled — gets ``LeaseLost`` and changes nothing: not the job, not its
checkpoints, not its event log.

The API side finds a job by (tenant, job_uuid), the client's name for it; everything after the
submit (scheduler, launcher, events, checkpoints) uses the service's own key ``jobs.id``.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, overload

from sqlalchemy import (
    ColumnElement,
    Engine,
    Insert,
    Table,
    Update,
    and_,
    delete,
    exists,
    func,
    insert,
    literal,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.exc import IntegrityError

from posttrain.domain.jobs import (
    LEASED_STATUSES,
    TERMINAL,
    Checkpoint,
    Job,
    JobEvent,
    JobKind,
    JobStatus,
    Move,
    TrainingMetrics,
)
from posttrain.domain.protocol import FailureCode
from posttrain.domain.recipes import JobPlan
from posttrain.errors import DuplicateJob, LeaseLost, TransitionRefused
from posttrain.store.tables import checkpoints, job_events, jobs


class QuotaFull(Exception):
    """The tenant already has as many scheduled or running jobs as its quota allows (the
    service turns this into its 429)."""

    def __init__(self, quota: int) -> None:
        super().__init__(f"quota of {quota} active job(s) reached")
        self.quota = quota


def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def _aware(value: datetime) -> datetime: ...
@overload
def _aware(value: None) -> None: ...
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
        parent_job_id=row.get("parent_job_id"),
        search=row.get("search"),
    )


#: The most checkpoints a job is read with when the store is not told otherwise (the bound of
#: ``POSTTRAIN_MAX_CHECKPOINTS_PER_JOB``).
MAX_LISTED_CHECKPOINTS = 1000


class JobStore:
    """All reads and writes of jobs, checkpoints and job events.

    A job is read with at most its newest ``listed_checkpoints`` checkpoints (one ``LIMIT``), so a
    status poll or an event stream costs the same whatever a job recorded; ``record_checkpoint``
    with ``keep`` also deletes the rows beyond the newest ``keep``, as the trainer deletes their
    folders."""

    def __init__(self, engine: Engine, *, listed_checkpoints: int = MAX_LISTED_CHECKPOINTS) -> None:
        self.engine = engine
        self.listed_checkpoints = listed_checkpoints

    # -- reads ---------------------------------------------------------------------------------

    def get(self, *, job_id: str) -> Job | None:
        """One job, by the service's key, with its checkpoints."""
        return self._one(jobs.c.id == job_id)

    def find(self, *, tenant: str, job_uuid: str, with_payload: bool = True, with_checkpoints: bool = True) -> Job | None:
        """The tenant's job that the client named ``job_uuid``. ``with_payload=False`` leaves the
        request and plan JSON unread (an empty request, no plan): the status endpoint, polled hard, needs neither.
        ``with_checkpoints=False`` reads none of its checkpoints (an event stream's poll needs only the status)."""
        return self._one(and_(jobs.c.tenant == tenant, jobs.c.job_uuid == job_uuid), with_payload=with_payload,
                         with_checkpoints=with_checkpoints)

    def _one(self, where: ColumnElement[bool], *, with_payload: bool = True, with_checkpoints: bool = True) -> Job | None:
        columns = list(jobs.c) if with_payload else [c for c in jobs.c if c.name not in ("request", "plan")]
        with self.engine.connect() as conn:
            row = conn.execute(select(*columns).where(where)).mappings().first()
            if row is None:
                return None
            return _job(row, self._checkpoints(conn, row["id"]) if with_checkpoints else ())

    def find_checkpoint(self, *, tenant: str, reference: str) -> Checkpoint | None:
        """The tenant's own checkpoint whose identifier or path is ``reference``, if any."""
        query = (select(checkpoints, jobs.c.job_uuid).join(jobs, jobs.c.id == checkpoints.c.job_id)
                 .where(jobs.c.tenant == tenant, checkpoints.c.deleted_at.is_(None))
                 .where((checkpoints.c.identifier == reference) | (checkpoints.c.path == reference.rstrip("/")))
                 .limit(1))
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return _checkpoint(row) if row is not None else None

    def _checkpoints(self, conn: Connection, job_id: str) -> tuple[Checkpoint, ...]:
        """The job's newest ``listed_checkpoints`` checkpoints, oldest first (none the user deleted)."""
        rows = conn.execute(
            select(checkpoints, jobs.c.job_uuid).join(jobs, jobs.c.id == checkpoints.c.job_id)
            .where(checkpoints.c.job_id == job_id, checkpoints.c.deleted_at.is_(None))
            .order_by(checkpoints.c.epoch.desc(), checkpoints.c.step.desc(), checkpoints.c.id.desc())
            .limit(self.listed_checkpoints)
        ).mappings()
        return tuple(reversed([_checkpoint(r) for r in rows]))

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

    def list_newest(self, *, tenant: str, limit: int, after_uuid: str | None = None,
                    request_object: Sequence[str] = (), request_matches: Mapping[str, str] | None = None,
                    ) -> builtins.list[Job] | None:
        """Up to ``limit`` of the tenant's jobs, newest first (``scheduled_at``, then ``id``,
        descending), starting after the job the client named ``after_uuid``; ``None`` when the tenant
        has no such job. ``request_matches`` keeps the jobs whose request holds, in the JSON object at
        ``request_object``, each of its keys with exactly its (string) value.

        One keyset query on the index ``(tenant, scheduled_at, id)`` with ``LIMIT``, the filter
        applied in SQL, so a page costs the same however many jobs the tenant has."""
        query = select(jobs).where(jobs.c.tenant == tenant)
        with self.engine.connect() as conn:
            if after_uuid is not None:
                cursor = conn.execute(select(jobs.c.scheduled_at, jobs.c.id)
                                      .where(jobs.c.tenant == tenant, jobs.c.job_uuid == after_uuid)).first()
                if cursor is None:
                    return None
                query = query.where(tuple_(jobs.c.scheduled_at, jobs.c.id) < tuple_(cursor[0], cursor[1]))
            for key, value in (request_matches or {}).items():
                query = query.where(_json_holds(conn.dialect.name, request_object, key, value))
            query = query.order_by(jobs.c.scheduled_at.desc(), jobs.c.id.desc()).limit(limit)
            return [_job(r) for r in conn.execute(query).mappings()]

    def list_uuids(self, *, tenant: str | None = None) -> builtins.list[str]:
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

    def trials(self, *, parent_job_id: str) -> builtins.list[Job]:
        """A search's trials (its child jobs), oldest first, without their checkpoints."""
        query = select(jobs).where(jobs.c.parent_job_id == parent_job_id).order_by(jobs.c.scheduled_at, jobs.c.id)
        with self.engine.connect() as conn:
            return [_job(r) for r in conn.execute(query).mappings()]

    def epoch_metrics(self, *, job_ids: Sequence[str]) -> dict[str, dict[int, dict[str, Any]]]:
        """Each job's per-epoch measurements (epoch -> its checkpoint event's data), from the event
        log, which keeps every epoch even after ``keep`` deleted the older checkpoint rows."""
        found: dict[str, dict[int, dict[str, Any]]] = {job_id: {} for job_id in job_ids}
        if not job_ids:
            return found
        query = (select(job_events.c.job_id, job_events.c.data)
                 .where(job_events.c.job_id.in_(list(job_ids)), job_events.c.type == "checkpoint")
                 .order_by(job_events.c.seq))
        with self.engine.connect() as conn:
            for job_id, data in conn.execute(query):
                if isinstance(data, dict) and isinstance(data.get("epoch"), int):
                    found[job_id][data["epoch"]] = data
        return found

    def count_active(self, *, tenant: str) -> int:
        """Scheduled and running jobs of one tenant (for the queued-jobs quota)."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.count()).select_from(jobs).where(jobs.c.tenant == tenant, _in(frozenset(JobStatus) - TERMINAL))
            ).scalar_one()

    def count_by_status(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status))
            # A Result has keys(): dict(rows) would read it as a mapping of column names.
            return {status: count for status, count in rows}  # noqa: C416

    def events(self, *, job_id: str, after: int = 0, limit: int = 1000) -> builtins.list[JobEvent]:
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
        max_attempts: int, max_active: int | None = None, parent_job_id: str | None = None,
        search: dict[str, Any] | None = None,
    ) -> Job:
        """A new scheduled job; ``DuplicateJob`` when the tenant already has one named ``job_uuid``,
        ``QuotaFull`` when ``max_active`` is set and the tenant already has that many scheduled or
        running jobs.

        The quota is counted by the INSERT itself (``INSERT … SELECT … WHERE (count) < max_active``),
        so no two submits can both see room for one more. On PostgreSQL a per-tenant advisory lock,
        held to the end of the transaction, serialises one tenant's inserts (under READ COMMITTED
        two concurrent INSERTs would each count the other's row as absent); on SQLite the INSERT
        takes the single writer lock before it reads, which serialises it the same way.
        """
        now = utcnow()
        row = dict(
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
            parent_job_id=parent_job_id,
            search=search,
        )
        try:
            with self.engine.begin() as conn:
                if max_active is None:
                    conn.execute(insert(jobs).values(**row))
                else:
                    if conn.dialect.name == "postgresql":
                        conn.execute(select(func.pg_advisory_xact_lock(func.hashtext(literal(tenant)))))
                    active = (select(func.count()).select_from(jobs)
                              .where(jobs.c.tenant == tenant, _in(frozenset(JobStatus) - TERMINAL))
                              .scalar_subquery())
                    values = select(*[literal(value, type_=jobs.c[name].type).label(name)
                                      for name, value in row.items()]).where(active < max_active)
                    # RETURNING, not rowcount: psycopg reports -1 for an INSERT … SELECT here.
                    inserted = conn.execute(insert(jobs).from_select(list(row), values).returning(jobs.c.id)).first()
                    if inserted is None:
                        raise QuotaFull(max_active)
                self._append(conn, job_id, "state", {"status": JobStatus.SCHEDULED.value})
        except IntegrityError as exc:
            raise DuplicateJob(f"a job with job_uuid '{job_uuid}' already exists") from exc
        job = self.get(job_id=job_id)
        assert job is not None
        return job

    def pause(self, *, job_id: str) -> JobStatus:
        """Pause a queued or running job; the status it is now in (``TransitionRefused`` with its
        status when it is neither).

        A queued job is paused at once (``hold``): nothing runs. A running one becomes ``pausing``
        (``pause``): its launcher sees that at its next lease renewal and asks the trainer to
        write a resume point and stop, then parks the job (``paused``), freeing its slot.
        """
        with self.engine.begin() as conn:
            for move in (Move.HOLD, Move.PAUSE):  # the second covers a claim between read and write
                try:
                    self._transition(conn, move, job_id=job_id, event={"reason": "paused by the user"}, values={})
                    return move.target
                except TransitionRefused as refused:
                    status = refused.status
            needs = " or ".join(sorted(s.value for s in Move.HOLD.sources | Move.PAUSE.sources))
            raise TransitionRefused(f"job {job_id}: cannot pause it: it is {status}, and pause needs {needs}",
                                    move=Move.PAUSE.value, status=status)

    def resume(self, *, job_id: str) -> None:
        """Put a paused job back in the queue (``TransitionRefused`` with its status otherwise).
        It keeps its place (``scheduled_at``) and continues from its newest resume point."""
        with self.engine.begin() as conn:
            self._transition(conn, Move.RESUME, job_id=job_id, event={"reason": "resumed by the user"}, values={})

    def park(self, *, job_id: str, owner: str, attempt: int, reason: str, count_attempt: bool = False) -> None:
        """A pausing job's trainer has stopped: the job is ``paused``, holds no lease, and the
        attempt is not charged (``count_attempt`` charges it: the trainer was lost rather than
        paused). ``LeaseLost`` when this launcher no longer holds it (cancelled meanwhile)."""
        values: dict[str, Any] = dict(lease_owner=None, lease_expires_at=None)
        if not count_attempt:
            values["attempt"] = jobs.c.attempt - 1
        with self.engine.begin() as conn:
            self._transition(conn, Move.PARK, job_id=job_id, lease=(owner, attempt), event={"reason": reason},
                             values=values)

    def cancel(self, *, job_id: str, reason: str = "cancelled by the user") -> None:
        """Cancel a scheduled, running, pausing or paused job (``TransitionRefused`` with its
        status otherwise).

        A running job is marked cancelled at once (the user's word is final); its launcher sees
        that at its next lease renewal and stops the trainer, and nothing the trainer still
        reports is recorded.
        """
        with self.engine.begin() as conn:
            self._transition(conn, Move.CANCEL, job_id=job_id, event={"reason": reason},
                             values=dict(cancel_requested=True, completed_at=utcnow(), error_message=None))
            # A search's trials go with it, in the same transaction: none is left to train alone.
            open_trials = conn.execute(select(jobs.c.id).where(jobs.c.parent_job_id == job_id,
                                                               _in(Move.CANCEL.sources))).scalars().all()
            for trial_id in open_trials:
                try:
                    self._transition(conn, Move.CANCEL, job_id=trial_id, event={"reason": "its search was cancelled"},
                                     values=dict(cancel_requested=True, completed_at=utcnow(), error_message=None))
                except TransitionRefused:
                    continue  # it ended meanwhile

    def prune(self, *, job_id: str, reason: str) -> None:
        """Stop a search's trial that the pruner judged not worth finishing: cancelled, with the
        error code ``pruned`` and the pruner's ``reason`` (``TransitionRefused`` when it already ended)."""
        with self.engine.begin() as conn:
            self._transition(conn, Move.CANCEL, job_id=job_id, event={"reason": "pruned", "message": reason},
                             values=dict(cancel_requested=True, completed_at=utcnow(), error_code="pruned",
                                         error_message=reason))

    # -- the scheduler and launcher side -------------------------------------------------------

    def claim_next(self, *, owner: str, lease_seconds: float, searches_only: bool = False) -> Job | None:
        """Atomically move the oldest scheduled job to in_progress under ``owner``'s lease; None
        when there is none to claim. ``searches_only``: only a hyperparameter search (a parent job,
        whose driver takes no slot), for a scheduler whose slots are all busy.

        PostgreSQL locks the candidate row with ``FOR UPDATE SKIP LOCKED`` so concurrent
        schedulers pick different jobs; SQLite serialises writers, and the status guard in the
        UPDATE makes a lost race change nothing (and claim nothing: not an error here).
        """
        now = utcnow()
        wanted = [_in(Move.CLAIM.sources)]
        if searches_only:
            wanted += [jobs.c.search.is_not(None), jobs.c.parent_job_id.is_(None)]
        candidate = (
            select(jobs.c.id)
            .where(*wanted)
            .order_by(jobs.c.scheduled_at, jobs.c.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        with self.engine.begin() as conn:
            row = conn.execute(
                _move(Move.CLAIM, jobs.c.id == candidate).values(
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
            self._append(conn, row.id, "state", {"status": Move.CLAIM.target.value, "attempt": row.attempt, "worker": owner})
        return self.get(job_id=row.id)

    def renew_lease(self, *, job_id: str, owner: str, attempt: int, lease_seconds: float) -> JobStatus:
        """Extend the lease; the job's status (``pausing`` tells the launcher to pause its trainer).
        ``LeaseLost`` when the job moved on (cancelled, requeued, claimed again)."""
        with self.engine.begin() as conn:
            row = conn.execute(update(jobs).where(_held(job_id, owner, attempt))
                               .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
                               .returning(jobs.c.status)).first()
            if row is None:
                raise self._refusal(conn, None, job_id, (owner, attempt), doing="renew the lease")
            return JobStatus(row.status)

    def set_resources(self, *, job_id: str, owner: str, attempt: int, resources: dict[str, Any]) -> None:
        """What the trainer runs on, as it reported at start; ``LeaseLost`` when the job moved on."""
        with self.engine.begin() as conn:
            self._leased_update(conn, job_id, owner, attempt, "record resources", resources=resources)

    def finish(
        self,
        *,
        job_id: str,
        owner: str,
        attempt: int,
        status: JobStatus,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> None:
        """Complete or fail a running job, if this launcher still holds it (``LeaseLost`` if not)."""
        move = {JobStatus.COMPLETED: Move.COMPLETE, JobStatus.FAILED: Move.FAIL}[status]
        event = dict(code=error_code, message=error_message) if error_message else {}
        with self.engine.begin() as conn:
            self._transition(conn, move, job_id=job_id, lease=(owner, attempt), event=event,
                             values=dict(completed_at=utcnow(), error_code=error_code, error_message=error_message))

    def release(self, *, job_id: str, owner: str, attempt: int, reason: str, count_attempt: bool = True) -> JobStatus:
        """Give a running job back to the queue after its trainer stopped without finishing; the
        status it ends in (``LeaseLost`` when this launcher no longer holds it).

        The job resumes from its newest checkpoint on the next claim. With ``count_attempt`` off
        (a graceful shutdown of this worker) the attempt is not charged; otherwise a job that has
        used all its attempts is failed with the reason. A job the user was pausing is parked
        (``paused``) instead: it waits for the user's resume, not for a worker.
        """
        with self.engine.begin() as conn:
            held = conn.execute(
                select(jobs.c.max_attempts, jobs.c.status).where(_held(job_id, owner, attempt))
            ).first()
            if held is None:
                raise self._refusal(conn, Move.REQUEUE, job_id, (owner, attempt))
            max_attempts = held.max_attempts
            # Parked or requeued, the job gives its lease back; an attempt not charged is handed back.
            released: dict[str, Any] = dict(lease_owner=None, lease_expires_at=None)
            if not count_attempt:
                released["attempt"] = jobs.c.attempt - 1
            if held.status in {s.value for s in Move.PARK.sources}:
                self._transition(conn, Move.PARK, job_id=job_id, lease=(owner, attempt), event={"reason": reason},
                                 values=released)
                return Move.PARK.target
            if count_attempt and attempt >= max_attempts:
                message = f"{reason}; no attempts left ({attempt} of {max_attempts} used)"
                self._transition(conn, Move.FAIL, job_id=job_id, lease=(owner, attempt),
                                 event={"code": FailureCode.TRAINER_LOST.value, "message": message},
                                 values=dict(completed_at=utcnow(), error_code=FailureCode.TRAINER_LOST.value,
                                             error_message=message))
                return Move.FAIL.target
            self._transition(conn, Move.REQUEUE, job_id=job_id, lease=(owner, attempt), event={"reason": reason},
                             values=released)
            return Move.REQUEUE.target

    def requeue_expired(self, *, now: datetime | None = None) -> builtins.list[tuple[str, JobStatus]]:
        """Requeue (or fail, when out of attempts) running jobs whose lease expired; park a
        pausing one (``paused``: it waits for the user's resume). A job that moved on meanwhile
        (its launcher renewed, the user cancelled) is left alone. A paused job holds no lease and
        is never touched here."""
        now = now or utcnow()
        moved: list[tuple[str, JobStatus]] = []
        with self.engine.connect() as conn:
            expired = conn.execute(
                select(jobs.c.id, jobs.c.attempt, jobs.c.max_attempts, jobs.c.lease_owner, jobs.c.status).where(
                    _in(LEASED_STATUSES), jobs.c.lease_expires_at < now
                )
            ).all()
        for job_id, attempt, max_attempts, owner, status in expired:
            guard = (jobs.c.attempt == attempt, jobs.c.lease_expires_at < now)
            if status in {s.value for s in Move.PARK.sources}:
                move = Move.PARK
                values: dict[str, Any] = dict(lease_owner=None, lease_expires_at=None)
                event: dict[str, Any] = {"reason": "worker_lost", "lost_worker": owner, "attempt": attempt}
            elif attempt < max_attempts:
                move = Move.REQUEUE
                values = dict(lease_owner=None, lease_expires_at=None)
                event = {"reason": "worker_lost", "lost_worker": owner, "attempt": attempt}
            else:
                move = Move.FAIL
                message = f"the worker running this job was lost {attempt} time(s); no attempts left"
                values = dict(completed_at=now, error_code=FailureCode.WORKER_LOST.value, error_message=message)
                event = {"code": FailureCode.WORKER_LOST.value, "message": message}
            try:
                with self.engine.begin() as conn:
                    self._transition(conn, move, job_id=job_id, guard=guard, event=event, values=values)
            except TransitionRefused:
                continue
            moved.append((job_id, move.target))
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
        metrics: Mapping[str, float] | None = None,
        keep: int | None = None,
    ) -> None:
        """Record a checkpoint that is complete on disk; idempotent per identifier. ``metrics``: the
        trainer's further measurements (OpenAI's token accuracies, ``full_valid_loss``), kept in the
        checkpoint's event, not in columns of their own. With ``keep``, the job's rows beyond its
        newest ``keep`` checkpoints are deleted in the same transaction (the trainer deletes their
        folders), so the status lists only what exists.

        Only while this launcher holds the job in progress: a checkpoint reported after the job
        was cancelled or requeued is dropped with ``LeaseLost``. The row goes in with one
        ``INSERT … SELECT … WHERE`` the lease holds, which also locks the job row (PostgreSQL) or
        the database (SQLite) until the checkpoint's event is written beside it.
        """
        row = dict(job_id=job_id, identifier=identifier, epoch=epoch, step=step, path=path, created_at=utcnow(),
                   train_loss=train_loss, validation_loss=validation_loss, perplexity=perplexity)
        recorded = exists(select(checkpoints.c.id).where(checkpoints.c.job_id == job_id,
                                                         checkpoints.c.identifier == identifier))
        with self.engine.begin() as conn:
            if conn.execute(_insert_if_held(checkpoints, row, owner, attempt, ~recorded)).first() is not None:
                self._append(conn, job_id, "checkpoint",
                             {"identifier": identifier, "epoch": epoch, "step": step, "path": path,
                              "train_loss": train_loss, "validation_loss": validation_loss, "perplexity": perplexity,
                              **(metrics or {})})
            elif conn.execute(select(jobs.c.id).where(_held(job_id, owner, attempt))).first() is None:
                raise self._refusal(conn, None, job_id, (owner, attempt), doing="record a checkpoint")
            if keep is not None:
                newest = (select(checkpoints.c.id).where(checkpoints.c.job_id == job_id)
                          .order_by(checkpoints.c.epoch.desc(), checkpoints.c.step.desc(), checkpoints.c.id.desc())
                          .limit(keep))
                conn.execute(delete(checkpoints).where(checkpoints.c.job_id == job_id,
                                                       checkpoints.c.id.not_in(newest)))

    def append_events(self, *, job_id: str, owner: str, attempt: int,
                      events: builtins.list[tuple[str, dict[str, Any]]]) -> None:
        """The trainer's reports (metrics, logs, its start), in order, all or none: only while
        this launcher holds the job in progress, else ``LeaseLost`` and nothing is written.

        The first goes in with one guarded ``INSERT … SELECT`` that also locks the job row
        (PostgreSQL) or the database (SQLite), so the rest, inserted in the same transaction,
        cannot land after a cancel either."""
        if not events:
            return
        now = utcnow()
        rows = [dict(job_id=job_id, created_at=now, type=t, data=d) for t, d in events]
        with self.engine.begin() as conn:
            if conn.execute(_insert_if_held(job_events, rows[0], owner, attempt)).first() is None:
                raise self._refusal(conn, None, job_id, (owner, attempt), doing=f"record {events[0][0]} events")
            if rows[1:]:
                conn.execute(insert(job_events), rows[1:])

    def append_event(self, *, job_id: str, owner: str, attempt: int, type: str, data: dict[str, Any]) -> None:  # noqa: A002
        """One report from the trainer, guarded like ``append_events``."""
        self.append_events(job_id=job_id, owner=owner, attempt=attempt, events=[(type, data)])

    # -- the guarded writes ----------------------------------------------------------------------

    def _transition(
        self,
        conn: Connection,
        move: Move,
        *,
        job_id: str,
        values: dict[str, Any],
        event: dict[str, Any],
        guard: tuple[Any, ...] = (),
        lease: tuple[str, int] | None = None,
    ) -> None:
        """Make ``move`` on one job and log its state event: one UPDATE whose WHERE is the table's
        sources for the move (plus ``guard``, plus the launcher's ``lease`` when it is one making
        it). No row changed: ``TransitionRefused`` (``LeaseLost`` under a lease) with the status
        the job is in, and nothing is written."""
        where = [jobs.c.id == job_id, *guard]
        if lease is not None:
            where += [jobs.c.lease_owner == lease[0], jobs.c.attempt == lease[1]]
        if conn.execute(_move(move, *where).values(**values)).rowcount != 1:
            raise self._refusal(conn, move, job_id, lease)
        self._append(conn, job_id, "state", {"status": move.target.value, **event})

    def _leased_update(self, conn: Connection, job_id: str, owner: str, attempt: int, doing: str, **values: Any) -> None:
        """An UPDATE of a running job that changes no status, made only under its lease."""
        if conn.execute(update(jobs).where(_held(job_id, owner, attempt)).values(**values)).rowcount != 1:
            raise self._refusal(conn, None, job_id, (owner, attempt), doing=doing)

    @staticmethod
    def _refusal(conn: Connection, move: Move | None, job_id: str, lease: tuple[str, int] | None,
                 *, doing: str | None = None) -> TransitionRefused:
        """The error for a guarded write that changed nothing, naming the job's status now."""
        row = conn.execute(select(jobs.c.status, jobs.c.lease_owner, jobs.c.attempt).where(jobs.c.id == job_id)).first()
        status = row.status if row is not None else None
        if doing:
            what = doing
        else:
            assert move is not None, "a refusal names the move or what was being done"
            what = f"{move.value} it"
        if lease is not None:
            now = "no such job" if row is None else f"it is {status} (attempt {row.attempt}, worker {row.lease_owner})"
            return LeaseLost(f"job {job_id}: cannot {what} under worker {lease[0]}'s attempt {lease[1]}: {now}",
                             move=move.value if move else doing or "", status=status)
        assert move is not None
        needs = " or ".join(sorted(s.value for s in move.sources))
        now = "there is no such job" if row is None else f"it is {status}"
        return TransitionRefused(f"job {job_id}: cannot {what}: {now}, and {move.value} needs {needs}",
                                 move=move.value, status=status)

    @staticmethod
    def _append(conn: Connection, job_id: str, type_: str, data: dict[str, Any]) -> None:
        conn.execute(insert(job_events).values(job_id=job_id, created_at=utcnow(), type=type_, data=data))


def _json_holds(dialect: str, path: Sequence[str], key: str, value: str) -> ColumnElement[bool]:
    """``request`` holds, in its object at ``path``, ``key`` with the string ``value``.

    The key is the client's text, so it is always a bound parameter, never spliced into a JSON path:
    PostgreSQL walks ``path`` with ``->`` and reads the key with ``->>``; SQLite's JSON paths cannot
    quote every key, so there the object's members are listed with ``json_each`` and matched as
    columns. A job without the object (a Llama Stack job, metadata null) matches nothing."""
    if dialect == "sqlite":
        if any('"' in part for part in path):
            raise ValueError(f"a JSON path part with a double quote cannot be spelled for SQLite: {path!r}")
        where = "$" + "".join(f'."{part}"' for part in path)
        members = func.json_each(jobs.c.request, where).table_valued("key", "value", "type")
        return exists(select(literal(1)).select_from(members).where(
            members.c.key == key, members.c.type == "text", members.c.value == value))
    node: Any = jobs.c.request
    for part in path:
        node = node[part]
    held: ColumnElement[bool] = node[key].as_string() == value
    return held


def _in(statuses: frozenset[JobStatus]) -> ColumnElement[bool]:
    return jobs.c.status.in_(sorted(s.value for s in statuses))


def _move(move: Move, *where: Any) -> Update:
    """The UPDATE that makes ``move``: the job must be in one of the statuses the table lets
    reach the move's target, and ends in that target."""
    return update(jobs).where(_in(move.sources), *where).values(status=move.target.value)


def _held(job_id: str, owner: str, attempt: int) -> ColumnElement[bool]:
    """The job is running (or pausing) under this launcher's lease (owner and attempt)."""
    return and_(jobs.c.id == job_id, _in(LEASED_STATUSES), jobs.c.lease_owner == owner,
                jobs.c.attempt == attempt)


def _insert_if_held(table: Table, row: dict[str, Any], owner: str, attempt: int, *also: Any) -> Insert:
    """``INSERT INTO table SELECT row WHERE`` the job is held under this lease (and ``also``),
    returning the new row's key (none when the guard failed: an INSERT's rowcount is not kept).

    PostgreSQL: the guard locks the job row ``FOR SHARE`` until commit, so a cancel waits for
    this transaction or is seen by it. SQLite: the statement is a write, so it takes the one
    write lock before it reads the guard."""
    held = select(jobs.c.id).where(_held(row["job_id"], owner, attempt)).with_for_update(read=True)
    columns = list(row)
    values = select(*(literal(row[c], type_=table.c[c].type) for c in columns)).where(exists(held), *also)
    return insert(table).from_select(columns, values).returning(*table.primary_key.columns)
