"""API keys, tenants and limits through the real app: no key, no entry; a tenant never sees,
cancels or reads another tenant's jobs or datasets (404, so existence does not leak)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from posttrain.api.app import create_app
from posttrain.services.access import digest
from posttrain.services.container import build_services
from tests.integration.test_api import ROWS, assert_problem, lora_request

ALICE, BOB = "pt-alice-key", "pt-bob-key"


@pytest.fixture
def keyed_client(settings, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# tenant:digest\nalice:{digest(ALICE)}\nbob:{digest(BOB)}\n")
    settings.api_keys_file = keys
    services = build_services(settings)
    with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
        yield client
    services.close()


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_no_key_or_a_wrong_key_is_401(keyed_client):
    response = keyed_client.get("/v1/datasets")
    assert_problem(response, 401, "API key")
    assert response.headers["www-authenticate"] == "Bearer"
    assert_problem(keyed_client.get("/v1/datasets", headers=as_("pt-wrong")), 401, "not valid")
    assert_problem(keyed_client.get("/v1/datasets", headers={"Authorization": ALICE}), 401)
    assert keyed_client.get("/v1/datasets", headers=as_(ALICE)).status_code == 200
    assert keyed_client.get("/v1/health").status_code == 200


def alice_job(client, tiny_model_path) -> str:
    """Alice registers the dataset "secret" and submits a job on it; returns its job_uuid."""
    assert client.post("/v1/datasets", headers=as_(ALICE), json={
        "purpose": "post-training/messages", "dataset_id": "secret", "source": {"type": "rows", "rows": ROWS}}).status_code == 200
    body = lora_request(str(tiny_model_path), "secret")
    assert client.post("/v1/post-training/supervised-fine-tune", headers=as_(ALICE), json=body).status_code == 200
    return body["job_uuid"]


def test_tenants_never_see_each_other(keyed_client, tiny_model_path):
    job = alice_job(keyed_client, tiny_model_path)

    bob = as_(BOB)
    assert keyed_client.get("/v1/post-training/jobs", headers=bob).json() == {"data": []}
    assert keyed_client.get("/v1/datasets", headers=bob).json() == {"data": []}
    assert_problem(keyed_client.get("/v1/post-training/job/status", params={"job_uuid": job}, headers=bob), 404)
    assert_problem(keyed_client.get("/v1/post-training/job/artifacts", params={"job_uuid": job}, headers=bob), 404)
    assert_problem(keyed_client.get("/v1/post-training/job/events", params={"job_uuid": job}, headers=bob), 404)
    assert_problem(keyed_client.post("/v1/post-training/job/cancel", json={"job_uuid": job}, headers=bob), 404)
    assert_problem(keyed_client.get("/v1/datasets/secret", headers=bob), 404)
    assert_problem(keyed_client.get("/v1/datasetio/iterrows/secret", headers=bob), 404)
    assert_problem(keyed_client.post("/v1/datasetio/append-rows/secret", json={"rows": [{"a": 1}]}, headers=bob), 404)
    assert_problem(keyed_client.delete("/v1/datasets/secret", headers=bob), 404)
    stolen = lora_request(str(tiny_model_path), "secret")
    assert_problem(keyed_client.post("/v1/post-training/supervised-fine-tune", json=stolen, headers=bob), 400, "secret")

    # Alice's job and dataset are untouched.
    status = keyed_client.get("/v1/post-training/job/status", params={"job_uuid": job}, headers=as_(ALICE)).json()
    assert status["status"] == "scheduled"
    rows = keyed_client.get("/v1/datasetio/iterrows/secret", headers=as_(ALICE)).json()["data"]
    assert rows == ROWS


def test_two_tenants_may_name_their_jobs_alike(keyed_client, tiny_model_path):
    """job_uuid is unique per tenant: Bob's "same" job_uuid is his own job (no 409 that would tell
    him Alice has one), and cancelling it leaves Alice's alone."""
    job = alice_job(keyed_client, tiny_model_path)
    alice, bob = as_(ALICE), as_(BOB)
    assert keyed_client.post("/v1/datasets", headers=bob, json={
        "purpose": "post-training/messages", "dataset_id": "mine", "source": {"type": "rows", "rows": ROWS}}).status_code == 200
    body = {**lora_request(str(tiny_model_path), "mine"), "job_uuid": job}
    assert keyed_client.post("/v1/post-training/supervised-fine-tune", headers=bob, json=body).json() == {"job_uuid": job}
    assert_problem(keyed_client.post("/v1/post-training/supervised-fine-tune", headers=bob, json=body), 409, job)

    assert keyed_client.post("/v1/post-training/job/cancel", json={"job_uuid": job}, headers=bob).status_code == 200
    status = {who: keyed_client.get("/v1/post-training/job/status", params={"job_uuid": job}, headers=key).json()["status"]
              for who, key in (("alice", alice), ("bob", bob))}
    assert status == {"alice": "scheduled", "bob": "cancelled"}
    for key in (alice, bob):
        assert keyed_client.get("/v1/post-training/jobs", headers=key).json() == {"data": [{"job_uuid": job}]}
    events = keyed_client.get("/v1/post-training/job/events", params={"job_uuid": job}, headers=alice).json()["data"]
    assert [e["data"]["status"] for e in events if e["type"] == "state"] == ["scheduled"]


def test_rate_limit_per_key_is_429_with_retry_after(settings, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"alice:{digest(ALICE)}\nbob:{digest(BOB)}\n")
    settings.api_keys_file = keys
    settings.rate_limit_per_minute = 3
    services = build_services(settings)
    with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
        for _ in range(3):
            assert client.get("/v1/datasets", headers=as_(ALICE)).status_code == 200
        limited = client.get("/v1/datasets", headers=as_(ALICE))
        assert_problem(limited, 429, "3 requests a minute")
        assert int(limited.headers["retry-after"]) >= 1
        # Another key has its own budget.
        assert client.get("/v1/datasets", headers=as_(BOB)).status_code == 200
    services.close()


def test_queued_jobs_quota_per_tenant(client, services, tiny_model_path):
    services.settings.max_queued_jobs_per_tenant = 2
    assert client.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "d",
                                             "source": {"type": "rows", "rows": ROWS}}).status_code == 200
    for _ in range(2):
        accepted = client.post("/v1/post-training/supervised-fine-tune", json=lora_request(str(tiny_model_path), "d"))
        assert accepted.status_code == 200
    refused = client.post("/v1/post-training/supervised-fine-tune", json=lora_request(str(tiny_model_path), "d"))
    assert_problem(refused, 429, "2 scheduled or running")
    assert "retry-after" in refused.headers
    assert len(client.get("/v1/post-training/jobs").json()["data"]) == 2


def test_keys_created_by_the_cli_are_stored_hashed_and_accepted(settings, tmp_path):
    import subprocess
    import sys

    keys = tmp_path / "keys"
    made = subprocess.run([sys.executable, "-m", "posttrain", "keys", "create", "carol", "--keys-file", str(keys)],
                          capture_output=True, text=True, check=True)
    key = made.stdout.strip()
    assert key.startswith("pt-") and key not in keys.read_text() and digest(key) in keys.read_text()
    settings.api_keys_file = keys
    services = build_services(settings)
    with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
        assert client.get("/v1/datasets", headers=as_(key)).status_code == 200
        assert client.get("/v1/datasets").status_code == 401
    services.close()
