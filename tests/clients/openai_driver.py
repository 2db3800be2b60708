#!/usr/bin/env python3
"""Drive a posttrain server with an official ``openai`` SDK release, code written as for OpenAI.

Standalone on purpose: it imports only ``openai`` and the standard library, and runs inside one of
the venvs ``scripts/setup-openai-venvs`` creates under ``.venv-openai/<version>/``::

    .venv-openai/3.57.0/bin/python tests/clients/openai_driver.py \
        --base-url http://127.0.0.1:8321 --model tiny-llama --scenario lifecycle

Scenarios: ``lifecycle`` (upload, create, poll to succeeded, events, checkpoints, list with a
metadata filter, cancel a second job, delete the file), ``dpo`` (preference rows trained to
succeeded) and ``errors`` (the SDK's own exception
classes, with OpenAI's ``param`` and ``code``). The last stdout line is a JSON summary
``{"ok": true, "version": ..., ...}``; on failure the traceback goes to stderr and the exit
status is 1. The only thing that differs from code written for OpenAI is ``base_url``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import traceback

import openai
from openai import OpenAI

ROWS = [{"messages": [{"role": "system", "content": "You name colours."},
                      {"role": "user", "content": f"What colour is thing {i}?"},
                      {"role": "assistant", "content": ["red", "green", "blue"][i % 3]}]} for i in range(8)]
POLL_SECONDS = 240


def training_file(client: OpenAI):
    data = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
    return client.files.create(file=("colours.jsonl", io.BytesIO(data)), purpose="fine-tune")


def lifecycle(client: OpenAI, model: str) -> dict:
    uploaded = training_file(client)
    assert uploaded.id.startswith("file-") and uploaded.purpose == "fine-tune" and uploaded.bytes > 0, uploaded
    assert client.files.retrieve(uploaded.id).filename == "colours.jsonl"
    assert client.files.content(uploaded.id).content.decode().splitlines()[0] == json.dumps(ROWS[0])
    assert uploaded.id in [f.id for f in client.files.list(purpose="fine-tune")]

    job = client.fine_tuning.jobs.create(
        model=model, training_file=uploaded.id, suffix="colours", seed=3, metadata={"run": "sdk"},
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 2}}})
    assert job.status in ("validating_files", "queued", "running"), job
    assert job.hyperparameters.n_epochs == 1 and job.method.type == "supervised", job
    deadline = time.monotonic() + POLL_SECONDS
    while job.status not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise AssertionError(f"job still {job.status} after {POLL_SECONDS} s")
        time.sleep(1)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job
    assert job.fine_tuned_model and job.fine_tuned_model.startswith(f"ft:{model}:colours:"), job
    assert job.finished_at and job.trained_tokens and job.trained_tokens > 0, job

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and metrics[0].data["train_loss"] is not None, events
    assert events[0].created_at >= events[-1].created_at, "events come newest first"
    page = client.fine_tuning.jobs.list_events(job.id, limit=1)
    assert len(page.data) == 1 and page.has_more

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert len(checkpoints) == 1 and checkpoints[0].step_number >= 1, checkpoints
    assert checkpoints[0].metrics.train_loss is not None, checkpoints

    listed = client.fine_tuning.jobs.list(metadata={"run": "sdk"})
    assert [j.id for j in listed.data] == [job.id], listed

    second = client.fine_tuning.jobs.create(model=model, training_file=uploaded.id,
                                            hyperparameters={"n_epochs": 50})
    cancelled = client.fine_tuning.jobs.cancel(second.id)
    assert cancelled.status == "cancelled", cancelled

    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    return {"job": job.id, "status": job.status, "events": len(events), "checkpoints": len(checkpoints)}


def dpo(client: OpenAI, model: str) -> dict:
    rows = [{"input": {"messages": [{"role": "user", "content": f"What colour is thing {i}?"}]},
             "preferred_output": [{"role": "assistant", "content": "blue"}],
             "non_preferred_output": [{"role": "assistant", "content": "I will not say"}]} for i in range(6)]
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    uploaded = client.files.create(file=("prefs.jsonl", io.BytesIO(data)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=model, training_file=uploaded.id, method={
        "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 3}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2, job
    deadline = time.monotonic() + POLL_SECONDS
    while job.status not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise AssertionError(f"job still {job.status} after {POLL_SECONDS} s")
        time.sleep(1)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert len(checkpoints) == 1, checkpoints
    return {"job": job.id, "status": job.status, "checkpoints": len(checkpoints)}


def errors(client: OpenAI, model: str) -> dict:
    seen = {}
    try:
        client.files.retrieve("file-doesnotexist")
    except openai.NotFoundError as exc:
        seen["missing_file"] = exc.code
    uploaded = training_file(client)
    try:
        client.files.create(file=("b.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    except openai.BadRequestError as exc:
        seen["bad_purpose"] = exc.param
    try:
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=uploaded.id)
    except openai.NotFoundError as exc:
        seen["unknown_model"] = exc.code
    try:
        client.fine_tuning.jobs.create(model=model, training_file=uploaded.id, hyperparameters={"n_epochs": 0})
    except openai.BadRequestError as exc:
        seen["bad_epochs"] = exc.param
    try:
        client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
    except openai.NotFoundError as exc:
        seen["missing_job"] = exc.code
    expected = {"missing_file": "file_not_found", "bad_purpose": "purpose", "unknown_model": "model_not_found",
                "bad_epochs": "hyperparameters.n_epochs", "missing_job": "fine_tuning_job_not_found"}
    assert seen == expected, seen
    client.files.delete(uploaded.id)
    return {"errors": seen}


SCENARIOS = {"lifecycle": lifecycle, "dpo": dpo, "errors": errors}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key="unused-on-an-open-server", max_retries=0)
    summary = {"version": openai.__version__, "scenario": args.scenario}
    try:
        result = SCENARIOS[args.scenario](client, args.model)
    except Exception:  # noqa: BLE001 - any failure is reported as the summary line
        traceback.print_exc()
        print(json.dumps({**summary, "ok": False}))
        return 1
    print(json.dumps({**summary, "ok": True, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
