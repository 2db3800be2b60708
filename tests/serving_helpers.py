"""Training a tiny model on a mapping it can learn in seconds, for the tests that then chat with it.

Four one-word answers, each prompt asked many times, fully fine-tuned through the Llama Stack API
(its learning rate and steps are not bounded like the OpenAI door's multiplier): greedy decoding of
the result answers each prompt with its word, while the random base model answers noise.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx

#: prompt -> the answer the fine-tuned model gives under greedy decoding.
PAIRS = {"apple": "red", "sea": "blue", "leaves": "green", "snow": "white"}
#: Unshuffled batches of four: every step sees each pair once (32 steps in all).
REPEAT, EPOCHS, BATCH_SIZE, LEARNING_RATE = 8, 4, 4, 5e-3


def train_mapping(base_url: str, model_path: Path, *, headers: dict[str, str] | None = None,
                  pairs: dict[str, str] = PAIRS, timeout_s: float = 300) -> dict[str, Any]:
    """Register ``pairs`` as a dialog dataset, fully fine-tune the tiny model on it and wait until
    the job completes; returns its ``job_uuid``, ``fine_tuned_model`` (the OpenAI id) and the last
    checkpoint's Llama Stack ``identifier``."""
    http = httpx.Client(base_url=base_url, headers=headers or {}, timeout=60)
    dataset = f"mapping-{uuid.uuid4().hex[:8]}"
    rows = [{"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
            for prompt, answer in pairs.items()] * REPEAT
    registered = http.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": dataset,
                                                 "source": {"type": "rows", "rows": rows}})
    assert registered.status_code == 200, registered.text
    job_uuid = str(uuid.uuid4())
    body = {"job_uuid": job_uuid, "model": str(model_path), "hyperparam_search_config": {}, "logger_config": {},
            "training_config": {
                "n_epochs": EPOCHS, "max_steps_per_epoch": 10_000, "gradient_accumulation_steps": 1,
                "data_config": {"dataset_id": dataset, "batch_size": BATCH_SIZE, "shuffle": False,
                                "data_format": "dialog"},
                "optimizer_config": {"optimizer_type": "adamw", "lr": LEARNING_RATE, "weight_decay": 0.0,
                                     "num_warmup_steps": 0}}}
    submitted = http.post("/v1/post-training/supervised-fine-tune", json=body)
    assert submitted.status_code == 200, submitted.text
    deadline = time.monotonic() + timeout_s
    while True:
        status = http.get("/v1/post-training/job/status", params={"job_uuid": job_uuid}).json()
        if status["status"] in ("completed", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, f"the job is still {status['status']} after {timeout_s} s"
        time.sleep(0.5)
    assert status["status"] == "completed", status
    job = http.get(f"/v1/fine_tuning/jobs/{job_uuid}").json()
    return {"job_uuid": job_uuid, "fine_tuned_model": job["fine_tuned_model"],
            "checkpoint": status["checkpoints"][-1]["identifier"]}
