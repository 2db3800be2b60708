"""Nothing lost: real processes are killed with SIGKILL in the middle of a job, and the job
resumes from its newest checkpoint with its epochs and metrics continuing, not restarting."""

from __future__ import annotations

import os
import signal
import time

import pytest

from posttrain.demo import colour_rows
from tests.conftest import start_server, stop_server
from tests.integration.test_api import lora_request

pytestmark = pytest.mark.slow


#: Long enough that a kill right after the first checkpoint lands mid-job even on a fast, idle machine
#: (the job takes several seconds after its first epoch), short enough for the suite.
LONG_EPOCHS = 10


def _submit_long_job(server) -> str:
    server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "colours",
                                      "source": {"type": "rows", "rows": colour_rows(repeat=8)}})
    body = lora_request(str(server.tiny_model_path), "colours")
    body["training_config"].update(n_epochs=LONG_EPOCHS, max_steps_per_epoch=32)
    # Every epoch's checkpoint is kept (the server's default keeps the newest 5), so the test sees them all.
    assert server.post("/v1/post-training/supervised-fine-tune", json=body,
                       headers={"X-Posttrain-Keep-Checkpoints": str(LONG_EPOCHS)}).status_code == 200
    return body["job_uuid"]


def _events(server, job_uuid: str) -> list[dict]:
    return server.get("/v1/post-training/job/events", params={"job_uuid": job_uuid}).json()["data"]


def _assert_resumed_and_complete(server, job_uuid: str) -> None:
    final = server.wait_for_job(job_uuid, lambda s: s["status"] in ("completed", "failed", "cancelled"), timeout=180)
    assert final["status"] == "completed", final
    assert [c["epoch"] for c in final["checkpoints"]] == list(range(1, LONG_EPOCHS + 1))
    assert len({c["identifier"] for c in final["checkpoints"]}) == LONG_EPOCHS
    events = _events(server, job_uuid)
    started = [e["data"] for e in events if e["type"] == "started"]
    assert len(started) == 2 and started[0]["resumed_from"] is None
    assert started[1]["resumed_from"] is not None, "the second attempt must resume from a checkpoint"
    # Epochs continue from the checkpoint the second attempt resumed from. That is the newest complete one
    # on disk: at least the newest recorded before the kill, or one the orphaned trainer finished writing
    # after its worker died (complete on disk, so adopted and recorded by the second attempt).
    second_start = next(x["seq"] for x in events if x["type"] == "started" and x["data"]["resumed_from"])
    recorded_before = max(e["data"]["epoch"] for e in events if e["type"] == "checkpoint" and e["seq"] < second_start)
    resumed_epoch = int(started[1]["resumed_from"].rsplit("-epoch-", 1)[1])
    assert resumed_epoch >= recorded_before
    second_attempt_epochs = {e["data"]["epoch"] for e in events if e["type"] == "metric" and e["data"]["attempt"] == 2}
    assert second_attempt_epochs and min(second_attempt_epochs) == resumed_epoch + 1


def test_killed_trainer_is_requeued_and_resumes(tmp_path, tiny_model_path):
    # Cold trainers here (the other tests use the default warm pool), so both start paths are run.
    server = start_server(tmp_path, tiny_model_path, extra_env={"POSTTRAIN_WARM_TRAINERS": "0"})
    try:
        job_uuid = _submit_long_job(server)
        running = server.wait_for_job(job_uuid, lambda s: s["status"] == "in_progress" and s["checkpoints"])
        os.kill(running["resources_allocated"]["pid"], signal.SIGKILL)
        _assert_resumed_and_complete(server, job_uuid)
        states = [e["data"] for e in _events(server, job_uuid) if e["type"] == "state"]
        assert any(s["status"] == "scheduled" and "exited" in s.get("reason", "") for s in states)
    finally:
        stop_server(server)


def test_killed_server_restarts_and_the_job_resumes(tmp_path, tiny_model_path):
    server = start_server(tmp_path, tiny_model_path)
    job_uuid = _submit_long_job(server)
    waiting = lora_request(str(tiny_model_path), "colours")
    assert server.post("/v1/post-training/supervised-fine-tune", json=waiting).status_code == 200
    running = server.wait_for_job(job_uuid, lambda s: s["status"] == "in_progress" and s["checkpoints"])
    trainer_pid = running["resources_allocated"]["pid"]
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    # The orphaned trainer notices its launcher is gone (stdin closed) and stops by itself.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(trainer_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the trainer outlived its launcher")

    restarted = start_server(tmp_path, tiny_model_path)
    try:
        listed = {j["job_uuid"] for j in restarted.get("/v1/post-training/jobs").json()["data"]}
        assert {job_uuid, waiting["job_uuid"]} <= listed
        assert restarted.get("/v1/datasets/colours").status_code == 200
        _assert_resumed_and_complete(restarted, job_uuid)
        # The job that was waiting still runs.
        assert restarted.wait_for_job(waiting["job_uuid"], lambda s: s["status"] == "completed", timeout=120)
    finally:
        stop_server(restarted)


STEPS_IN_EPOCH = 60


def test_trainer_killed_mid_epoch_resumes_from_its_resume_point(tmp_path, tiny_model_path):
    """With resume points on (every ~step here), a trainer killed before its first checkpoint
    loses no trained step: the next attempt continues the same epoch after the last resume point."""
    server = start_server(tmp_path, tiny_model_path, extra_env={"POSTTRAIN_RESUME_POINT_SECONDS": "0.001"})
    try:
        server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "colours",
                                          "source": {"type": "rows", "rows": colour_rows(repeat=20)}})
        body = lora_request(str(server.tiny_model_path), "colours")
        # Steps take milliseconds and metric events reach the store in batches: enough steps that the
        # kill lands mid-epoch on a busy machine too (with 24, one run finished before the kill).
        body["training_config"].update(n_epochs=1, max_steps_per_epoch=STEPS_IN_EPOCH)
        assert server.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
        job_uuid = body["job_uuid"]

        def step_three_or_later(_status) -> bool:
            metrics = [e for e in _events(server, job_uuid) if e["type"] == "metric"]
            return bool(metrics) and metrics[-1]["data"]["step"] >= 3

        running = server.wait_for_job(job_uuid, step_three_or_later)
        os.kill(running["resources_allocated"]["pid"], signal.SIGKILL)
        final = server.wait_for_job(job_uuid, lambda s: s["status"] in ("completed", "failed", "cancelled"), timeout=180)
        assert final["status"] == "completed", final
        assert [c["epoch"] for c in final["checkpoints"]] == [1]

        events = _events(server, job_uuid)
        started = [e["data"] for e in events if e["type"] == "started"]
        assert len(started) == 2 and started[0]["resumed_from"] is None
        resumed_step = int(started[1]["resumed_from"].rsplit("-step-", 1)[1])
        first_attempt = [e["data"]["step"] for e in events if e["type"] == "metric" and e["data"]["attempt"] == 1]
        second_attempt = [e["data"]["step"] for e in events if e["type"] == "metric" and e["data"]["attempt"] == 2]
        assert 2 <= resumed_step <= max(first_attempt)
        assert second_attempt == list(range(resumed_step + 1, STEPS_IN_EPOCH + 1))
    finally:
        stop_server(server)
