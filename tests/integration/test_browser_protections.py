"""What a hostile web page can make a victim's browser send, refused: cross-site and form-shaped
state-changing requests (real HTTP headers against a real server), a dashboard write without its
CSRF token, a foreign Host header (DNS rebinding), and a sign-in cookie that outlives sign-out or
holds the key. The official clients' own requests (no Origin, JSON or no body) keep working."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from posttrain.api.app import create_app
from posttrain.services.container import build_services
from tests.conftest import start_server, stop_server
from tests.integration import test_access
from tests.integration.test_access import ALICE, alice_job, as_
from tests.integration.test_api import ROWS, assert_problem, lora_request

keyed_client = test_access.keyed_client  # the fixture: a real app with Alice's and Bob's keys
EVIL = "https://evil.example"


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory, tiny_model_path):
    """A real keyless ``posttrain serve`` (the default) with no training slots: jobs stay scheduled."""
    home = tmp_path_factory.mktemp("browser-home")
    server = start_server(home, tiny_model_path, extra_env={"POSTTRAIN_WORKER_SLOTS": "0"})
    yield server
    stop_server(server)


def _scheduled_job(server, name: str) -> str:
    assert server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": name,
                                             "source": {"type": "rows", "rows": ROWS}}).status_code == 200
    body = lora_request(str(server.tiny_model_path), name)
    assert server.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    return body["job_uuid"]


def _status(server, job: str) -> str:
    return server.get("/v1/post-training/job/status", params={"job_uuid": job}).json()["status"]


def test_a_cross_site_cancel_is_refused_and_the_job_stays_scheduled(idle_server):
    job = _scheduled_job(idle_server, "cross-site")
    cancel = f"/v1/post-training/job/cancel?job_uuid={job}"

    # An HTML form on another site, as a current browser sends it.
    form = idle_server.post(cancel, content=b"", headers={
        "Content-Type": "application/x-www-form-urlencoded", "Origin": EVIL, "Sec-Fetch-Site": "cross-site",
        "Sec-Fetch-Mode": "navigate"})
    assert_problem(form, 403, "cross-site")
    # fetch(url, {method: "POST", mode: "no-cors"}) with no body: Origin only.
    assert_problem(idle_server.post(cancel, headers={"Origin": EVIL}), 403, EVIL)
    # A sandboxed page says Origin: null.
    assert_problem(idle_server.post(cancel, headers={"Origin": "null"}), 403)
    # An old browser that sends neither header still sends a form's content type.
    assert_problem(idle_server.post(cancel, content=b"job_uuid=" + job.encode(),
                                    headers={"Content-Type": "text/plain"}), 415, "application/json")
    assert_problem(idle_server.post(cancel, files={"job_uuid": (None, job)}), 415)
    assert _status(idle_server, job) == "scheduled"

    # What the official clients send passes: JSON and no Origin (0.2 and extra_body), or a bare POST
    # with the id in the query and no body at all.
    assert idle_server.post("/v1/post-training/job/cancel", json={"job_uuid": job}).status_code == 200
    assert _status(idle_server, job) == "cancelled"
    other = _scheduled_job(idle_server, "bare-cancel")
    assert idle_server.post(f"/v1/post-training/job/cancel?job_uuid={other}").status_code == 200
    assert _status(idle_server, other) == "cancelled"


def test_a_foreign_host_is_refused_while_localhost_works(idle_server):
    port = idle_server.base_url.rsplit(":", 1)[1]
    rebound = idle_server.get("/v1/post-training/jobs", headers={"Host": f"evil.example:{port}"})
    assert_problem(rebound, 421, "evil.example")
    assert_problem(idle_server.get("/", headers={"Host": "evil.example"}), 421)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST."):
        assert idle_server.get("/v1/post-training/jobs", headers={"Host": host}).status_code == 200
    # An IP address is never a rebinding (the page would have to be served from that address).
    with httpx.Client(base_url=idle_server.base_url) as client:
        assert client.get("/v1/health", headers={"Host": "[::1]"}).status_code == 200


def test_the_host_allow_list_setting(settings):
    settings.allowed_hosts = ["train.example.com"]
    services = build_services(settings)
    try:
        app = create_app(services=services)
        with TestClient(app, base_url="http://train.example.com") as named:
            assert named.get("/v1/post-training/jobs").status_code == 200
        with TestClient(app, base_url="http://other.example.com") as other:
            assert_problem(other.get("/v1/post-training/jobs"), 421)
    finally:
        services.close()


def _csrf(page_html: str) -> str:
    return re.search(r'<meta name="csrf-token" content="([^"]+)"', page_html).group(1)


def _form_token(page_html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page_html).group(1)


SAME_ORIGIN = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}


def test_a_dashboard_cancel_without_its_csrf_token_is_refused(client, tiny_model_path):
    assert client.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "toy",
                                             "source": {"type": "rows", "rows": ROWS}}).status_code == 200
    body = lora_request(str(tiny_model_path), "toy")
    assert client.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    job = body["job_uuid"]
    token = _csrf(client.get(f"/ui/jobs/{job}").text)

    for headers in ({}, {"X-CSRF-Token": "forged"}):
        refused = client.post("/v1/post-training/job/cancel", json={"job_uuid": job}, headers={**SAME_ORIGIN, **headers})
        assert_problem(refused, 403, "CSRF")
    assert client.get("/v1/post-training/job/status", params={"job_uuid": job}).json()["status"] == "scheduled"
    # The page's script sends the token from its meta tag.
    assert client.post("/v1/post-training/job/cancel", json={"job_uuid": job},
                       headers={**SAME_ORIGIN, "X-CSRF-Token": token}).status_code == 200


def _sign_in(client: TestClient, key: str):
    token = _form_token(client.get("/ui/login").text)
    return client.post("/ui/login", data={"api_key": key, "csrf_token": token}, follow_redirects=False)


def test_signed_in_writes_sign_in_and_sign_out_need_the_token(keyed_client, tiny_model_path):
    job = alice_job(keyed_client, tiny_model_path)
    keyed_client.get("/ui/login")
    # Sign-in without the form's token (login CSRF): refused, no session.
    forged = keyed_client.post("/ui/login", data={"api_key": ALICE}, follow_redirects=False)
    assert forged.status_code == 403 and "posttrain_session" not in forged.headers.get("set-cookie", "")

    assert _sign_in(keyed_client, ALICE).status_code == 303
    token = _csrf(keyed_client.get("/").text)
    # The session cookie alone does not cancel: a cross-site page could make the browser send it.
    assert_problem(keyed_client.post("/v1/post-training/job/cancel", json={"job_uuid": job}), 403, "CSRF")
    assert keyed_client.get("/v1/post-training/job/status", params={"job_uuid": job}).json()["status"] == "scheduled"
    # Sign-out without the token changes nothing.
    assert keyed_client.post("/ui/logout", follow_redirects=False).status_code == 403
    assert keyed_client.get("/", follow_redirects=False).status_code == 200
    assert keyed_client.post("/v1/post-training/job/cancel", json={"job_uuid": job},
                             headers={"X-CSRF-Token": token}).status_code == 200
    # An API client with its key needs no token.
    assert keyed_client.get("/v1/post-training/jobs", headers=as_(ALICE)).status_code == 200


def test_the_cookie_holds_no_key_and_sign_out_revokes_it(keyed_client):
    signed_in = _sign_in(keyed_client, ALICE)
    set_cookie = signed_in.headers["set-cookie"]
    assert ALICE not in set_cookie
    lowered = set_cookie.lower()
    assert "httponly" in lowered and "samesite=strict" in lowered and "max-age=" in lowered
    old = keyed_client.cookies.get("posttrain_session")
    assert old and old != ALICE

    token = _csrf(keyed_client.get("/").text)
    assert keyed_client.post("/ui/logout", data={"csrf_token": token}, follow_redirects=False).status_code == 303

    # A copy of the old cookie (another tab, a stolen one) opens nothing any more.
    keyed_client.cookies.clear()
    keyed_client.cookies.set("posttrain_session", old)
    assert keyed_client.get("/", follow_redirects=False).status_code == 303
    assert_problem(keyed_client.get("/v1/post-training/jobs"), 401)
    # Neither does the key itself as a cookie (the old scheme).
    keyed_client.cookies.clear()
    keyed_client.cookies.set("posttrain_key", ALICE)
    assert keyed_client.get("/", follow_redirects=False).status_code == 303


def test_a_session_expires(keyed_client):
    keyed_client.app.state.access.session_seconds = 1.0
    assert _sign_in(keyed_client, ALICE).status_code == 303
    assert keyed_client.get("/", follow_redirects=False).status_code == 200
    session_id = keyed_client.cookies.get("posttrain_session")
    time.sleep(1.3)
    # The server forgets it, even if a browser kept sending the cookie past its Max-Age.
    keyed_client.cookies.clear()
    keyed_client.cookies.set("posttrain_session", session_id)
    assert keyed_client.get("/", follow_redirects=False).status_code == 303


def test_the_session_cookie_is_secure_over_https(settings, tmp_path):
    from posttrain.services.access import digest

    keys = tmp_path / "https-keys"
    keys.write_text(f"alice:{digest(ALICE)}\n")
    settings.api_keys_file = keys
    settings.allowed_hosts = ["testserver"]
    services = build_services(settings)
    try:
        with TestClient(create_app(services=services), base_url="https://testserver") as client:
            assert "secure" in _sign_in(client, ALICE).headers["set-cookie"].lower()
    finally:
        services.close()
