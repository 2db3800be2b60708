"""A real ``posttrain serve`` process with its local worker trains a tiny model over HTTP.

Nothing is faked: the server runs in its own process, each job in a trainer child process, and
the checkpoints it reports are loaded with transformers + peft and generate text.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from datetime import datetime

import pytest

from posttrain.demo import colour_rows
from tests.conftest import cpu_dtype_for_bf16
from tests.integration.test_api import lora_request
from tests.spec import validate_response

pytestmark = pytest.mark.slow


def _at(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def _wait_for(server, job_uuid: str, statuses: set[str], timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = server.get("/v1/post-training/job/status", params={"job_uuid": job_uuid})
        body = response.json()
        if body["status"] in statuses:
            validate_response(response, "/v1/post-training/job/status")
            return body
        time.sleep(0.3)
    raise AssertionError(f"job {job_uuid} still {body['status']} after {timeout} s")


@pytest.fixture(scope="module")
def colours(live_server) -> str:
    response = live_server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "colours-e2e",
                                                      "source": {"type": "rows", "rows": colour_rows(repeat=4)}})
    assert response.status_code in (200, 409), response.text
    return "colours-e2e"


def test_lora_job_trains_reports_per_epoch_and_loads(live_server, colours):
    body = lora_request(str(live_server.tiny_model_path), colours)
    body["training_config"].update(n_epochs=3, max_steps_per_epoch=12, max_validation_steps=2)
    body["training_config"]["data_config"].update(batch_size=4, shuffle=True)
    body["training_config"]["optimizer_config"].update(lr=2e-2)
    body["algorithm_config"].update(rank=16, alpha=32, apply_lora_to_mlp=True, apply_lora_to_output=True)
    assert live_server.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    job_uuid = body["job_uuid"]

    final = _wait_for(live_server, job_uuid, {"completed", "failed", "cancelled"})
    assert final["status"] == "completed", final
    assert final["started_at"] >= final["scheduled_at"] and final["completed_at"] >= final["started_at"]
    resources = final["resources_allocated"]
    assert resources["device"] == "cpu" and resources["threads"] >= 1 and resources["requested_dtype"] == "bf16"
    assert resources["dtype"] == cpu_dtype_for_bf16()

    checkpoints = final["checkpoints"]
    assert [c["epoch"] for c in checkpoints] == [1, 2, 3]
    created = [_at(c["created_at"]) for c in checkpoints]
    assert created == sorted(created) and created[-1] <= _at(final["completed_at"])
    for c in checkpoints:
        m = c["training_metrics"]
        assert m["epoch"] == c["epoch"] and c["post_training_job_id"] == job_uuid
        assert math.isclose(m["perplexity"], math.exp(m["validation_loss"]), rel_tol=1e-6)
    # Per-step metrics and state changes, in order, from our events endpoint.
    events = live_server.get("/v1/post-training/job/events", params={"job_uuid": job_uuid}).json()
    metrics = [e["data"] for e in events["data"] if e["type"] == "metric"]
    # The toy task is learnable: validation loss falls epoch over epoch, and ends well below the
    # loss of the first step (the untrained model; epoch 1 alone may already learn most of it).
    losses = [c["training_metrics"]["validation_loss"] for c in checkpoints]
    assert losses[0] > losses[1] > losses[2] and losses[-1] < metrics[0]["loss"] - 2.0, (losses, metrics[0])
    # 32 rows in batches of 4 make 8 optimizer steps an epoch (max_steps_per_epoch=12 does not bind).
    assert [m["step"] for m in metrics] == list(range(1, 25))
    assert all(m["loss"] > 0 and m["tokens_per_s"] > 0 and m["total_steps"] == 24 for m in metrics)
    states = [e["data"]["status"] for e in events["data"] if e["type"] == "state"]
    assert states == ["scheduled", "in_progress", "completed"]
    # The first checkpoint was in the store while the job still trained (timestamps, not polling luck:
    # a tiny job can finish between two polls): later epochs' metrics were recorded after it.
    last_metric = max(_at(e["created_at"]) for e in events["data"] if e["type"] == "metric")
    assert created[0] < last_metric
    seqs = [e["seq"] for e in events["data"]]
    assert seqs == sorted(seqs) and events["next_cursor"] == seqs[-1]
    assert live_server.get("/v1/post-training/job/events", params={"job_uuid": job_uuid, "after": seqs[-1]}).json()["data"] == []

    artifacts = live_server.get("/v1/post-training/job/artifacts", params={"job_uuid": job_uuid})
    validate_response(artifacts, "/v1/post-training/job/artifacts")
    assert artifacts.json()["checkpoints"] == checkpoints

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    last = checkpoints[-1]["path"]
    tokenizer = AutoTokenizer.from_pretrained(last)
    base = AutoModelForCausalLM.from_pretrained(str(live_server.tiny_model_path))
    model = PeftModel.from_pretrained(base, last).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What colour is sky?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > prompt["input_ids"].shape[1]


def test_cancel_running_job_stops_its_trainer(live_server, colours):
    body = lora_request(str(live_server.tiny_model_path), colours)
    body["training_config"].update(n_epochs=200, max_steps_per_epoch=50)
    assert live_server.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    job_uuid = body["job_uuid"]
    running = _wait_for(live_server, job_uuid, {"in_progress"}, timeout=120)
    deadline = time.monotonic() + 60
    while "pid" not in running.get("resources_allocated", {}) and time.monotonic() < deadline:
        time.sleep(0.2)
        running = live_server.get("/v1/post-training/job/status", params={"job_uuid": job_uuid}).json()
    pid = running["resources_allocated"]["pid"]
    os.kill(pid, 0)  # the trainer process is alive

    assert live_server.post("/v1/post-training/job/cancel", json={"job_uuid": job_uuid}).status_code == 200
    assert _wait_for(live_server, job_uuid, {"cancelled"}, timeout=5)["status"] == "cancelled"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"trainer {pid} still running 10 s after cancel")
    time.sleep(2)
    assert live_server.get("/v1/post-training/job/status", params={"job_uuid": job_uuid}).json()["status"] == "cancelled"


def test_a_bad_row_fails_the_job_with_a_reason(live_server):
    dataset_id = f"bad-{uuid.uuid4().hex[:6]}"
    # A row in no known layout is refused where it is sent ...
    rows = colour_rows(repeat=1) + [{"nothing": "useful"}]
    refused = live_server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": dataset_id,
                                                     "source": {"type": "rows", "rows": rows}})
    assert refused.status_code == 400 and refused.json()["detail"].startswith("row 8: no known layout"), refused.text
    # ... one in a layout but with nothing to learn (no assistant turn) registers, and the job says why it fails.
    rows = colour_rows(repeat=1) + [{"messages": [{"role": "user", "content": "no answer"}]}]
    assert live_server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": dataset_id,
                                                  "source": {"type": "rows", "rows": rows}}).status_code == 200
    body = lora_request(str(live_server.tiny_model_path), dataset_id)
    assert live_server.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    final = _wait_for(live_server, body["job_uuid"], {"completed", "failed", "cancelled"}, timeout=120)
    assert final["status"] == "failed"
    # The reason, naming the row, is in the job's event log; the server stays up.
    events = live_server.get("/v1/post-training/job/events", params={"job_uuid": body["job_uuid"]}).json()
    (failure,) = [e["data"] for e in events["data"] if e["type"] == "state" and e["data"]["status"] == "failed"]
    assert failure["code"] == "bad_row" and "row 8" in failure["message"] and "no assistant" in failure["message"], failure
    assert live_server.get("/v1/health").json() == {"status": "OK"}


def test_event_stream_pushes_events_live_until_the_job_ends(live_server, colours):
    import httpx

    body = lora_request(str(live_server.tiny_model_path), colours)
    body["training_config"].update(n_epochs=2, max_steps_per_epoch=3)
    assert live_server.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    received: list[tuple[str, dict]] = []
    with httpx.stream("GET", live_server.base_url + "/v1/post-training/job/events", params={"job_uuid": body["job_uuid"]},
                      headers={"Accept": "text/event-stream"}, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                received.append((kind, json.loads(line.removeprefix("data: "))))
    kinds = [k for k, _ in received]
    assert kinds[-1] == "end" and received[-1][1] == {"status": "completed"}
    assert kinds.count("metric") == 6 and kinds.count("checkpoint") == 2


def test_preference_optimization_runs_end_to_end(live_server):
    from tests.integration.test_api import dpo_request

    rows = [{"prompt": f"What colour is {thing}?", "chosen": answer, "rejected": "I do not know."}
            for thing, answer in __import__("posttrain.demo", fromlist=["COLOURS"]).COLOURS.items()]
    dataset_id = f"prefs-{uuid.uuid4().hex[:6]}"
    assert live_server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": dataset_id,
                                                  "source": {"type": "rows", "rows": rows}}).status_code == 200
    body = dpo_request(str(live_server.tiny_model_path), dataset_id, beta=0.5, loss_type="sigmoid")
    body["training_config"].update(n_epochs=2, max_steps_per_epoch=4)
    body["training_config"]["data_config"].update(batch_size=2)
    assert live_server.post("/v1/post-training/preference-optimize", json=body).status_code == 200
    final = _wait_for(live_server, body["job_uuid"], {"completed", "failed", "cancelled"}, timeout=180)
    assert final["status"] == "completed", final
    assert [c["epoch"] for c in final["checkpoints"]] == [1, 2]
    events = live_server.get("/v1/post-training/job/events", params={"job_uuid": body["job_uuid"]}).json()["data"]
    margins = [e["data"]["reward_margin"] for e in events if e["type"] == "metric"]
    assert len(margins) == 8 and margins[-1] > margins[0]


def test_dpo_starts_from_the_callers_own_sft_checkpoint(live_server, colours):
    """SFT, then DPO on what it produced: finetuned_model may name one of the caller's own
    checkpoints by path (as the status endpoint gives it) or by identifier, though the server's job
    folders are not among the model roots."""
    from tests.integration.test_api import dpo_request

    sft = lora_request(str(live_server.tiny_model_path), colours)
    assert live_server.post("/v1/post-training/supervised-fine-tune", json=sft).status_code == 200
    trained = _wait_for(live_server, sft["job_uuid"], {"completed", "failed", "cancelled"})
    assert trained["status"] == "completed", trained
    checkpoint = trained["checkpoints"][-1]
    rows = [{"prompt": r["input_query"], "chosen": r["expected_answer"], "rejected": "I do not know."}
            for r in colour_rows(repeat=1)]
    dataset_id = f"prefs-{uuid.uuid4().hex[:6]}"
    assert live_server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": dataset_id,
                                                  "source": {"type": "rows", "rows": rows}}).status_code == 200
    by_path = dpo_request(checkpoint["path"], dataset_id)
    by_identifier = dpo_request(checkpoint["identifier"], dataset_id)
    for body in (by_path, by_identifier):
        answer = live_server.post("/v1/post-training/preference-optimize", json=body)
        assert answer.status_code == 200, answer.text
    final = _wait_for(live_server, by_path["job_uuid"], {"completed", "failed", "cancelled"}, timeout=180)
    assert final["status"] == "completed", final
    events = live_server.get("/v1/post-training/job/events", params={"job_uuid": by_path["job_uuid"]}).json()["data"]
    (started,) = [e["data"] for e in events if e["type"] == "started"]
    assert started["resources"]["merged_adapter"] == checkpoint["path"]
    live_server.post("/v1/post-training/job/cancel", json={"job_uuid": by_identifier["job_uuid"]})
    # Somebody else's path, or a made-up identifier, is still refused.
    assert live_server.post("/v1/post-training/preference-optimize",
                            json=dpo_request(checkpoint["identifier"] + "-nope", dataset_id)).status_code == 400
