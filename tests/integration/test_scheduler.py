"""The scheduler on a real store, launching real trainer processes (``tests.stand_in_trainer``,
no torch): it runs no more jobs at once than it has slots, reaps jobs whose worker was lost so
they run again, and on stop hands its running jobs back to the queue."""

from __future__ import annotations

import json
import time

import pytest

from posttrain.domain.jobs import JobStatus
from posttrain.store.jobs import JobStore
from posttrain.worker.scheduler import Scheduler
from tests.worker_helpers import launch_config, output_dir, stand_in_importable, submit, wait_for


@pytest.fixture
def store(store, monkeypatch):
    """The conftest's real store, with the stand-in trainer importable by the launched process."""
    stand_in_importable(monkeypatch)
    return store


@pytest.fixture
def scheduler_for(store):
    started: list[Scheduler] = []

    def build(slots: int, **config) -> Scheduler:
        scheduler = Scheduler(store=store, slots=slots, poll_seconds=0.05, config=launch_config(**config), owner="sched")
        started.append(scheduler)
        return scheduler

    yield build
    for scheduler in started:
        scheduler.stop(timeout=10)


def _statuses(store: JobStore, jobs) -> list[JobStatus]:
    return [store.get(job_id=j.id).status for j in jobs]


def test_no_more_jobs_run_at_once_than_there_are_slots(store, scheduler_for, tmp_path):
    jobs = [submit(store, tmp_path / "jobs", f"slow-{i}") for i in range(4)]
    scheduler = scheduler_for(2)
    most_claimed = 0

    def all_done() -> bool:
        nonlocal most_claimed
        most_claimed = max(most_claimed, len(scheduler.running), store.count_by_status().get("in_progress", 0))
        return all(s is JobStatus.COMPLETED for s in _statuses(store, jobs))

    scheduler.start()
    wait_for(all_done, timeout=20, what="all four jobs to complete")
    runs = [json.loads((output_dir(j) / "ran.json").read_text()) for j in jobs]
    intervals = [(r["start"], r["end"]) for r in runs]
    overlap = max(sum(1 for start, end in intervals if start <= t < end) for t, _ in intervals)
    assert overlap == 2, intervals  # both slots used, never a third trainer
    assert most_claimed <= 2


def test_a_job_whose_worker_was_lost_is_requeued_and_run_again(store, scheduler_for, tmp_path):
    job = submit(store, tmp_path / "jobs", "completes-lost", max_attempts=2)
    lost = store.claim_next(owner="dead-worker", lease_seconds=0.2)  # a worker that then dies
    assert lost.attempt == 1
    time.sleep(0.3)
    scheduler_for(1).start()
    wait_for(lambda: store.get(job_id=job.id).status is JobStatus.COMPLETED, what="the job to complete")
    done = store.get(job_id=job.id)
    assert done.attempt == 2 and done.lease_owner == "sched"
    states = [e.data for e in store.events(job_id=job.id) if e.type == "state"]
    assert states[2] == {"status": "scheduled", "reason": "worker_lost", "lost_worker": "dead-worker", "attempt": 1}
    assert [s["status"] for s in states] == ["scheduled", "in_progress", "scheduled", "in_progress", "completed"]


def test_a_lost_job_out_of_attempts_fails_and_is_not_run(store, scheduler_for, tmp_path):
    job = submit(store, tmp_path / "jobs", "completes-last", max_attempts=1)
    store.claim_next(owner="dead-worker", lease_seconds=0.2)
    time.sleep(0.3)
    scheduler_for(1).tick()
    failed = store.get(job_id=job.id)
    assert failed.status is JobStatus.FAILED and failed.error_code == "worker_lost"
    assert not (output_dir(job) / "ran.json").exists()


def test_a_cancelled_job_is_never_launched(store, scheduler_for, tmp_path):
    cancelled = submit(store, tmp_path / "jobs", "completes-cancelled")
    store.cancel(job_id=cancelled.id)
    after = submit(store, tmp_path / "jobs", "completes-after")
    scheduler_for(1).start()
    wait_for(lambda: store.get(job_id=after.id).status is JobStatus.COMPLETED, what="the next job to complete")
    assert store.get(job_id=cancelled.id).status is JobStatus.CANCELLED
    assert not (output_dir(cancelled) / "ran.json").exists()


def test_stop_hands_running_jobs_back_without_charging_an_attempt(store, scheduler_for, tmp_path):
    job = submit(store, tmp_path / "jobs", "runs-stop", max_attempts=1)
    scheduler = scheduler_for(1)
    scheduler.start()
    wait_for(lambda: [e for e in store.events(job_id=job.id) if e.type == "metric"], what="the trainer's first metric")
    scheduler.stop(timeout=10)
    assert (output_dir(job) / "sigterm").exists()
    back = store.get(job_id=job.id)
    assert (back.status, back.attempt, back.lease_owner) == (JobStatus.SCHEDULED, 0, None)
