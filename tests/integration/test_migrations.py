"""The Alembic revisions against ``store/tables.py`` on real databases (SQLite, and PostgreSQL
when configured): migrating an empty database gives exactly the declared tables, and a database
written by an older revision keeps every job, checkpoint and event through the upgrade."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from posttrain.domain.jobs import JobKind, JobStatus
from posttrain.errors import DuplicateJob
from posttrain.store.engine import alembic_config, at_head, make_engine, migrate
from posttrain.store.jobs import JobStore, new_job_id
from posttrain.store.tables import metadata


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _schema_differences(engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), metadata)


def test_the_migrations_create_exactly_the_declared_tables(engine):
    migrate(engine)
    assert at_head(engine)
    assert _schema_differences(engine) == []


def _write_jobs_as_revision_0001_did(engine) -> None:
    """Two jobs of tenant "a", one with a checkpoint, written with 0001's columns (job_uuid the key)."""
    now = datetime(2026, 11, 27, tzinfo=UTC)
    job = dict(tenant="a", kind="sft", request="{}", plan='{"method": "sft"}', scheduled_at=now, attempt=1,
               max_attempts=2, cancel_requested=False, resources="{}")
    with engine.begin() as conn:
        for job_uuid, status in (("old-1", "completed"), ("old-2", "scheduled")):
            conn.execute(text("INSERT INTO jobs (job_uuid, tenant, kind, status, request, plan, scheduled_at, attempt, "
                              "max_attempts, cancel_requested, resources) VALUES (:job_uuid, :tenant, :kind, :status, "
                              ":request, :plan, :scheduled_at, :attempt, :max_attempts, :cancel_requested, :resources)"),
                         {**job, "job_uuid": job_uuid, "status": status})
            conn.execute(text("INSERT INTO job_events (job_uuid, created_at, type, data) "
                              "VALUES (:job_uuid, :now, 'state', :data)"),
                         {"job_uuid": job_uuid, "now": now, "data": f'{{"status": "{status}"}}'})
        conn.execute(text("INSERT INTO checkpoints (job_uuid, identifier, epoch, step, path, created_at, train_loss, "
                          "validation_loss, perplexity) VALUES ('old-1', 'old-1-epoch-1', 1, 8, '/data/old-1', :now, "
                          "1.5, 1.25, 3.49)"), {"now": now})


def test_jobs_written_before_per_tenant_job_uuids_survive_the_upgrade(engine):
    migrate(engine, "0001")
    _write_jobs_as_revision_0001_did(engine)
    migrate(engine)
    assert _schema_differences(engine) == []
    store = JobStore(engine)

    old = store.find(tenant="a", job_uuid="old-1")
    assert old.status is JobStatus.COMPLETED and old.id == "old-1"  # existing jobs keep job_uuid as their key
    (checkpoint,) = old.checkpoints
    assert (checkpoint.identifier, checkpoint.step, checkpoint.job_uuid) == ("old-1-epoch-1", 8, "old-1")
    assert checkpoint.metrics.validation_loss == 1.25
    assert [e.data for e in store.events(job_id=old.id)] == [{"status": "completed"}]
    assert store.find_checkpoint(tenant="a", reference="/data/old-1").identifier == "old-1-epoch-1"

    # The queued job still runs; another tenant may now use the same name; the owner still may not.
    assert store.claim_next(owner="w", lease_seconds=30).job_uuid == "old-2"
    other = store.create(job_id=new_job_id(), job_uuid="old-1", tenant="b", kind=JobKind.SFT, request={}, plan={},
                         max_attempts=1)
    assert other.id != old.id and store.find(tenant="b", job_uuid="old-1").checkpoints == ()
    with pytest.raises(DuplicateJob):
        store.create(job_id=new_job_id(), job_uuid="old-1", tenant="a", kind=JobKind.SFT, request={}, plan={},
                     max_attempts=1)

    # Deleting a job still takes its checkpoints and events with it (the foreign keys came back).
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM jobs WHERE id = 'old-1'"))
        assert conn.execute(text("SELECT count(*) FROM checkpoints")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM job_events WHERE job_id = 'old-1'")).scalar_one() == 0


def test_the_upgrade_can_be_rolled_back_while_job_uuids_are_still_unique(engine):
    migrate(engine, "0001")
    _write_jobs_as_revision_0001_did(engine)
    migrate(engine)
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0001")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT c.identifier, j.job_uuid FROM checkpoints c "
                                 "JOIN jobs j ON j.job_uuid = c.job_uuid")).all()
        assert [tuple(r) for r in rows] == [("old-1-epoch-1", "old-1")]
        assert conn.execute(text("SELECT count(*) FROM job_events")).scalar_one() == 2
    migrate(engine)
    assert _schema_differences(engine) == []
    assert JobStore(engine).find(tenant="a", job_uuid="old-1").checkpoints[0].step == 8
