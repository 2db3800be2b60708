"""The dashboard with API keys on, through the real app: a browser is sent to sign in, the key
lives in an HttpOnly SameSite=Strict cookie, and a signed-in tenant sees only its own jobs."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from posttrain.api.app import create_app
from posttrain.services.container import build_services
from tests.integration import test_access
from tests.integration.test_access import ALICE, BOB, alice_job

keyed_client = test_access.keyed_client  # the fixture: a real app with Alice's and Bob's keys


def _sign_in(client: TestClient, key: str):
    form = client.get("/ui/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    return client.post("/ui/login", data={"api_key": key, "csrf_token": token}, follow_redirects=False)


def _csrf(page_html: str) -> str:
    return re.search(r'<meta name="csrf-token" content="([^"]+)"', page_html).group(1)


def test_pages_send_a_browser_without_a_key_to_sign_in(keyed_client):
    for page in ("/", "/ui/datasets", "/ui/jobs/anything"):
        response = keyed_client.get(page, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/ui/login"
    form = keyed_client.get("/ui/login")
    assert form.status_code == 200 and 'name="api_key"' in form.text
    assert keyed_client.get("/ui/static/dashboard.js").status_code == 200
    # The JSON API still answers 401 (clients are not browsers).
    assert keyed_client.get("/v1/post-training/jobs").status_code == 401


def test_a_wrong_key_signs_nobody_in(keyed_client):
    response = _sign_in(keyed_client, "pt-wrong")
    assert response.status_code == 401 and "not valid" in response.text
    assert "set-cookie" not in response.headers
    assert keyed_client.get("/", follow_redirects=False).status_code == 303


def test_signed_in_tenants_see_their_own_jobs_only(keyed_client, tiny_model_path):
    job = alice_job(keyed_client, tiny_model_path)

    signed_in = _sign_in(keyed_client, ALICE)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/"
    cookie = signed_in.headers["set-cookie"].lower()
    assert "posttrain_session=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    jobs = keyed_client.get("/")
    assert jobs.status_code == 200 and job in jobs.text and "Sign out" in jobs.text
    assert job in keyed_client.get(f"/ui/jobs/{job}").text
    assert "secret" in keyed_client.get("/ui/datasets").text
    # The page's scripts call the JSON API with the same cookie (events, cancel).
    assert keyed_client.get("/v1/post-training/job/events", params={"job_uuid": job}).status_code == 200

    keyed_client.cookies.clear()
    assert _sign_in(keyed_client, BOB).status_code == 303
    assert job not in keyed_client.get("/").text
    assert keyed_client.get(f"/ui/jobs/{job}").status_code == 404
    assert "secret" not in keyed_client.get("/ui/datasets").text
    token = _csrf(keyed_client.get("/").text)
    assert keyed_client.post("/v1/post-training/job/cancel", json={"job_uuid": job},
                             headers={"X-CSRF-Token": token}).status_code == 404

    signed_out = keyed_client.post("/ui/logout", data={"csrf_token": token}, follow_redirects=False)
    assert signed_out.status_code == 303 and signed_out.headers["location"] == "/ui/login"
    assert keyed_client.get("/", follow_redirects=False).status_code == 303


@pytest.fixture
def open_client(settings):
    services = build_services(settings)
    with TestClient(create_app(services=services)) as client:
        yield client
    services.close()


def test_an_open_server_needs_no_sign_in(open_client):
    response = open_client.get("/ui/login", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/"
    assert open_client.get("/").status_code == 200 and "Sign out" not in open_client.get("/").text
