"""The reads and the one write the models catalogue needs: a tenant's checkpoints with the job
each belongs to, in two queries (however many jobs the tenant has, no event log is read), and
marking checkpoints deleted.

A deleted checkpoint keeps its row (``deleted_at`` set, migration 0007) so the job keeps its
history and its final checkpoint is still known: a job's fine-tuned model is its final checkpoint,
and it is gone once that checkpoint is deleted, never replaced by an older one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, exists, or_, select, update

from posttrain.domain.jobs import TERMINAL, JobStatus
from posttrain.store.tables import checkpoints, jobs


@dataclass(frozen=True)
class CatalogCheckpoint:
    """One checkpoint row, with what the catalogue names it by."""

    row_id: int
    job_id: str
    identifier: str
    epoch: int
    step: int
    path: str
    created_at: datetime
    deleted: bool


@dataclass(frozen=True)
class CatalogJob:
    """A job that recorded checkpoints: its names, status, request (the OpenAI fields) and its
    checkpoints oldest first, the deleted ones included (the last is its final one)."""

    id: str
    job_uuid: str
    tenant: str
    status: JobStatus
    request: dict[str, Any]
    output_dir: str | None
    model: str | None
    completed_at: datetime | None
    checkpoints: tuple[CatalogCheckpoint, ...]

    @property
    def final(self) -> CatalogCheckpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None

    @property
    def live(self) -> tuple[CatalogCheckpoint, ...]:
        return tuple(c for c in self.checkpoints if not c.deleted)


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class ModelCatalogStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def jobs_with_checkpoints(self, *, tenant: str, job_uuid: str | None = None) -> list[CatalogJob]:
        """The tenant's jobs that recorded a checkpoint (just the one named ``job_uuid`` when given),
        oldest first, each with its checkpoints: one query for the jobs, one for the checkpoints."""
        has_checkpoint = exists(select(checkpoints.c.id).where(checkpoints.c.job_id == jobs.c.id))
        job_query = (select(jobs.c.id, jobs.c.job_uuid, jobs.c.tenant, jobs.c.status, jobs.c.request, jobs.c.plan,
                            jobs.c.completed_at)
                     .where(jobs.c.tenant == tenant, has_checkpoint, _not_a_search())
                     .order_by(jobs.c.scheduled_at, jobs.c.id))
        if job_uuid is not None:
            job_query = job_query.where(jobs.c.job_uuid == job_uuid)
        ckpt_query = (select(checkpoints).join(jobs, jobs.c.id == checkpoints.c.job_id)
                      .where(jobs.c.tenant == tenant)
                      .order_by(checkpoints.c.job_id, checkpoints.c.epoch, checkpoints.c.step, checkpoints.c.id))
        if job_uuid is not None:
            ckpt_query = ckpt_query.where(jobs.c.job_uuid == job_uuid)
        with self.engine.connect() as conn:
            job_rows = list(conn.execute(job_query).mappings())
            by_job: dict[str, list[CatalogCheckpoint]] = {}
            for r in conn.execute(ckpt_query).mappings():
                created = _aware(r["created_at"])
                assert created is not None
                by_job.setdefault(r["job_id"], []).append(CatalogCheckpoint(
                    row_id=r["id"], job_id=r["job_id"], identifier=r["identifier"], epoch=r["epoch"], step=r["step"],
                    path=r["path"], created_at=created, deleted=r["deleted_at"] is not None))
        found = []
        for row in job_rows:
            plan = row["plan"] if isinstance(row["plan"], dict) else {}
            found.append(CatalogJob(
                id=row["id"], job_uuid=row["job_uuid"], tenant=row["tenant"], status=JobStatus(row["status"]),
                request=row["request"] if isinstance(row["request"], dict) else {},
                output_dir=plan.get("output_dir"), model=plan.get("model"), completed_at=_aware(row["completed_at"]),
                checkpoints=tuple(by_job.get(row["id"], ()))))
        return found

    def job_of_checkpoint(self, *, tenant: str, identifier: str) -> str | None:
        """The job_uuid of the tenant's job holding a (not deleted) checkpoint of this identifier."""
        query = (select(jobs.c.job_uuid).join(checkpoints, checkpoints.c.job_id == jobs.c.id)
                 .where(jobs.c.tenant == tenant, checkpoints.c.identifier == identifier,
                        checkpoints.c.deleted_at.is_(None), _not_a_search()).limit(1))
        with self.engine.connect() as conn:
            found = conn.execute(query).scalar()
        return str(found) if found is not None else None

    def mark_deleted(self, *, job_id: str, row_ids: Sequence[int]) -> int:
        """Mark these checkpoints of the job deleted, only while the job is finished (one UPDATE
        guarded by the job's status, so a job that is still training is never changed under its
        trainer); how many rows it marked."""
        finished = exists(select(jobs.c.id).where(jobs.c.id == job_id,
                                                  jobs.c.status.in_([s.value for s in TERMINAL])))
        statement = (update(checkpoints)
                     .where(and_(checkpoints.c.job_id == job_id, checkpoints.c.id.in_(list(row_ids)),
                                 checkpoints.c.deleted_at.is_(None), finished))
                     .values(deleted_at=datetime.now(UTC)))
        with self.engine.begin() as conn:
            return conn.execute(statement).rowcount


def _not_a_search() -> ColumnElement[bool]:
    """Not a hyperparameter search's parent: its checkpoints are its best trial's own rows
    (docs/hyperparameter-search.md), which the catalogue lists, and deletes, under the trial."""
    return or_(jobs.c.search.is_(None), jobs.c.parent_job_id.is_not(None))
