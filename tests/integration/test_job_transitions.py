"""Every move of the job state machine on a real store (SQLite, and PostgreSQL when configured).

Each legal move succeeds and logs its state event; each illegal one raises the typed error
carrying the job's status and changes nothing (row, checkpoints, events); a launcher that lost a
race (another launcher, a stale attempt, a cancel while it ran) is refused everything, and a
trainer's late reports never land on a cancelled job.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from posttrain.domain.jobs import LEASED_STATUSES, JobKind, JobStatus, Move
from posttrain.errors import InvalidTransition, LeaseLost, TransitionRefused
from posttrain.services.jobs import JobService
from posttrain.settings import Settings
from posttrain.store.datasets import DatasetStore
from posttrain.store.jobs import JobStore, new_job_id, utcnow
from posttrain.store.tables import checkpoints, job_events, jobs
from tests.plans import a_plan

OWNER = "w1"


def _submit(store: JobStore, job_uuid: str = "j", *, max_attempts: int = 2):
    return store.create(job_id=new_job_id(), job_uuid=job_uuid, tenant="t", kind=JobKind.SFT,
                        request={"job_uuid": job_uuid}, plan=a_plan(), max_attempts=max_attempts)


def _job_in(store: JobStore, status: JobStatus, *, max_attempts: int = 2):
    """A job brought to ``status`` by legal moves only."""
    job = _submit(store, f"job-{status.value}", max_attempts=max_attempts)
    if status is JobStatus.CANCELLED:
        store.cancel(job_id=job.id)
    elif status is JobStatus.PAUSED:
        store.pause(job_id=job.id)
    elif status is not JobStatus.SCHEDULED:
        job = store.claim_next(owner=OWNER, lease_seconds=30)
        if status in (JobStatus.COMPLETED, JobStatus.FAILED):
            store.finish(job_id=job.id, owner=OWNER, attempt=job.attempt, status=status,
                         error_code="bad_row" if status is JobStatus.FAILED else None,
                         error_message="row 3: no text" if status is JobStatus.FAILED else None)
        elif status is JobStatus.PAUSING:
            store.pause(job_id=job.id)
    got = store.get(job_id=job.id)
    assert got.status is status
    return got


def _snapshot(store: JobStore, job_id: str) -> tuple[Any, ...]:
    """Everything the store holds about one job."""
    with store.engine.connect() as conn:
        row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().one()
        ckpts = conn.execute(select(checkpoints).where(checkpoints.c.job_id == job_id)
                             .order_by(checkpoints.c.id)).mappings().all()
        events = conn.execute(select(job_events).where(job_events.c.job_id == job_id)
                              .order_by(job_events.c.seq)).mappings().all()
    return dict(row), [dict(c) for c in ckpts], [dict(e) for e in events]


def _checkpoint(store: JobStore, job, *, owner: str = OWNER, attempt: int | None = None, name: str = "epoch-1"):
    store.record_checkpoint(job_id=job.id, owner=owner, attempt=job.attempt if attempt is None else attempt,
                            identifier=f"{job.job_uuid}-{name}", epoch=1, step=4, path=f"/ckpt/{name}",
                            train_loss=1.0, validation_loss=1.1, perplexity=3.0)


def _last_state(store: JobStore, job_id: str) -> dict[str, Any]:
    return [e.data for e in store.events(job_id=job_id) if e.type == "state"][-1]


# -- every legal move --------------------------------------------------------------------------


def test_claim_moves_a_scheduled_job_to_in_progress(store):
    job = _job_in(store, JobStatus.SCHEDULED)
    claimed = store.claim_next(owner=OWNER, lease_seconds=30)
    assert (claimed.id, claimed.status, claimed.attempt, claimed.lease_owner) == (job.id, JobStatus.IN_PROGRESS, 1, OWNER)
    assert _last_state(store, job.id) == {"status": "in_progress", "attempt": 1, "worker": OWNER}


@pytest.mark.parametrize("source", sorted(Move.CANCEL.sources, key=lambda s: s.value))
def test_cancel_from_every_source(store, source):
    job = _job_in(store, source)
    store.cancel(job_id=job.id)
    cancelled = store.get(job_id=job.id)
    assert cancelled.status is JobStatus.CANCELLED and cancelled.completed_at is not None and cancelled.cancel_requested
    assert _last_state(store, job.id) == {"status": "cancelled", "reason": "cancelled by the user"}


def test_complete_and_fail_a_running_job(store):
    for status, code in ((JobStatus.COMPLETED, None), (JobStatus.FAILED, "bad_row")):
        job = _job_in(store, status)
        assert (job.error_code, job.completed_at is not None) == (code, True)
        expected = {"status": status.value}
        if code:
            expected.update(code="bad_row", message="row 3: no text")
        assert _last_state(store, job.id) == expected


def test_release_requeues_charging_the_attempt_then_fails_when_none_are_left(store):
    job = _job_in(store, JobStatus.IN_PROGRESS, max_attempts=2)
    assert store.release(job_id=job.id, owner=OWNER, attempt=1, reason="trainer exited") is JobStatus.SCHEDULED
    requeued = store.get(job_id=job.id)
    assert (requeued.status, requeued.attempt, requeued.lease_owner) == (JobStatus.SCHEDULED, 1, None)
    assert _last_state(store, job.id) == {"status": "scheduled", "reason": "trainer exited"}
    again = store.claim_next(owner="w2", lease_seconds=30)
    assert again.attempt == 2
    assert store.release(job_id=job.id, owner="w2", attempt=2, reason="trainer exited") is JobStatus.FAILED
    failed = store.get(job_id=job.id)
    assert failed.status is JobStatus.FAILED and failed.error_code == "trainer_lost"
    assert "no attempts left (2 of 2 used)" in failed.error_message


def test_requeue_expired_requeues_then_fails(store):
    job = _job_in(store, JobStatus.IN_PROGRESS, max_attempts=2)
    later = utcnow() + timedelta(seconds=60)
    assert store.requeue_expired(now=later) == [(job.id, JobStatus.SCHEDULED)]
    assert _last_state(store, job.id)["reason"] == "worker_lost"
    store.claim_next(owner="w2", lease_seconds=30)
    assert store.requeue_expired(now=later + timedelta(seconds=60)) == [(job.id, JobStatus.FAILED)]
    assert store.get(job_id=job.id).error_code == "worker_lost"


# -- every illegal move ------------------------------------------------------------------------


def _attempt(store: JobStore, move: Move, job) -> None:
    """Try ``move`` on ``job`` the way its caller would (a launcher uses the job's own lease)."""
    lease = dict(job_id=job.id, owner=job.lease_owner or OWNER, attempt=job.attempt)
    if move is Move.CANCEL:
        store.cancel(job_id=job.id)
    elif move is Move.COMPLETE:
        store.finish(**lease, status=JobStatus.COMPLETED)
    elif move is Move.FAIL:
        store.finish(**lease, status=JobStatus.FAILED, error_code="error", error_message="late")
    elif move is Move.REQUEUE:
        store.release(**lease, reason="late")
    elif move in (Move.PAUSE, Move.HOLD):
        store.pause(job_id=job.id)
    elif move is Move.PARK:
        store.park(**lease, reason="late")
    elif move is Move.RESUME:
        store.resume(job_id=job.id)
    else:
        raise AssertionError(move)


#: The user's moves (no lease); the user's pause makes whichever of hold and pause applies.
USER_MOVES = {Move.CANCEL, Move.PAUSE, Move.HOLD, Move.RESUME}
PAUSABLE = Move.PAUSE.sources | Move.HOLD.sources
ILLEGAL = [(status, move) for status in JobStatus for move in Move
           if status not in move.sources and move is not Move.CLAIM
           and not (move in (Move.PAUSE, Move.HOLD) and status in PAUSABLE)
           and not (move is Move.REQUEUE and status in Move.PARK.sources)]  # release parks a pausing job


@pytest.mark.parametrize(("status", "move"), ILLEGAL, ids=[f"{s.value}-{m.value}" for s, m in ILLEGAL])
def test_an_illegal_move_raises_with_the_status_and_changes_nothing(store, status, move):
    job = _job_in(store, status)
    before = _snapshot(store, job.id)
    with pytest.raises(TransitionRefused) as refused:
        _attempt(store, move, job)
    assert refused.value.status == status.value and refused.value.status_code == 409
    assert isinstance(refused.value, LeaseLost) == (move not in USER_MOVES)  # the launcher's moves are leased
    assert _snapshot(store, job.id) == before


@pytest.mark.parametrize("status", [s for s in JobStatus if s not in Move.CLAIM.sources])
def test_only_scheduled_jobs_are_claimed(store, status):
    job = _job_in(store, status)
    before = _snapshot(store, job.id)
    assert store.claim_next(owner="w2", lease_seconds=30) is None
    assert store.requeue_expired(now=utcnow() - timedelta(days=1)) == []
    assert _snapshot(store, job.id) == before


@pytest.mark.parametrize("status", [s for s in JobStatus if s not in LEASED_STATUSES])
def test_lease_writes_need_a_running_job(store, status):
    job = _job_in(store, status)
    before = _snapshot(store, job.id)
    lease = dict(job_id=job.id, owner=job.lease_owner or OWNER, attempt=job.attempt)
    for write in (
        lambda: store.renew_lease(**lease, lease_seconds=30),
        lambda: store.set_resources(**lease, resources={"device": "cpu"}),
        lambda: _checkpoint(store, job, owner=lease["owner"]),
        lambda: store.append_events(**lease, events=[("metric", {"step": 1, "loss": 2.0})]),
        lambda: store.append_event(**lease, type="log", data={"level": "info", "message": "late"}),
    ):
        with pytest.raises(LeaseLost) as lost:
            write()
        assert lost.value.status == status.value
    assert _snapshot(store, job.id) == before


# -- lost races --------------------------------------------------------------------------------


def _refused_everything(store: JobStore, job, *, owner: str, attempt: int, status: JobStatus) -> None:
    lease = dict(job_id=job.id, owner=owner, attempt=attempt)
    before = _snapshot(store, job.id)
    writes = {
        "renew": lambda: store.renew_lease(**lease, lease_seconds=30),
        "resources": lambda: store.set_resources(**lease, resources={"device": "cpu"}),
        "checkpoint": lambda: _checkpoint(store, job, owner=owner, attempt=attempt, name="late"),
        "events": lambda: store.append_events(**lease, events=[("metric", {"step": 9}), ("log", {"message": "x"})]),
        "complete": lambda: store.finish(**lease, status=JobStatus.COMPLETED),
        "fail": lambda: store.finish(**lease, status=JobStatus.FAILED, error_code="error", error_message="late"),
        "requeue": lambda: store.release(**lease, reason="late"),
        "requeue-uncharged": lambda: store.release(**lease, reason="late", count_attempt=False),
    }
    for name, write in writes.items():
        with pytest.raises(LeaseLost) as lost:
            write()
        assert lost.value.status == status.value, name
    assert _snapshot(store, job.id) == before


def test_a_launcher_whose_job_went_to_another_launcher_is_refused_everything(store):
    first = _job_in(store, JobStatus.IN_PROGRESS)
    store.requeue_expired(now=utcnow() + timedelta(seconds=60))
    second = store.claim_next(owner="w2", lease_seconds=30)
    assert second.attempt == 2
    _refused_everything(store, first, owner=OWNER, attempt=1, status=JobStatus.IN_PROGRESS)
    # The new holder is unaffected.
    store.renew_lease(job_id=second.id, owner="w2", attempt=2, lease_seconds=30)
    _checkpoint(store, second, owner="w2")
    store.finish(job_id=second.id, owner="w2", attempt=2, status=JobStatus.COMPLETED)
    assert store.get(job_id=second.id).status is JobStatus.COMPLETED


def test_a_stale_attempt_of_the_same_worker_is_refused(store):
    job = _job_in(store, JobStatus.IN_PROGRESS)
    store.release(job_id=job.id, owner=OWNER, attempt=1, reason="trainer exited")
    again = store.claim_next(owner=OWNER, lease_seconds=30)
    assert (again.lease_owner, again.attempt) == (OWNER, 2)
    _refused_everything(store, job, owner=OWNER, attempt=1, status=JobStatus.IN_PROGRESS)


def test_a_job_cancelled_while_running_refuses_its_launcher(store):
    job = _job_in(store, JobStatus.IN_PROGRESS)
    store.cancel(job_id=job.id)
    _refused_everything(store, job, owner=OWNER, attempt=1, status=JobStatus.CANCELLED)


def test_an_expired_lease_renewed_in_time_is_not_requeued(store):
    job = _job_in(store, JobStatus.IN_PROGRESS)
    store.renew_lease(job_id=job.id, owner=OWNER, attempt=1, lease_seconds=3600)
    assert store.requeue_expired(now=utcnow() + timedelta(seconds=60)) == []
    assert store.get(job_id=job.id).status is JobStatus.IN_PROGRESS


def test_cancel_racing_the_launcher_s_finish_lets_exactly_one_win(store):
    running = []
    for i in range(12):
        _submit(store, f"race-{i}")
        running.append(store.claim_next(owner=OWNER, lease_seconds=30))
    outcomes: dict[tuple[str, str], str] = {}
    barrier = threading.Barrier(2)

    def cancel() -> None:
        barrier.wait()
        for job in running:
            try:
                store.cancel(job_id=job.id)
                outcomes[(job.id, "cancel")] = "won"
            except TransitionRefused as refused:
                outcomes[(job.id, "cancel")] = refused.status

    def finish() -> None:
        barrier.wait()
        for job in reversed(running):
            try:
                store.finish(job_id=job.id, owner=OWNER, attempt=job.attempt, status=JobStatus.COMPLETED)
                outcomes[(job.id, "finish")] = "won"
            except LeaseLost as lost:
                outcomes[(job.id, "finish")] = lost.status

    threads = [threading.Thread(target=cancel), threading.Thread(target=finish)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for job in running:
        final = store.get(job_id=job.id).status
        cancel_outcome, finish_outcome = outcomes[(job.id, "cancel")], outcomes[(job.id, "finish")]
        if final is JobStatus.CANCELLED:
            assert (cancel_outcome, finish_outcome) == ("won", "cancelled")
        else:
            assert (final, cancel_outcome, finish_outcome) == (JobStatus.COMPLETED, "completed", "won")
        terminal_events = [e for e in store.events(job_id=job.id)
                           if e.type == "state" and e.data["status"] in ("cancelled", "completed")]
        assert len(terminal_events) == 1


# -- the defect: reports after a cancel --------------------------------------------------------


def test_a_checkpoint_and_a_metric_reported_after_cancel_are_dropped(store):
    """The trainer needs a moment to stop after a cancel, and its launcher keeps reading what it
    says meanwhile: none of that may land on the cancelled job."""
    job = _job_in(store, JobStatus.IN_PROGRESS)
    lease = dict(job_id=job.id, owner=OWNER, attempt=1)
    store.append_events(**lease, events=[("metric", {"step": 1, "loss": 2.0})])
    _checkpoint(store, job, name="epoch-1")
    store.cancel(job_id=job.id)
    with pytest.raises(LeaseLost):
        _checkpoint(store, job, name="epoch-2")
    with pytest.raises(LeaseLost):
        store.append_events(**lease, events=[("metric", {"step": 2, "loss": 1.5})])
    with pytest.raises(LeaseLost):
        store.append_event(**lease, type="log", data={"level": "info", "message": "saving"})
    cancelled = store.get(job_id=job.id)
    assert cancelled.status is JobStatus.CANCELLED
    assert [c.identifier for c in cancelled.checkpoints] == ["job-in_progress-epoch-1"]
    types = [(e.type, e.data.get("status")) for e in store.events(job_id=job.id)]
    assert types == [("state", "scheduled"), ("state", "in_progress"), ("metric", None), ("checkpoint", None),
                     ("state", "cancelled")]


def test_a_checkpoint_re_sent_on_resume_is_recorded_once(store):
    job = _job_in(store, JobStatus.IN_PROGRESS)
    _checkpoint(store, job)
    _checkpoint(store, job)
    assert len(store.get(job_id=job.id).checkpoints) == 1
    assert [e.type for e in store.events(job_id=job.id)].count("checkpoint") == 1


# -- the service's cancel ----------------------------------------------------------------------


@pytest.fixture
def service(store, tmp_path):
    settings = Settings(home=tmp_path / "home", database_url=str(store.engine.url))
    return JobService(store=store, datasets=DatasetStore(store.engine, tmp_path / "datasets"), settings=settings)


def test_service_cancel_is_idempotent_for_a_cancelled_job(service, store):
    job = _job_in(store, JobStatus.SCHEDULED)
    assert service.cancel(tenant="t", job_uuid=job.job_uuid).status is JobStatus.CANCELLED
    before = _snapshot(store, job.id)
    again = service.cancel(tenant="t", job_uuid=job.job_uuid)
    assert again.status is JobStatus.CANCELLED and again.id == job.id
    assert _snapshot(store, job.id) == before


@pytest.mark.parametrize("status", [JobStatus.COMPLETED, JobStatus.FAILED])
def test_service_cancel_of_a_finished_job_is_a_409_naming_its_status(service, store, status):
    job = _job_in(store, status)
    before = _snapshot(store, job.id)
    with pytest.raises(InvalidTransition) as refused:
        service.cancel(tenant="t", job_uuid=job.job_uuid)
    assert refused.value.status_code == 409
    assert refused.value.detail == f"job '{job.job_uuid}' is {status.value} and can no longer be cancelled"
    assert _snapshot(store, job.id) == before
