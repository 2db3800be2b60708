"""The OpenAI Files and fine-tuning APIs through the real app over real stores: objects shaped as
the ``openai`` SDK parses them, every refusal in OpenAI's error envelope with the right status
and ``param``, another tenant's file answered exactly like a missing one, and a refused request
leaving nothing behind. (The SDKs themselves drive a real server in tests/clients.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from posttrain.domain.jobs import JobStatus
from tests.serving_helpers import ALICE, BOB  # the conftest keyed_client's keys

CHAT_LINES = "".join(json.dumps({"messages": [{"role": "user", "content": f"colour {i}?"},
                                              {"role": "assistant", "content": f"blue {i}"}]}) + "\n"
                     for i in range(8)).encode()


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(response, status: int, *words: str, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    for word in words:
        assert word in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def upload(client, content: bytes = CHAT_LINES, *, purpose: str = "fine-tune", name: str = "train.jsonl",
           headers: dict | None = None):
    return client.post("/v1/files", files={"file": (name, content, "application/jsonl")}, data={"purpose": purpose},
                       headers=headers or {})


def uploads_on_disk(settings) -> list:
    root = settings.resolved_home / "uploads"
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


# -- files ----------------------------------------------------------------------------------------


def test_file_lifecycle(client, settings):
    created = upload(client)
    assert created.status_code == 200, created.text
    file = created.json()
    assert file["id"].startswith("file-") and file["object"] == "file" and file["bytes"] == len(CHAT_LINES)
    assert file["filename"] == "train.jsonl" and file["purpose"] == "fine-tune" and file["status"] == "processed"
    assert isinstance(file["created_at"], int) and file["expires_at"] is None
    assert client.get(f"/v1/files/{file['id']}").json() == file
    assert client.get(f"/v1/files/{file['id']}/content").content == CHAT_LINES
    second = upload(client, b'{"messages": []}\n', name="b.jsonl").json()
    listed = client.get("/v1/files").json()
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == [second["id"], file["id"]]
    assert listed["first_id"] == second["id"] and listed["last_id"] == file["id"] and listed["has_more"] is False
    page = client.get("/v1/files", params={"limit": 1, "order": "asc"}).json()
    assert [f["id"] for f in page["data"]] == [file["id"]] and page["has_more"] is True
    page = client.get("/v1/files", params={"limit": 1, "order": "asc", "after": file["id"]}).json()
    assert [f["id"] for f in page["data"]] == [second["id"]] and page["has_more"] is False
    assert client.get("/v1/files", params={"purpose": "batch"}).json()["data"] == []
    assert client.delete(f"/v1/files/{file['id']}").json() == {"id": file["id"], "object": "file", "deleted": True}
    assert_openai_error(client.get(f"/v1/files/{file['id']}"), 404, file["id"], code="file_not_found")
    assert [f"{second['id']}.bin"] == uploads_on_disk(settings)


def test_a_large_upload_streams_through_in_chunks(client):
    content = b"".join(json.dumps({"messages": [{"role": "user", "content": "x" * 1000}]}).encode() + b"\n"
                       for _ in range(3000))  # ~3 MB: several chunks, delimiters split across them
    file = upload(client, content).json()
    assert client.get(f"/v1/files/{file['id']}/content").content == content


@pytest.mark.parametrize("purpose", ["batch", "assistants", "vision", "user_data", "evals", "other"])
def test_purposes_other_than_fine_tune_are_refused_and_nothing_kept(client, settings, purpose):
    error = assert_openai_error(upload(client, purpose=purpose), 400, purpose, "fine-tune", param="purpose")
    assert error["type"] == "invalid_request_error"
    assert client.get("/v1/files").json()["data"] == []
    assert uploads_on_disk(settings) == []


def test_a_malformed_upload_is_refused(client, settings):
    assert_openai_error(client.post("/v1/files", json={"purpose": "fine-tune"}), 400, "multipart/form-data")
    missing_purpose = client.post("/v1/files", files={"file": ("a.jsonl", CHAT_LINES)})
    assert_openai_error(missing_purpose, 400, "purpose", param="purpose")
    missing_file = client.post("/v1/files", files={"purpose": (None, "fine-tune")})
    assert_openai_error(missing_file, 400, "file", param="file")
    assert uploads_on_disk(settings) == []


def raw_upload(*, file_first: bool) -> tuple[bytes, str]:
    """An upload's body as bytes, its file part before or after ``purpose``."""
    files = {"file": ("order.jsonl", CHAT_LINES, "application/jsonl")}
    parts = {**files, "purpose": (None, b"fine-tune", None)} if file_first else {"purpose": (None, b"fine-tune", None),
                                                                                **files}
    request = httpx.Request("POST", "http://x/v1/files", files=parts)
    return request.read(), request.headers["content-type"]


@pytest.mark.parametrize("file_first", [True, False])
def test_the_file_part_may_come_before_or_after_purpose(client, file_first):
    body, content_type = raw_upload(file_first=file_first)
    assert (body.index(b'name="file"') < body.index(b'name="purpose"')) is file_first
    file = client.post("/v1/files", content=body, headers={"content-type": content_type}).json()
    assert file["filename"] == "order.jsonl" and file["bytes"] == len(CHAT_LINES)
    assert client.get(f"/v1/files/{file['id']}/content").content == CHAT_LINES


@pytest.mark.parametrize("cut", [8, 300])
def test_a_truncated_upload_is_400_and_nothing_kept(client, settings, cut):
    body, content_type = raw_upload(file_first=True)
    response = client.post("/v1/files", content=body[:-cut], headers={"content-type": content_type})
    assert_openai_error(response, 400, "closing boundary", param="file")
    assert client.get("/v1/files").json()["data"] == []
    assert uploads_on_disk(settings) == []


def test_a_streamed_upload_past_the_body_limit_is_413_and_nothing_kept(client, services, settings):
    """Sent chunked (no Content-Length), so only the streaming write can tell it is too large."""
    services.settings.max_body_bytes = 1000
    body, content_type = raw_upload(file_first=False)
    body = body.replace(CHAT_LINES, CHAT_LINES * 10)

    def chunks():
        for start in range(0, len(body), 256):
            yield body[start:start + 256]

    response = client.post("/v1/files", content=chunks(), headers={"content-type": content_type})
    assert_openai_error(response, 413, "1000")
    assert client.get("/v1/files").json()["data"] == []
    assert uploads_on_disk(settings) == []


def test_an_upload_past_the_body_limit_is_413(client, services, settings):
    services.settings.max_body_bytes = 1000
    assert_openai_error(upload(client, CHAT_LINES * 10), 413, "1000")
    assert uploads_on_disk(settings) == []


def test_another_tenants_file_is_a_404_identical_to_a_missing_one(keyed_client):
    file = upload(keyed_client, headers=as_(ALICE)).json()
    theirs = keyed_client.get(f"/v1/files/{file['id']}", headers=as_(BOB))
    missing = keyed_client.get("/v1/files/file-000000000000000000000000", headers=as_(BOB))
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"] == {**missing.json()["error"],
                                      "message": missing.json()["error"]["message"].replace(
                                          "file-000000000000000000000000", file["id"])}
    assert keyed_client.get(f"/v1/files/{file['id']}/content", headers=as_(BOB)).status_code == 404
    assert keyed_client.delete(f"/v1/files/{file['id']}", headers=as_(BOB)).status_code == 404
    assert keyed_client.get("/v1/files", headers=as_(BOB)).json()["data"] == []
    assert keyed_client.get(f"/v1/files/{file['id']}", headers=as_(ALICE)).status_code == 200


def test_errors_on_openai_paths_use_its_envelope_and_llama_stack_paths_keep_rfc7807(keyed_client):
    assert_openai_error(keyed_client.get("/v1/files"), 401, code="invalid_api_key")
    assert_openai_error(keyed_client.get("/v1/fine_tuning/nothing", headers=as_(ALICE)), 404)
    assert_openai_error(keyed_client.get("/v1/files", headers=as_(ALICE), params={"limit": "many"}), 400,
                        param="limit")
    llama = keyed_client.get("/v1/datasets")
    assert llama.status_code == 401 and llama.json()["status"] == 401 and "error" not in llama.json()


# -- fine-tuning jobs -------------------------------------------------------------------------------


def create_job(client, tiny_model_path, file_id: str, headers: dict | None = None, **fields):
    body = {"model": tiny_model_path.name, "training_file": file_id, **fields}
    return client.post("/v1/fine_tuning/jobs", json=body, headers=headers or {})


def test_a_job_is_created_queued_and_is_the_same_job_on_the_llama_stack_api(client, services, tiny_model_path):
    file = upload(client).json()
    created = create_job(client, tiny_model_path, file["id"], suffix="colours", seed=7, metadata={"team": "a"},
                         method={"type": "supervised", "supervised": {"hyperparameters": {
                             "n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 3}}})
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["id"].startswith("ftjob-") and job["object"] == "fine_tuning.job" and job["status"] == "queued"
    assert job["model"] == tiny_model_path.name and job["training_file"] == file["id"] and job["seed"] == 7
    assert job["fine_tuned_model"] is None and job["error"] is None and job["result_files"] == []
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 3.0}
    assert job["method"] == {"type": "supervised", "supervised": {"hyperparameters": job["hyperparameters"]}}
    assert job["metadata"] == {"team": "a"} and job["user_provided_suffix"] == "colours"
    stored = services.jobs.get(tenant="default", job_uuid=job["id"])
    recipe = stored.plan.recipe
    assert recipe.optimizer.lr == pytest.approx(3e-4) and recipe.schedule.n_epochs == 2 and recipe.seed == 7
    assert recipe.schedule.max_steps_per_epoch == 4  # 8 rows, batches of 2: every row each epoch
    assert len(Path(stored.plan.train_rows_path).read_text().splitlines()) == 8
    assert client.get("/v1/datasets").json()["data"] == []  # the staging dataset is gone; the job has its copy
    assert job["id"] in [j["job_uuid"] for j in client.get("/v1/post-training/jobs").json()["data"]]
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json() == job
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()
    assert events["object"] == "list" and events["data"][0]["message"] == "Job queued"
    assert events["data"][0]["object"] == "fine_tuning.job.event" and events["data"][0]["type"] == "message"
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"] == []
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None


def test_auto_hyperparameters_resolve_to_the_servers_choices(client, services, tiny_model_path):
    file = upload(client).json()
    job = create_job(client, tiny_model_path, file["id"], hyperparameters={"n_epochs": "auto"}).json()
    assert job["hyperparameters"] == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}
    assert services.jobs.get(tenant="default", job_uuid=job["id"]).plan.recipe.optimizer.lr == pytest.approx(1e-4)


def test_jobs_list_newest_first_with_paging_and_metadata_filter_and_llama_stack_jobs(client, tiny_model_path):
    from tests.integration.test_api import lora_request, register

    file = upload(client).json()
    first = create_job(client, tiny_model_path, file["id"], metadata={"team": "a"}).json()
    second = create_job(client, tiny_model_path, file["id"], metadata={"team": "b"}).json()
    bare = create_job(client, tiny_model_path, file["id"]).json()  # no metadata: null, and skipped by a filter
    assert bare["metadata"] is None
    register(client, "toy")
    llama = lora_request(str(tiny_model_path), "toy")
    assert client.post("/v1/post-training/supervised-fine-tune", json=llama).status_code == 200
    listed = client.get("/v1/fine_tuning/jobs").json()
    assert [j["id"] for j in listed["data"]] == [llama["job_uuid"], bare["id"], second["id"], first["id"]]
    llama_job = listed["data"][0]
    assert llama_job["training_file"] == "toy" and llama_job["method"]["type"] == "supervised"
    assert llama_job["hyperparameters"]["learning_rate_multiplier"] == pytest.approx(10.0)  # lr 1e-3
    page = client.get("/v1/fine_tuning/jobs", params={"limit": 1, "after": bare["id"]}).json()
    assert [j["id"] for j in page["data"]] == [second["id"]] and page["has_more"] is True
    filtered = client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "a"}).json()
    assert [j["id"] for j in filtered["data"]] == [first["id"]]


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", ["1 to 50"]),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 1000}}}},
     "method.supervised.hyperparameters.batch_size", ["1 to 256"]),
    ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier", ["above 0"]),
    ({"hyperparameters": {"n_epochs": "many"}}, "hyperparameters.n_epochs", []),
    ({"method": {"type": "reinforcement"}}, "method.reinforcement", ["grader"]),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}}, "method.dpo.hyperparameters.beta",
     ["above 0"]),
    ({"method": {"type": "dpo"}, "hyperparameters": {"n_epochs": 1}}, "hyperparameters", ["method.dpo"]),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations", ["Weights & Biases"]),
    ({"surprise": 1}, "surprise", ["unexpected"]),
    ({"method": {"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 2}}}}, "method.supervised",
     ["method.dpo"]),
])
def test_bad_hyperparameters_and_unsupported_options_are_400_naming_the_param(client, services, tiny_model_path,
                                                                              fields, param, words):
    file = upload(client).json()
    assert_openai_error(create_job(client, tiny_model_path, file["id"], **fields), 400, *words, param=param)
    assert services.jobs.list_jobs(tenant="default") == []


def test_unknown_model_is_404_model_not_found_naming_the_known_ones(client, services, tiny_model_path, tmp_path):
    # A model root of its own: the session's shared one gathers other tests' models, and the
    # refusal names only the first few.
    root = tmp_path / "only-models"
    root.mkdir()
    (root / tiny_model_path.name).symlink_to(tiny_model_path, target_is_directory=True)
    services.settings.model_roots = [root]
    file = upload(client).json()
    response = client.post("/v1/fine_tuning/jobs", json={"model": "gpt-4o-mini", "training_file": file["id"]})
    assert_openai_error(response, 404, "gpt-4o-mini", tiny_model_path.name, param="model", code="model_not_found")
    assert services.jobs.list_jobs(tenant="default") == []


def test_unknown_or_another_tenants_training_file_is_404_and_a_bad_file_is_400(keyed_client, tiny_model_path):
    alices = upload(keyed_client, headers=as_(ALICE)).json()
    theirs = create_job(keyed_client, tiny_model_path, alices["id"], headers=as_(BOB))
    missing = create_job(keyed_client, tiny_model_path, "file-000000000000000000000000", headers=as_(BOB))
    assert_openai_error(theirs, 404, alices["id"], param="training_file", code="file_not_found")
    assert theirs.json()["error"]["message"].replace(alices["id"], "X") == \
        missing.json()["error"]["message"].replace("file-000000000000000000000000", "X")
    bad = upload(keyed_client, b'{"messages": []}\nnot json\n', headers=as_(BOB)).json()
    assert_openai_error(create_job(keyed_client, tiny_model_path, bad["id"], headers=as_(BOB)), 400, "Line 1",
                        "'messages' must not be empty", param="training_file", code="empty_messages")
    no_messages = upload(keyed_client, b'{"prompt": "a", "completion": "b"}\n', headers=as_(BOB)).json()
    assert_openai_error(create_job(keyed_client, tiny_model_path, no_messages["id"], headers=as_(BOB)), 400,
                        "Line 1", "messages", param="training_file", code="missing_messages")
    assert keyed_client.get("/v1/fine_tuning/jobs", headers=as_(BOB)).json()["data"] == []
    assert_openai_error(keyed_client.get("/v1/fine_tuning/jobs/ftjob-nope", headers=as_(BOB)), 404,
                        code="fine_tuning_job_not_found")


def test_cancelling_a_cancelled_job_again_is_a_success(client, services, tiny_model_path):
    file = upload(client).json()
    job = create_job(client, tiny_model_path, file["id"]).json()
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    again = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"  # a retry of the same cancel


def test_a_failed_job_shows_its_error_and_a_running_one_its_status(client, services, tiny_model_path):
    from posttrain.domain.jobs import JobStatus

    file = upload(client).json()
    job = create_job(client, tiny_model_path, file["id"]).json()
    store = services.jobs.store
    claimed = store.claim_next(owner="test-worker", lease_seconds=60)
    assert claimed is not None and claimed.job_uuid == job["id"]
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "running"
    store.finish(job_id=claimed.id, owner="test-worker", attempt=claimed.attempt, status=JobStatus.FAILED,
                 error_code="bad_row", error_message="row 3 has no assistant message")
    failed = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and failed["fine_tuned_model"] is None
    assert failed["error"] == {"code": "bad_row", "message": "row 3 has no assistant message", "param": None}
    messages = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]]
    assert messages[0].startswith("Job failed") and messages[-1] == "Job queued"
    assert_openai_error(client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel"), 409, "failed")


PREFERENCE_LINES = "".join(json.dumps({
    "input": {"messages": [{"role": "user", "content": f"colour {i}?"}]},
    "preferred_output": [{"role": "assistant", "content": "blue"}],
    "non_preferred_output": [{"role": "assistant", "content": "I cannot say"}]}) + "\n" for i in range(6)).encode()


def test_a_dpo_job_trains_openais_preference_rows_with_its_beta(client, services, tiny_model_path):
    file = upload(client, PREFERENCE_LINES).json()
    created = create_job(client, tiny_model_path, file["id"], method={"type": "dpo", "dpo": {"hyperparameters": {
        "beta": 0.3, "n_epochs": 1, "batch_size": 2}}})
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["method"] == {"type": "dpo", "dpo": {"hyperparameters": {
        "n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 1.0, "beta": 0.3}}}
    assert job["hyperparameters"] == {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 1.0}
    stored = services.jobs.get(tenant="default", job_uuid=job["id"])
    assert stored.kind.value == "dpo" and stored.plan.recipe.dpo.beta == 0.3
    first = json.loads(Path(stored.plan.train_rows_path).read_text().splitlines()[0])
    assert first == {"prompt": [{"role": "user", "content": "colour 0?"}],
                     "chosen": "blue", "rejected": "I cannot say"}
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["method"]["type"] == "dpo"


def test_a_dpo_job_on_chat_rows_is_refused_naming_the_line(client, services, tiny_model_path):
    file = upload(client).json()
    response = create_job(client, tiny_model_path, file["id"], method={"type": "dpo"})
    assert_openai_error(response, 400, "Line 1", "'input' is missing", param="training_file", code="missing_input")
    assert services.jobs.list_jobs(tenant="default") == []


# -- pause, resume, progress and what a finished job shows --------------------------------------


WORKER = "test-worker"


def claimed_job(client, services, tiny_model_path, **fields):
    """An OpenAI job claimed by a stand-in launcher (the test writes what a trainer would report)."""
    file = upload(client).json()
    job = create_job(client, tiny_model_path, file["id"], **fields).json()
    claimed = services.jobs.store.claim_next(owner=WORKER, lease_seconds=60)
    assert claimed is not None and claimed.job_uuid == job["id"]
    return job, claimed


def report(services, claimed, kind: str, **data) -> None:
    services.jobs.store.append_event(job_id=claimed.id, owner=WORKER, attempt=claimed.attempt, type=kind, data=data)


def step(number: int, *, total: int = 4, tokens: int = 30, **extra) -> dict:
    return {"step": number, "epoch": 1, "loss": 2.0 / number, "lr": 1e-4, "tokens_per_s": 100.0, "tokens": tokens,
            "padding_fraction": 0.1, "step_seconds": 0.5, "total_steps": total, **extra}


def test_pause_and_resume_a_queued_job_and_409_when_it_cannot(client, tiny_model_path):
    file = upload(client).json()
    job = create_job(client, tiny_model_path, file["id"]).json()
    paused = client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause")
    assert paused.status_code == 200, paused.text
    assert paused.json()["status"] == "paused" and paused.json()["finished_at"] is None
    assert paused.json()["hyperparameters"] == job["hyperparameters"]  # the whole job object, not a bare row
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "paused"
    assert_openai_error(client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause"), 409, "paused", code="conflict")
    resumed = client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued", resumed.text
    assert_openai_error(client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume"), 409, "scheduled", code="conflict")
    messages = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]]
    assert messages == ["Job resumed", "Job paused", "Job queued"]
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert_openai_error(client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause"), 409, "cancelled")
    assert_openai_error(client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume"), 409, "cancelled")


def test_a_running_job_is_pausing_until_its_trainer_stops_and_a_finished_one_cannot_be_paused(
        client, services, tiny_model_path):
    job, claimed = claimed_job(client, services, tiny_model_path)
    pausing = client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause").json()
    assert pausing["status"] == "pausing" and pausing["estimated_finish"] is None
    assert_openai_error(client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume"), 409, "pausing")
    services.jobs.store.park(job_id=claimed.id, owner=WORKER, attempt=claimed.attempt, reason="paused at step 1")
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "paused"
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume").json()["status"] == "queued"
    again = services.jobs.store.claim_next(owner=WORKER, lease_seconds=60)
    services.jobs.store.finish(job_id=again.id, owner=WORKER, attempt=again.attempt, status=JobStatus.COMPLETED)
    assert_openai_error(client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause"), 409, "completed", code="conflict")
    messages = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]]
    assert messages[:6] == ["The job has successfully completed",
                            f"New fine-tuned model created: ft:{tiny_model_path.name}:default:{job['id']}",
                            "Fine-tuning job started", "Job resumed", "Job paused", "Job pausing"]


def test_a_finished_jobs_tokens_checkpoints_and_metrics_events_are_the_trainers(client, services, tiny_model_path):
    job, claimed = claimed_job(client, services, tiny_model_path, suffix="col")
    report(services, claimed, "started", resources={}, total_steps=4)
    for number in (1, 2):
        report(services, claimed, "metric", **step(number, train_mean_token_accuracy=0.25 * number))
    report(services, claimed, "metric", **step(2, tokens=31, train_mean_token_accuracy=0.5))  # step 2 run again
    report(services, claimed, "metric", **step(3, valid_loss=1.5, valid_mean_token_accuracy=0.4))
    store = services.jobs.store
    store.record_checkpoint(job_id=claimed.id, owner=WORKER, attempt=claimed.attempt, identifier="c-1", epoch=1,
                            step=3, path="/nowhere/epoch_1", train_loss=1.2, validation_loss=1.4, perplexity=4.0,
                            metrics={"train_mean_token_accuracy": 0.6, "valid_mean_token_accuracy": 0.45,
                                     "full_valid_loss": 1.35, "full_valid_mean_token_accuracy": 0.47})
    store.record_checkpoint(job_id=claimed.id, owner=WORKER, attempt=claimed.attempt, identifier="c-2", epoch=2,
                            step=4, path="/nowhere/epoch_2", train_loss=1.1, validation_loss=None, perplexity=None)
    running = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert running["status"] == "running" and running["trained_tokens"] is None and running["fine_tuned_model"] is None
    store.finish(job_id=claimed.id, owner=WORKER, attempt=claimed.attempt, status=JobStatus.COMPLETED)

    done = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and done["trained_tokens"] == 30 + 31 + 30  # step 2 counted once
    assert done["fine_tuned_model"] == f"ft:{tiny_model_path.name}:col:{job['id']}" and done["finished_at"]
    assert done["estimated_finish"] is None

    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()
    newest, first = checkpoints["data"]
    assert first["object"] == "fine_tuning.job.checkpoint" and first["id"].startswith("ftckpt-")
    assert first["fine_tuned_model_checkpoint"] == f"{done['fine_tuned_model']}:ckpt-step-3"
    assert first["step_number"] == 3 and first["fine_tuning_job_id"] == job["id"]
    assert first["metrics"] == {"step": 3, "train_loss": 1.2, "train_mean_token_accuracy": 0.6, "valid_loss": 1.4,
                                "valid_mean_token_accuracy": 0.45, "full_valid_loss": 1.35,
                                "full_valid_mean_token_accuracy": 0.47}
    assert newest["metrics"] == {"step": 4, "train_loss": 1.1, "train_mean_token_accuracy": None, "valid_loss": None,
                                 "valid_mean_token_accuracy": None, "full_valid_loss": None,
                                 "full_valid_mean_token_accuracy": None}
    page = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", params={"limit": 1}).json()
    assert [c["id"] for c in page["data"]] == [newest["id"]] and page["has_more"] is True
    page = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", params={"after": newest["id"]}).json()
    assert [c["id"] for c in page["data"]] == [first["id"]] and page["has_more"] is False
    assert_openai_error(client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", params={"after": "ftckpt-x"}),
                        400, param="after")

    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    assert metrics[0] == {"step": 3, "train_loss": pytest.approx(2 / 3), "train_mean_token_accuracy": None,
                          "total_steps": 4, "valid_loss": 1.5, "valid_mean_token_accuracy": 0.4}
    assert metrics[-1] == {"step": 1, "train_loss": 2.0, "train_mean_token_accuracy": 0.25, "total_steps": 4}
    assert f"Checkpoint created at step 3 with Snapshot ID: {done['fine_tuned_model']}:ckpt-step-3" in \
        [e["message"] for e in events]
    page = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 2}).json()
    rest = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"after": page["data"][-1]["id"]}).json()
    assert [e["id"] for e in page["data"] + rest["data"]] == [e["id"] for e in events]


def test_estimated_finish_is_from_the_measured_step_rate_while_running(client, services, tiny_model_path):
    job, claimed = claimed_job(client, services, tiny_model_path)
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["estimated_finish"] is None  # no step yet
    report(services, claimed, "started", resources={}, total_steps=11)
    report(services, claimed, "metric", **step(1, total=11, step_seconds=100.0))
    before = time.time()
    estimate = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["estimated_finish"]
    assert before + 1000 - 2 <= estimate <= time.time() + 1000 + 1  # one step: the trainer's 100 s, 10 left
    time.sleep(1.0)
    report(services, claimed, "metric", **step(3, total=11, step_seconds=100.0))
    before = time.time()
    estimate = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["estimated_finish"]
    # Two steps took about a second of wall-clock (0.5 s each): 8 left is about 4 s, not 800.
    assert before + 3 <= estimate <= time.time() + 30


def test_another_tenants_job_is_a_404_identical_to_a_missing_one_on_every_job_path(keyed_client, tiny_model_path):
    file = upload(keyed_client, headers=as_(ALICE)).json()
    job = create_job(keyed_client, tiny_model_path, file["id"], headers=as_(ALICE)).json()
    missing_id = "ftjob-000000000000000000000000"
    for method, tail in [("post", "pause"), ("post", "resume"), ("post", "cancel"), ("get", "events"),
                         ("get", "checkpoints"), ("get", "")]:
        theirs = getattr(keyed_client, method)(f"/v1/fine_tuning/jobs/{job['id']}/{tail}".rstrip("/"),
                                               headers=as_(BOB))
        missing = getattr(keyed_client, method)(f"/v1/fine_tuning/jobs/{missing_id}/{tail}".rstrip("/"),
                                                headers=as_(BOB))
        assert theirs.status_code == missing.status_code == 404, (tail, theirs.text)
        assert theirs.json()["error"]["code"] == "fine_tuning_job_not_found"
        assert theirs.json() == json.loads(missing.text.replace(missing_id, job["id"])), tail
    assert keyed_client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=as_(ALICE)).json()["status"] == "queued"


def test_openai_and_llama_stack_jobs_are_one_list_on_both_apis(client, tiny_model_path):
    from tests.integration.test_api import lora_request, register
    from tests.spec import validate_response

    file = upload(client).json()
    openai_job = create_job(client, tiny_model_path, file["id"]).json()
    register(client, "toy")
    llama = lora_request(str(tiny_model_path), "toy")
    assert client.post("/v1/post-training/supervised-fine-tune", json=llama).status_code == 200
    assert client.post(f"/v1/fine_tuning/jobs/{llama['job_uuid']}/pause").json()["status"] == "paused"
    assert {j["id"] for j in client.get("/v1/fine_tuning/jobs").json()["data"]} == {openai_job["id"],
                                                                                    llama["job_uuid"]}
    assert client.get(f"/v1/fine_tuning/jobs/{llama['job_uuid']}").json()["status"] == "paused"
    client.post(f"/v1/fine_tuning/jobs/{openai_job['id']}/pause")
    listed = client.get("/v1/post-training/jobs")
    validate_response(listed, "/v1/post-training/jobs")
    assert {j["job_uuid"] for j in listed.json()["data"]} == {openai_job["id"], llama["job_uuid"]}
    status = client.get("/v1/post-training/job/status", params={"job_uuid": openai_job["id"]})
    validate_response(status, "/v1/post-training/job/status")
    assert status.json()["job_uuid"] == openai_job["id"] and status.json()["status"] == "scheduled"
