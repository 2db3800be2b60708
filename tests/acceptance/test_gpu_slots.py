"""One job per GPU: with two GPU ids and three slots, two jobs run, each trainer seeing only its
own GPU (CUDA_VISIBLE_DEVICES), and the third waits until one of them gives its GPU back. On a
machine without CUDA the trainers train on the CPU, which is enough to check the hand-out."""

from __future__ import annotations

import json

import pytest

from posttrain.demo import colour_rows
from tests.conftest import start_server, stop_server
from tests.integration.test_api import lora_request

pytestmark = pytest.mark.slow


def test_each_running_job_holds_one_gpu(tmp_path, tiny_model_path):
    server = start_server(tmp_path, tiny_model_path, extra_env={
        "POSTTRAIN_GPUS": json.dumps(["7", "8"]), "POSTTRAIN_WORKER_SLOTS": "3", "POSTTRAIN_DEVICE": "auto"})
    try:
        server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "colours",
                                          "source": {"type": "rows", "rows": colour_rows(repeat=8)}})
        jobs = []
        for _ in range(3):
            body = lora_request(str(server.tiny_model_path), "colours")
            body["training_config"].update(n_epochs=50, max_steps_per_epoch=32)
            assert server.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
            jobs.append(body["job_uuid"])

        def running() -> dict[str, str]:
            statuses = {j: server.job_status(j) for j in jobs}
            return {j: s["resources_allocated"].get("cuda_visible_devices") for j, s in statuses.items()
                    if s["status"] == "in_progress" and s.get("resources_allocated")}

        server.wait_for_job(jobs[0], lambda _: len(running()) == 2, timeout=120)
        holders = running()
        assert sorted(holders.values()) == ["7", "8"]
        (waiting,) = set(jobs) - set(holders)
        assert server.job_status(waiting)["status"] == "scheduled", "a third job ran with no GPU free"

        released, gpu = next(iter(holders.items()))
        assert server.post("/v1/post-training/job/cancel", json={"job_uuid": released}).status_code == 200
        server.wait_for_job(waiting, lambda s: s["status"] == "in_progress" and s.get("resources_allocated"), timeout=120)
        assert running()[waiting] == gpu
    finally:
        for job in jobs:
            server.post("/v1/post-training/job/cancel", json={"job_uuid": job})
        stop_server(server)
