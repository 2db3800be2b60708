"""An OpenAI reinforcement job on a real ``posttrain serve`` with its local worker: the file is
uploaded, the job created over HTTP, trained by a GRPO trainer process to the end, and its events
carry the rewards the grader gave."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.slow

LINES = "".join(json.dumps({"messages": [{"role": "user", "content": f"Pick a colour for thing {i}."}],
                            "answer": "red"}) + "\n" for i in range(2)).encode()
GRADER = {"type": "string_check", "name": "is_red", "input": "{{sample.output_text}}",
          "reference": "{{item.answer}}", "operation": "like"}


def test_an_openai_reinforcement_job_trains_to_the_end(live_server):
    uploaded = live_server.post("/v1/files", files={"file": ("rft.jsonl", LINES, "application/jsonl")},
                                data={"purpose": "fine-tune"})
    assert uploaded.status_code == 200, uploaded.text
    created = live_server.post("/v1/fine_tuning/jobs", json={
        "model": live_server.tiny_model_path.name, "training_file": uploaded.json()["id"],
        "method": {"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {
            "n_epochs": 1, "batch_size": 2, "compute_multiplier": 0.5, "eval_interval": 1, "eval_samples": 1}}}})
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    deadline, job = time.monotonic() + 540, created.json()
    while time.monotonic() < deadline and job["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
        job = live_server.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    if job["status"] != "succeeded":
        events = live_server.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
        raise AssertionError(f"{job}\n{[e['message'] for e in events]}")
    assert job["method"]["type"] == "reinforcement"
    events = live_server.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    assert [m["step"] for m in metrics] == [1]  # two lines, batches of two: one step
    assert 0 <= metrics[0]["reward_mean"] <= 1 and metrics[0]["completion_length"] >= 1
    assert 0 <= metrics[0]["valid_reward_mean"] <= 1
    checkpoints = live_server.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert len(checkpoints) == 1
