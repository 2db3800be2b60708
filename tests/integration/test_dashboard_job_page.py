"""The job page through the real app: the two losses it shows are labelled for what they are.

The summary shows the last step's loss (the latest ``metric`` event); the checkpoints table shows
each epoch's mean train loss (what a ``checkpoint`` event carries). They differ, so they must not
share the label "Train loss". The test plays the worker: it claims the job and records events
through the real job store, as the worker's launcher does.
"""

from __future__ import annotations

import re

from tests.integration.test_api import ROWS, lora_request

STEP_LOSSES = (2.5, 1.25)  # epoch mean 1.875


def _running_job(client, services, tiny_model_path) -> str:
    registered = client.post("/v1/datasets", json={
        "purpose": "post-training/messages", "dataset_id": "colours", "source": {"type": "rows", "rows": ROWS}})
    assert registered.status_code == 200
    body = lora_request(str(tiny_model_path), "colours")
    assert client.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    store = services.jobs.store
    job = store.claim_next(owner="test-worker", lease_seconds=60)
    assert job is not None and job.job_uuid == body["job_uuid"]
    store.append_events(job_id=job.id, owner="test-worker", attempt=job.attempt, events=[
        ("metric", {"step": step, "epoch": 1, "loss": loss, "total_steps": len(STEP_LOSSES)})
        for step, loss in enumerate(STEP_LOSSES, start=1)])
    store.record_checkpoint(job_id=job.id, owner="test-worker", attempt=job.attempt, identifier=f"{job.job_uuid}-epoch-1",
                            epoch=1, step=2, path="/tmp/ckpt", train_loss=sum(STEP_LOSSES) / len(STEP_LOSSES),
                            validation_loss=None, perplexity=None)  # raises LeaseLost unless it lands
    return body["job_uuid"]


def test_the_job_page_labels_last_step_loss_and_epoch_mean_apart(client, services, tiny_model_path):
    job_uuid = _running_job(client, services, tiny_model_path)

    page = client.get(f"/ui/jobs/{job_uuid}")
    assert page.status_code == 200
    html = page.text
    assert '<dt>Last step loss</dt><dd id="last-step-loss">1.2500</dd>' in html  # not the mean, 1.8750
    assert "<th>Train loss (epoch mean)</th>" in html
    assert not re.search(r">\s*Train loss\s*<", html), "a bare 'Train loss' label is ambiguous"

    # The script that updates the page live writes the last metric event's loss into the same
    # element, and the checkpoint rows' train_loss (the epoch mean) under the table's header.
    script = client.get("/ui/static/dashboard.js").text
    assert '$("last-step-loss").textContent = fmt(latest.loss)' in script
    assert "latest-loss" not in script
    events = client.get("/v1/post-training/job/events", params={"job_uuid": job_uuid}).json()["data"]
    checkpoint = next(e["data"] for e in events if e["type"] == "checkpoint")
    assert checkpoint["train_loss"] == 1.875

    # The jobs list says which loss it shows too, and its JSON carries the same number.
    jobs = client.get("/").text
    assert "<th>Last step loss</th>" in jobs and "<td>1.2500</td>" in jobs
    summary = client.get("/v1/posttrain/jobs").json()["data"]
    assert [(s["job_uuid"], s["loss"], s["step"], s["checkpoints"]) for s in summary] == [(job_uuid, 1.25, 2, 1)]
