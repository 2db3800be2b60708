"""A reinforcement job through our own endpoint on a real ``posttrain serve`` process: the real GRPO
trainer runs it on a tiny model, its reward numbers arrive on the SSE events stream, and the Llama
Stack status shows its checkpoint like any other job's."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import httpx
import pytest

from tests.acceptance.test_serve_end_to_end import _wait_for
from tests.integration.test_reinforcement_endpoint import PATH, rft_request

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

ROWS = [{"messages": [{"role": "user", "content": "Pick a colour."}], "answer": colour}
        for colour in ("red", "blue", "red", "green")]


def test_a_reinforcement_job_streams_its_rewards_and_has_checkpoints(live_server):
    suffix = uuid.uuid4().hex[:6]
    for name in ("train", "valid"):
        response = live_server.post("/v1/datasets", json={"purpose": "post-training/messages",
                                                          "dataset_id": f"rft-{name}-{suffix}",
                                                          "source": {"type": "rows", "rows": ROWS}})
        assert response.status_code == 200, response.text
    body = rft_request(str(live_server.tiny_model_path), f"rft-train-{suffix}",
                       grpo={"num_generations": 2, "beta": 0.04, "max_completion_length": 4, "eval_interval": 1,
                             "eval_samples": 1})
    body["training_config"]["data_config"]["validation_dataset_id"] = f"rft-valid-{suffix}"
    assert live_server.post(PATH, json=body).status_code == 200
    received: list[tuple[str | None, dict]] = []
    with httpx.stream("GET", live_server.base_url + "/v1/post-training/job/events", params={"job_uuid": body["job_uuid"]},
                      headers={"Accept": "text/event-stream"}, timeout=300) as response:
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                received.append((kind, json.loads(line.removeprefix("data: "))))
    assert received[-1] == ("end", {"status": "completed"}), received[-3:]
    metrics = [event["data"] for kind, event in received if kind == "metric"]
    assert [m["step"] for m in metrics] == [1, 2]
    for metric in metrics:
        assert 0 <= metric["reward_mean"] <= 1 and metric["reward_std"] >= 0 and 0 <= metric["reward/is_red"] <= 1
        assert sorted(metric) and metric["kl"] >= 0 and metric["completion_length"] > 0 and "valid_reward_mean" in metric
    final = _wait_for(live_server, body["job_uuid"], {"completed", "failed", "cancelled"})
    assert final["status"] == "completed" and [c["epoch"] for c in final["checkpoints"]] == [1]
    (checkpoint,) = final["checkpoints"]
    # training_metrics in the spec's shape (_wait_for validated the body against the spec): the epoch's
    # mean GRPO loss, the negated end-of-epoch validation reward, and the policy's perplexity of its
    # own validation completions (docs/trainer-protocol.md), read back from the checkpoint's own state.
    assert checkpoint["path"].endswith("epoch_1")
    training = checkpoint["training_metrics"]
    assert sorted(training) == ["epoch", "perplexity", "train_loss", "validation_loss"] and training["epoch"] == 1
    assert training["train_loss"] == pytest.approx(sum(m["loss"] for m in metrics) / 2)
    state = json.loads((Path(checkpoint["path"]) / "trainer_state.json").read_text())["validation"]
    assert training["validation_loss"] == pytest.approx(-state["validation_reward_mean"])
    assert -1 <= training["validation_loss"] <= 0
    assert training["perplexity"] == pytest.approx(math.exp(state["validation_completion_nll"])) and \
        training["perplexity"] >= 1

    # OpenAI's views of the same job carry the rewards too.
    (opened,) = live_server.get(f"/v1/fine_tuning/jobs/{body['job_uuid']}/checkpoints").json()["data"]
    epoch_mean = sum(m["reward_mean"] for m in metrics) / 2
    assert opened["metrics"]["train_reward_mean"] == pytest.approx(epoch_mean)
    assert opened["metrics"]["valid_reward_mean"] == metrics[-1]["valid_reward_mean"]
    events = live_server.get(f"/v1/fine_tuning/jobs/{body['job_uuid']}/events", params={"limit": 100}).json()["data"]
    steps = [e["data"] for e in events if e["type"] == "metrics"]
    assert sorted(s["step"] for s in steps) == [1, 2] and all("reward_mean" in s and "kl" in s for s in steps)
