"""The job store on a real database (SQLite, and PostgreSQL when configured): the state machine
is guarded in SQL, claims are exclusive, and a launcher that lost its lease changes nothing."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from posttrain.domain.jobs import JobKind, JobStatus
from posttrain.errors import DuplicateJob, LeaseLost, TransitionRefused
from posttrain.store.jobs import JobStore, new_job_id, utcnow
from tests.plans import a_plan


def _submit(store: JobStore, job_uuid: str, *, max_attempts: int = 2, tenant: str = "t"):
    return store.create(job_id=new_job_id(), job_uuid=job_uuid, tenant=tenant, kind=JobKind.SFT,
                        request={"job_uuid": job_uuid}, plan=a_plan(), max_attempts=max_attempts)


def test_created_job_is_scheduled_and_duplicates_conflict(store):
    job = _submit(store, "a")
    assert job.status is JobStatus.SCHEDULED and job.scheduled_at is not None and job.started_at is None
    with pytest.raises(DuplicateJob):
        _submit(store, "a")
    assert store.list_uuids(tenant="t") == ["a"]


def test_claim_takes_oldest_and_sets_lease(store):
    _submit(store, "first")
    _submit(store, "second")
    claimed = store.claim_next(owner="w1", lease_seconds=30)
    assert claimed.job_uuid == "first"
    assert claimed.status is JobStatus.IN_PROGRESS and claimed.attempt == 1 and claimed.lease_owner == "w1"
    assert claimed.started_at is not None
    assert store.claim_next(owner="w2", lease_seconds=30).job_uuid == "second"
    assert store.claim_next(owner="w3", lease_seconds=30) is None


def test_concurrent_claims_never_share_a_job(store):
    for i in range(20):
        _submit(store, f"job-{i:02d}")
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer(owner: str) -> None:
        while (job := store.claim_next(owner=owner, lease_seconds=30)) is not None:
            with lock:
                claimed.append(job.job_uuid)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == [f"job-{i:02d}" for i in range(20)]


def test_cancel_scheduled_is_final(store):
    submitted = _submit(store, "c")
    store.cancel(job_id=submitted.id)
    job = store.find(tenant="t", job_uuid="c")
    assert job.status is JobStatus.CANCELLED and job.completed_at is not None
    assert store.claim_next(owner="w", lease_seconds=30) is None
    with pytest.raises(TransitionRefused) as refused:
        store.cancel(job_id=submitted.id)
    assert refused.value.status == "cancelled"


def test_late_reports_from_a_lost_launcher_change_nothing(store):
    _submit(store, "j")
    job = store.claim_next(owner="w1", lease_seconds=30)
    store.cancel(job_id=job.id)
    # The launcher still thinks it runs the job: every guarded write is refused.
    with pytest.raises(LeaseLost):
        store.renew_lease(job_id=job.id, owner="w1", attempt=job.attempt, lease_seconds=30)
    with pytest.raises(LeaseLost):
        store.finish(job_id=job.id, owner="w1", attempt=job.attempt, status=JobStatus.COMPLETED)
    assert store.get(job_id=job.id).status is JobStatus.CANCELLED


def test_expired_lease_requeues_then_fails_when_attempts_run_out(store):
    job_id = _submit(store, "r", max_attempts=2).id
    first = store.claim_next(owner="w1", lease_seconds=30)
    later = utcnow() + timedelta(seconds=60)
    assert store.requeue_expired(now=later) == [(job_id, JobStatus.SCHEDULED)]
    # The lost launcher cannot finish the job it no longer holds.
    with pytest.raises(LeaseLost):
        store.finish(job_id=job_id, owner="w1", attempt=first.attempt, status=JobStatus.COMPLETED)
    second = store.claim_next(owner="w2", lease_seconds=30)
    assert second.attempt == 2 and second.lease_owner == "w2"
    assert store.requeue_expired(now=later + timedelta(seconds=120)) == [(job_id, JobStatus.FAILED)]
    failed = store.get(job_id=job_id)
    assert failed.status is JobStatus.FAILED and failed.error_code == "worker_lost" and "no attempts left" in failed.error_message


def test_release_on_shutdown_does_not_charge_an_attempt(store):
    _submit(store, "s", max_attempts=1)
    job = store.claim_next(owner="w1", lease_seconds=30)
    released = store.release(job_id=job.id, owner="w1", attempt=job.attempt, reason="worker shut down", count_attempt=False)
    assert released is JobStatus.SCHEDULED
    again = store.claim_next(owner="w2", lease_seconds=30)
    assert again.attempt == 1
    assert store.release(job_id=job.id, owner="w2", attempt=1, reason="trainer died") is JobStatus.FAILED


def test_checkpoints_are_recorded_once_and_only_by_the_lease_holder(store):
    _submit(store, "k")
    job = store.claim_next(owner="w1", lease_seconds=30)
    common = dict(job_id=job.id, identifier="k-epoch-1", epoch=1, step=4, path="/x",
                  train_loss=1.5, validation_loss=1.2, perplexity=3.32)
    with pytest.raises(LeaseLost):
        store.record_checkpoint(owner="intruder", attempt=job.attempt, **common)
    store.record_checkpoint(owner="w1", attempt=job.attempt, **common)
    store.record_checkpoint(owner="w1", attempt=job.attempt, **common)
    (ckpt,) = store.get(job_id=job.id).checkpoints
    assert ckpt.step == 4 and ckpt.metrics.validation_loss == 1.2 and ckpt.job_uuid == "k"
    store.finish(job_id=job.id, owner="w1", attempt=job.attempt, status=JobStatus.COMPLETED)
    types = [e.type for e in store.events(job_id=job.id)]
    assert types == ["state", "state", "checkpoint", "state"]


def test_tenant_scoping(store):
    _submit(store, "mine", tenant="a")
    assert store.find(tenant="a", job_uuid="mine") is not None
    assert store.find(tenant="b", job_uuid="mine") is None
    assert store.list_uuids(tenant="b") == []


def test_two_tenants_may_use_the_same_job_uuid(store):
    """job_uuid is the client's name, unique per tenant: each tenant's "sft-1" is its own job,
    with its own events and checkpoints, and cancelling one leaves the other alone."""
    alice, bob = _submit(store, "sft-1", tenant="alice"), _submit(store, "sft-1", tenant="bob")
    assert alice.id != bob.id
    assert store.find(tenant="alice", job_uuid="sft-1").id == alice.id
    assert store.find(tenant="bob", job_uuid="sft-1").id == bob.id
    with pytest.raises(DuplicateJob):
        _submit(store, "sft-1", tenant="bob")
    claimed = store.claim_next(owner="w1", lease_seconds=30)
    assert claimed.id == alice.id and claimed.tenant == "alice"
    store.record_checkpoint(owner="w1", attempt=claimed.attempt, job_id=alice.id, identifier="sft-1-epoch-1",
                            epoch=1, step=2, path="/data/alice", train_loss=1.0, validation_loss=1.0,
                            perplexity=2.7)
    store.cancel(job_id=bob.id)
    assert store.find(tenant="alice", job_uuid="sft-1").status is JobStatus.IN_PROGRESS
    assert store.find(tenant="bob", job_uuid="sft-1").status is JobStatus.CANCELLED
    assert store.find(tenant="bob", job_uuid="sft-1").checkpoints == ()
    assert [e.data["status"] for e in store.events(job_id=bob.id)] == ["scheduled", "cancelled"]
    assert store.find_checkpoint(tenant="bob", reference="sft-1-epoch-1") is None
    assert store.find_checkpoint(tenant="alice", reference="sft-1-epoch-1").path == "/data/alice"


def test_a_checkpoint_is_found_by_its_tenant_only(store):
    _submit(store, "k")  # tenant "t"
    job = store.claim_next(owner="w1", lease_seconds=30)
    store.record_checkpoint(owner="w1", attempt=job.attempt, job_id=job.id, identifier="k-epoch-1", epoch=1,
                            step=4, path="/data/k/epoch_1", train_loss=1.0, validation_loss=1.0, perplexity=2.7)
    by_id = store.find_checkpoint(tenant="t", reference="k-epoch-1")
    assert by_id is not None and by_id.path == "/data/k/epoch_1"
    assert store.find_checkpoint(tenant="t", reference="/data/k/epoch_1/") == by_id
    assert store.find_checkpoint(tenant="other", reference="k-epoch-1") is None
    assert store.find_checkpoint(tenant="other", reference="/data/k/epoch_1") is None
    assert store.find_checkpoint(tenant="t", reference="k-epoch-2") is None
