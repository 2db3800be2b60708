#!/usr/bin/env python3
"""Drive a posttrain server with an official ``openai`` SDK release, code written as for OpenAI.

Standalone on purpose: it imports only ``openai`` and the standard library, and runs inside one of
the venvs ``scripts/setup-openai-venvs`` creates under ``.venv-openai/<version>/``::

    .venv-openai/3.57.0/bin/python tests/clients/openai_driver.py \
        --base-url http://127.0.0.1:8321 --model tiny-llama --scenario lifecycle

Scenarios: ``lifecycle`` (upload, create, poll to succeeded, events, checkpoints, list with a
metadata filter, cancel a second job, delete the file), ``dpo`` (preference rows trained to
succeeded), ``pause`` (pause a running job, see it ``pausing`` then ``paused``, resume it and
train it to succeeded; its checkpoints' token accuracies and validation metrics, its metrics
events), ``errors`` (the SDK's own exception classes, with OpenAI's ``param`` and ``code``), ``models``
(``client.models`` list/retrieve/delete on what a job trained) and ``chat`` (chat, plain and
streamed, and completions on a model fine-tuned on ``--pairs``, against its ``--base``).
The last stdout line is a JSON summary ``{"ok": true, "version": ..., ...}``; on failure the
traceback goes to stderr and the exit status is 1. The only thing that differs from code written for OpenAI is ``base_url``.
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


def training_file(client: OpenAI, *, repeat: int = 1):
    data = "".join(json.dumps(row) + "\n" for row in ROWS * repeat).encode()
    return client.files.create(file=("colours.jsonl", io.BytesIO(data)), purpose="fine-tune")


def lifecycle(client: OpenAI, model: str) -> dict:
    uploaded = training_file(client)
    assert uploaded.id.startswith("file-") and uploaded.purpose == "fine-tune" and uploaded.bytes > 0, uploaded
    assert client.files.retrieve(uploaded.id).filename == "colours.jsonl"
    assert client.files.content(uploaded.id).content.decode().splitlines()[0] == json.dumps(ROWS[0])
    assert uploaded.id in [f.id for f in client.files.list(purpose="fine-tune")]

    run = f"sdk-{openai.__version__}-{time.time_ns()}"  # the server is shared by every scenario and release
    job = client.fine_tuning.jobs.create(
        model=model, training_file=uploaded.id, suffix="colours", seed=3, metadata={"run": run},
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 2}}})
    assert job.status in ("validating_files", "queued", "running"), job
    assert job.hyperparameters.n_epochs == 1 and job.method.type == "supervised", job
    job = wait_for(client, job, ("succeeded", "failed", "cancelled"))
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
    assert_accuracy(checkpoints[0].metrics.train_mean_token_accuracy)
    assert all(0.0 <= e.data["train_mean_token_accuracy"] <= 1.0 for e in metrics), metrics

    listed = client.fine_tuning.jobs.list(metadata={"run": run})
    assert [j.id for j in listed.data] == [job.id], listed

    second = client.fine_tuning.jobs.create(model=model, training_file=uploaded.id,
                                            hyperparameters={"n_epochs": 50})
    cancelled = client.fine_tuning.jobs.cancel(second.id)
    assert cancelled.status == "cancelled", cancelled

    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    return {"job": job.id, "status": job.status, "events": len(events), "checkpoints": len(checkpoints)}


def assert_accuracy(value) -> None:
    assert isinstance(value, float) and 0.0 <= value <= 1.0, value


def wait_for(client: OpenAI, job, statuses: tuple[str, ...], *, poll: float = 1.0):
    deadline = time.monotonic() + POLL_SECONDS
    while job.status not in statuses:
        if time.monotonic() > deadline:
            raise AssertionError(f"job still {job.status} after {POLL_SECONDS} s, waiting for {statuses}")
        time.sleep(poll)
        job = client.fine_tuning.jobs.retrieve(job.id)
    return job


#: The pause scenario's file is the rows this many times over: long enough (2 epochs of batch 1)
#: that the pause, asked for after the first step, lands before the job ends on a fast machine.
PAUSE_REPEAT = 40


def pause(client: OpenAI, model: str) -> dict:
    uploaded = training_file(client, repeat=PAUSE_REPEAT)
    validation = training_file(client)
    job = client.fine_tuning.jobs.create(
        model=model, training_file=uploaded.id, validation_file=validation.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 1}}})
    job = wait_for(client, job, ("running", "succeeded", "failed"), poll=0.1)
    assert job.status == "running", job
    deadline = time.monotonic() + POLL_SECONDS  # paused once it has trained a step, so there is a step to resume after
    while not [e for e in client.fine_tuning.jobs.list_events(job.id, limit=5) if e.type == "metrics"]:
        assert time.monotonic() < deadline, "no metrics event"
        time.sleep(0.1)
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.id == job.id and paused.status in ("pausing", "paused"), paused
    first_status = paused.status
    paused = wait_for(client, paused, ("paused", "succeeded", "failed"), poll=0.2)
    assert paused.status == "paused" and paused.finished_at is None and paused.fine_tuned_model is None, paused
    refused = {}
    try:
        client.fine_tuning.jobs.resume(uploaded.id.replace("file-", "ftjob-"))
    except openai.NotFoundError as exc:
        refused["missing"] = exc.code
    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status in ("queued", "running"), resumed
    try:
        client.fine_tuning.jobs.resume(job.id)
    except openai.ConflictError as exc:
        refused["not_paused"] = exc.status_code
    assert refused == {"missing": "fine_tuning_job_not_found", "not_paused": 409}, refused
    done = wait_for(client, resumed, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded" and done.trained_tokens and done.trained_tokens > 0, done
    assert done.fine_tuned_model and done.finished_at, done

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=1000))
    messages = [e.message for e in events]
    for message in ("Job paused", "Job resumed", "Fine-tuning job started", "The job has successfully completed"):
        assert message in messages, messages
    metrics = [e for e in events if e.type == "metrics"]
    steps_per_epoch = len(ROWS) * PAUSE_REPEAT
    steps = sorted({e.data["step"] for e in metrics})
    assert steps == list(range(1, metrics[0].data["total_steps"] + 1)), steps  # every step, none lost to the pause
    for event in metrics:
        assert_accuracy(event.data["train_mean_token_accuracy"])
        assert event.data["train_loss"] is not None and event.data["total_steps"] == 2 * steps_per_epoch, event

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [2 * steps_per_epoch, steps_per_epoch], checkpoints
    for checkpoint in checkpoints:
        m = checkpoint.metrics
        assert m.step == checkpoint.step_number and m.train_loss is not None and m.valid_loss is not None, m
        assert m.full_valid_loss is not None and m.full_valid_loss > 0, m
        for accuracy in (m.train_mean_token_accuracy, m.valid_mean_token_accuracy, m.full_valid_mean_token_accuracy):
            assert_accuracy(accuracy)
        assert checkpoint.fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-{checkpoint.step_number}"
    return {"job": job.id, "status": done.status, "first_pause_status": first_status,
            "checkpoints": len(checkpoints), "trained_tokens": done.trained_tokens}


def dpo(client: OpenAI, model: str) -> dict:
    rows = [{"input": {"messages": [{"role": "user", "content": f"What colour is thing {i}?"}]},
             "preferred_output": [{"role": "assistant", "content": "blue"}],
             "non_preferred_output": [{"role": "assistant", "content": "I will not say"}]} for i in range(6)]
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    uploaded = client.files.create(file=("prefs.jsonl", io.BytesIO(data)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=model, training_file=uploaded.id, method={
        "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 3}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2, job
    job = wait_for(client, job, ("succeeded", "failed", "cancelled"))
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


def models(client: OpenAI, model: str) -> dict:
    """What a job trained, through ``client.models``: listed with the base, retrieved, deleted
    (checkpoint by checkpoint), then gone; a base model cannot be deleted."""
    uploaded = training_file(client)
    job = client.fine_tuning.jobs.create(model=model, training_file=uploaded.id, suffix="models", method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}})
    job = wait_for(client, job, ("succeeded", "failed", "cancelled"))
    assert job.status == "succeeded", job
    ft = job.fine_tuned_model
    checkpoints = sorted(c.fine_tuned_model_checkpoint for c in client.fine_tuning.jobs.checkpoints.list(job.id))
    assert len(checkpoints) == 2, checkpoints
    listed = {m.id: m for m in client.models.list()}
    assert model in listed and listed[model].owned_by == "system", listed
    assert ft in listed and all(c in listed for c in checkpoints), listed
    got = client.models.retrieve(ft)
    assert got.id == ft and got.object == "model" and got.owned_by and got.created > 0, got
    first, final = sorted(checkpoints, key=lambda c: int(c.rsplit("-", 1)[1]))
    deleted = client.models.delete(first)
    assert deleted.id == first and deleted.deleted is True, deleted
    refused = {}
    try:
        client.models.retrieve(first)
    except openai.NotFoundError as exc:
        refused["deleted"] = exc.code
    assert client.models.retrieve(ft).id == ft  # the final checkpoint is still there
    assert client.models.delete(ft).deleted is True
    try:
        client.models.retrieve(final)
    except openai.NotFoundError as exc:
        refused["final"] = exc.code
    try:
        client.models.delete(model)
    except openai.PermissionDeniedError as exc:
        refused["base"] = exc.code
    assert refused == {"deleted": "model_not_found", "final": "model_not_found", "base": "model_not_deletable"}, refused
    remaining = [m.id for m in client.models.list()]
    assert ft not in remaining and first not in remaining and final not in remaining, remaining
    assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"  # the job keeps its history
    client.files.delete(uploaded.id)
    return {"job": job.id, "status": job.status, "checkpoints": len(checkpoints), "refused": refused}


#: ``--pairs`` (the prompt -> answer mapping the ``chat`` scenario's model was fine-tuned on) and ``--base``.
PAIRS: dict[str, str] = {}
BASE: list[str] = []


def chat(client: OpenAI, model: str) -> dict:
    """Chat and completions on a model fine-tuned on ``PAIRS``, as code written for OpenAI calls
    them: greedy answers are the trained ones (plain and streamed), the base's are not; usage adds
    up; refusals are the SDK's own exceptions."""
    assert PAIRS, "the chat scenario needs --pairs"
    assert client.models.retrieve(model).id == model
    base = client.models.retrieve(BASE[0]).id
    answers, streamed, base_answers = {}, {}, {}
    for prompt in PAIRS:
        done = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                              temperature=0, max_completion_tokens=8)
        assert done.object == "chat.completion" and done.choices[0].finish_reason == "stop", done
        assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens, done.usage
        answers[prompt] = done.choices[0].message.content
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                temperature=0, max_tokens=8, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == done.usage.total_tokens, chunks[-1]
        streamed[prompt] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        base_answers[prompt] = client.chat.completions.create(
            model=base, messages=[{"role": "user", "content": prompt}], temperature=0,
            max_tokens=8).choices[0].message.content
    assert answers == PAIRS and streamed == PAIRS, (answers, streamed)
    assert all(base_answers[p] != a for p, a in PAIRS.items()), base_answers

    completion = client.completions.create(model=base, prompt="apple", max_tokens=4, temperature=0, logprobs=1)
    assert completion.object == "text_completion" and completion.choices[0].logprobs.tokens, completion
    pieces = list(client.completions.create(model=base, prompt="apple", max_tokens=4, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == completion.choices[0].text, pieces

    refused = {}
    try:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    except openai.NotFoundError as exc:
        refused["unknown_model"] = exc.code
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    except openai.BadRequestError as exc:
        refused["tools"] = exc.param
    assert refused == {"unknown_model": "model_not_found", "tools": "tools"}, refused
    return {"answers": answers, "refused": refused}

SCENARIOS = {"lifecycle": lifecycle, "dpo": dpo, "pause": pause, "errors": errors, "models": models, "chat": chat}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    parser.add_argument("--pairs", default="{}", help="chat: the JSON prompt -> answer mapping the model learned")
    parser.add_argument("--base", default="", help="chat: the base model the fine-tuned one was trained from")
    args = parser.parse_args()
    PAIRS.update(json.loads(args.pairs))
    BASE.append(args.base)
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
