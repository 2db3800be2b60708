"""Training a tiny model on a mapping it can learn in seconds, for the tests that then chat with it.

Four one-word answers, each prompt asked many times, fully fine-tuned through the Llama Stack API
(its learning rate and steps are not bounded like the OpenAI door's multiplier): greedy decoding of
the result answers each prompt with its word, while the random base model answers noise.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

#: The API keys of the two tenants of ``keyed_app``.
ALICE, BOB = "pt-alice-key", "pt-bob-key"

#: prompt -> the answer the fine-tuned model gives under greedy decoding.
PAIRS = {"apple": "red", "sea": "blue", "leaves": "green", "snow": "white"}
#: Unshuffled batches of four: every step sees each pair once (32 steps in all).
REPEAT, EPOCHS, BATCH_SIZE, LEARNING_RATE = 8, 4, 4, 5e-3


def train_mapping(base_url: str, model_path: Path, *, headers: dict[str, str] | None = None,
                  pairs: dict[str, str] = PAIRS, timeout_s: float = 300) -> dict[str, Any]:
    """Register ``pairs`` as a dialog dataset, fully fine-tune the tiny model on it and wait until
    the job completes; returns its ``job_uuid``, ``fine_tuned_model`` (the OpenAI id) and the last
    checkpoint's Llama Stack ``identifier``."""
    with httpx.Client(base_url=base_url, headers=headers or {}, timeout=60) as http:
        job_uuid = submit_mapping(http, model_path, pairs)
        return wait_for_mapping(http, job_uuid, timeout_s=timeout_s)


def submit_mapping(http: httpx.Client, model_path: Path, pairs: dict[str, str], *, repeat: int = REPEAT,
                   epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, learning_rate: float = LEARNING_RATE,
                   algorithm_config: dict[str, Any] | None = None) -> str:
    """Register ``pairs`` (``repeat`` times over) as a dialog dataset and submit a supervised
    fine-tune of the tiny model on it (every weight, or ``algorithm_config``'s LoRA); returns the job's uuid."""
    dataset = f"mapping-{uuid.uuid4().hex[:8]}"
    rows = [{"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
            for prompt, answer in pairs.items()] * repeat
    registered = http.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": dataset,
                                                 "source": {"type": "rows", "rows": rows}})
    assert registered.status_code == 200, registered.text
    job_uuid = str(uuid.uuid4())
    body: dict[str, Any] = {
        "job_uuid": job_uuid, "model": str(model_path), "hyperparam_search_config": {}, "logger_config": {},
        "training_config": {
            "n_epochs": epochs, "max_steps_per_epoch": 10_000, "gradient_accumulation_steps": 1,
            "data_config": {"dataset_id": dataset, "batch_size": batch_size, "shuffle": False,
                            "data_format": "dialog"},
            "optimizer_config": {"optimizer_type": "adamw", "lr": learning_rate, "weight_decay": 0.0,
                                 "num_warmup_steps": 0}}}
    if algorithm_config is not None:
        body["algorithm_config"] = algorithm_config
    submitted = http.post("/v1/post-training/supervised-fine-tune", json=body)
    assert submitted.status_code == 200, submitted.text
    return job_uuid


def wait_for_mapping(http: httpx.Client, job_uuid: str, *, timeout_s: float = 300) -> dict[str, Any]:
    """Wait until the job completes; its ``job_uuid``, ``fine_tuned_model`` (the OpenAI id), and the
    last checkpoint's Llama Stack ``identifier`` and folder (``checkpoint_path``)."""
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
            "checkpoint": status["checkpoints"][-1]["identifier"], "checkpoint_path": status["checkpoints"][-1]["path"]}


def worker_stats(home: Path) -> dict[str, Any]:
    """The serving worker's own accounting, asked on its socket (a server started with ``home``)."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(home / "serving" / "worker.sock")),
                      base_url="http://serving", timeout=10) as worker:
        stats: dict[str, Any] = worker.get("/stats").json()
        return stats


def keyed_app(settings: Any, tmp_path: Path) -> Iterator[Any]:
    """The real app (a FastAPI TestClient) with API keys for alice and bob; ``client.services`` is
    its services. The body of the conftest's ``keyed_client`` fixture."""
    from fastapi.testclient import TestClient

    from posttrain.api.app import create_app
    from posttrain.services.access import digest
    from posttrain.services.container import build_services

    keys = tmp_path / "keys"
    keys.write_text(f"alice:{digest(ALICE)}\nbob:{digest(BOB)}\n")
    settings.api_keys_file = keys
    services = build_services(settings)
    try:
        with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
            client.services = services  # type: ignore[attr-defined]
            yield client
    finally:
        services.close()
