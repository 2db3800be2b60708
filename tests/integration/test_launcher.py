"""The launcher on a real store with a real trainer process: ``tests.stand_in_trainer`` speaks the
trainer protocol without torch, so each case takes about a second.

What the trainer reports becomes the job's end (completed, failed with its code, requeued or failed
when it dies), and once the job has moved on (cancelled, given to another launcher) the trainer
is stopped with SIGTERM and nothing more it says is recorded.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from posttrain.domain.jobs import JobStatus
from posttrain.store.jobs import JobStore, utcnow
from posttrain.worker.launcher import Launcher
from tests.worker_helpers import launch_config, output_dir, stand_in_importable, submit, wait_for

OWNER = "w1"


@pytest.fixture
def store(store, monkeypatch):
    """The conftest's real store, with the stand-in trainer importable by the launched process."""
    stand_in_importable(monkeypatch)
    return store


def _claim(store: JobStore, tmp_path, job_uuid: str, *, max_attempts: int = 2, owner: str = OWNER):
    submitted = submit(store, tmp_path / "jobs", job_uuid, max_attempts=max_attempts)
    job = store.claim_next(owner=owner, lease_seconds=5)
    assert job.id == submitted.id
    return job


def _run(store: JobStore, job, **config) -> Launcher:
    launcher = Launcher(job=job, owner=job.lease_owner, store=store, config=launch_config(**config))
    launcher.run()
    return launcher


def _types(store: JobStore, job_id: str) -> list[str]:
    return [e.type if e.type != "state" else f"state:{e.data['status']}" for e in store.events(job_id=job_id)]


def test_a_completed_trainer_completes_the_job_with_its_reports(store, tmp_path):
    job = _claim(store, tmp_path, "completes-1")
    _run(store, job)
    done = store.get(job_id=job.id)
    assert done.status is JobStatus.COMPLETED and done.completed_at is not None and done.error_code is None
    assert [c.identifier for c in done.checkpoints] == ["completes-1-epoch-1"]
    assert done.resources["device"] == "cpu" and done.resources["worker"] == OWNER and done.resources["attempt"] == 1
    assert _types(store, job.id) == ["state:scheduled", "state:in_progress", "started", "metric", "metric",
                                     "checkpoint", "state:completed"]
    metrics = [e.data for e in store.events(job_id=job.id) if e.type == "metric"]
    assert [(m["step"], m["attempt"]) for m in metrics] == [(1, 1), (2, 1)]


def test_a_failed_trainer_fails_the_job_with_its_code(store, tmp_path):
    job = _claim(store, tmp_path, "fails-1")
    _run(store, job)
    failed = store.get(job_id=job.id)
    assert (failed.status, failed.error_code, failed.error_message) == (
        JobStatus.FAILED, "bad_row", "row 2: messages is empty")
    assert store.events(job_id=job.id)[-1].data == {"status": "failed", "code": "bad_row",
                                                    "message": "row 2: messages is empty"}


def test_a_crashed_trainer_requeues_the_job_and_charges_the_attempt(store, tmp_path):
    job = _claim(store, tmp_path, "crashes-1", max_attempts=2)
    _run(store, job)
    requeued = store.get(job_id=job.id)
    assert (requeued.status, requeued.attempt, requeued.lease_owner) == (JobStatus.SCHEDULED, 1, None)
    reason = store.events(job_id=job.id)[-1].data["reason"]
    assert reason.startswith("trainer exited with code 3 before finishing") and "simulated crash" in reason
    again = store.claim_next(owner="w2", lease_seconds=5)
    assert again.attempt == 2  # the crash used up attempt 1


def test_a_crash_on_the_last_attempt_fails_the_job_as_trainer_lost(store, tmp_path):
    job = _claim(store, tmp_path, "crashes-2", max_attempts=1)
    _run(store, job)
    failed = store.get(job_id=job.id)
    assert failed.status is JobStatus.FAILED and failed.error_code == "trainer_lost"
    assert "code 3" in failed.error_message and "no attempts left (1 of 1 used)" in failed.error_message


def test_cancel_while_running_stops_the_trainer_and_nothing_it_says_later_lands(store, tmp_path):
    """The trainer needs a moment to stop after a cancel: the checkpoint and metric it still
    reports then must not be recorded on the cancelled job (they were, before the launcher's
    writes were guarded by the job's status)."""
    job = _claim(store, tmp_path, "runs-1")
    launcher = Launcher(job=job, owner=OWNER, store=store, config=launch_config())
    thread = threading.Thread(target=launcher.run)
    thread.start()
    wait_for(lambda: [e for e in store.events(job_id=job.id) if e.type == "metric"], what="the first metric")
    store.cancel(job_id=job.id)
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert (output_dir(job) / "sigterm").exists(), "the trainer never got SIGTERM"
    assert (output_dir(job) / "epoch_1").is_dir()  # it did write its late checkpoint on disk
    cancelled = store.get(job_id=job.id)
    assert cancelled.status is JobStatus.CANCELLED and cancelled.checkpoints == ()
    types = _types(store, job.id)
    assert types[-1] == "state:cancelled" and "checkpoint" not in types


def test_a_launcher_whose_lease_went_to_another_worker_stops_and_writes_nothing(store, tmp_path):
    job = _claim(store, tmp_path, "runs-2")
    launcher = Launcher(job=job, owner=OWNER, store=store, config=launch_config())
    thread = threading.Thread(target=launcher.run)
    thread.start()
    wait_for(lambda: [e for e in store.events(job_id=job.id) if e.type == "metric"], what="the first metric")
    # This worker looks lost (its lease is judged expired) and another claims the job.
    assert store.requeue_expired(now=utcnow() + timedelta(seconds=60)) == [(job.id, JobStatus.SCHEDULED)]
    taken = store.claim_next(owner="w2", lease_seconds=60)
    seq_at_takeover = store.events(job_id=job.id)[-1].seq
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert (output_dir(job) / "sigterm").exists()
    now = store.get(job_id=job.id)
    assert (now.status, now.lease_owner, now.attempt) == (JobStatus.IN_PROGRESS, "w2", taken.attempt)
    assert now.checkpoints == ()
    assert store.events(job_id=job.id, after=seq_at_takeover) == []


def test_shutdown_gives_the_job_back_without_charging_the_attempt(store, tmp_path):
    job = _claim(store, tmp_path, "runs-3", max_attempts=1)
    launcher = Launcher(job=job, owner=OWNER, store=store, config=launch_config())
    thread = threading.Thread(target=launcher.run)
    thread.start()
    wait_for(lambda: [e for e in store.events(job_id=job.id) if e.type == "metric"], what="the first metric")
    launcher.request_shutdown()
    thread.join(timeout=10)
    assert (output_dir(job) / "sigterm").exists()
    back = store.get(job_id=job.id)
    assert (back.status, back.attempt) == (JobStatus.SCHEDULED, 0)
    assert store.events(job_id=job.id)[-1].data == {"status": "scheduled", "reason": "worker shut down"}
