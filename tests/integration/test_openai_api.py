"""The OpenAI Files and fine-tuning APIs through the real app over real stores: objects shaped as
the ``openai`` SDK parses them, every refusal in OpenAI's error envelope with the right status
and ``param``, another tenant's file answered exactly like a missing one, and a refused request
leaving nothing behind. (The SDKs themselves drive a real server in tests/clients.)"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from posttrain.api.app import create_app
from posttrain.services.access import digest
from posttrain.services.container import build_services

ALICE, BOB = "pt-alice-key", "pt-bob-key"
CHAT_LINES = "".join(json.dumps({"messages": [{"role": "user", "content": f"colour {i}?"},
                                              {"role": "assistant", "content": f"blue {i}"}]}) + "\n"
                     for i in range(8)).encode()


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed_client(settings, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"alice:{digest(ALICE)}\nbob:{digest(BOB)}\n")
    settings.api_keys_file = keys
    services = build_services(settings)
    with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
        yield client
    services.close()


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
