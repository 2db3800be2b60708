"""Dashboard sessions live in the store: they survive a restart of the real server process, open on
another server process sharing one PostgreSQL, and signing out on any of them ends them on all.

(They were kept in one process's memory: a restart signed every browser out, and behind several API
servers a browser had to stick to the one it signed in on.)"""

from __future__ import annotations

import re

import httpx
import pytest

from posttrain.services.access import digest
from tests.conftest import POSTGRES_URL, fresh_postgres_database, start_server, stop_server

pytestmark = pytest.mark.slow

ALICE = "pt-alice-session-key"


def _env(tmp_path, **extra: str) -> dict[str, str]:
    keys = tmp_path / "keys"
    keys.write_text(f"alice:{digest(ALICE)}\n")
    return {"POSTTRAIN_API_KEYS_FILE": str(keys), "POSTTRAIN_WORKER_SLOTS": "0", "POSTTRAIN_WARM_TRAINERS": "0", **extra}


def _sign_in(base_url: str) -> str:
    """Sign in through the real form (its double-submit CSRF token) and return the session's id."""
    with httpx.Client(base_url=base_url, timeout=30) as browser:
        form = browser.get("/ui/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        signed_in = browser.post("/ui/login", data={"api_key": ALICE, "csrf_token": token})
        assert signed_in.status_code == 303, signed_in.text
        return signed_in.cookies["posttrain_session"]


def _page(base_url: str, session_id: str) -> httpx.Response:
    return httpx.get(base_url + "/", cookies={"posttrain_session": session_id}, timeout=30)


def _signed_in(base_url: str, session_id: str) -> bool:
    response = _page(base_url, session_id)
    assert response.status_code in (200, 303), response.text
    return response.status_code == 200 and "Sign out" in response.text


def _sign_out(base_url: str, session_id: str) -> None:
    token = re.search(r'<meta name="csrf-token" content="([^"]+)"', _page(base_url, session_id).text).group(1)
    response = httpx.post(base_url + "/ui/logout", data={"csrf_token": token},
                          cookies={"posttrain_session": session_id}, timeout=30)
    assert response.status_code == 303 and response.headers["location"] == "/ui/login"


def test_a_session_survives_a_restart_and_signing_out_ends_it(tmp_path, tiny_model_path):
    home = tmp_path / "home"
    home.mkdir()
    env = _env(tmp_path)
    server = start_server(home, tiny_model_path, extra_env=env)
    try:
        session_id = _sign_in(server.base_url)
        assert _signed_in(server.base_url, session_id)
    finally:
        stop_server(server)

    server = start_server(home, tiny_model_path, extra_env=env)  # a new process on the same store
    try:
        assert _signed_in(server.base_url, session_id)
        # The JSON API takes the same cookie (the dashboard's scripts call it).
        listed = httpx.get(server.base_url + "/v1/post-training/jobs", cookies={"posttrain_session": session_id})
        assert listed.status_code == 200, listed.text
        _sign_out(server.base_url, session_id)
        assert not _signed_in(server.base_url, session_id)
        assert httpx.get(server.base_url + "/v1/post-training/jobs",
                         cookies={"posttrain_session": session_id}).status_code == 401
    finally:
        stop_server(server)


@pytest.mark.postgres
@pytest.mark.skipif(not POSTGRES_URL, reason="no PostgreSQL server: set POSTTRAIN_TEST_POSTGRES_URL")
def test_a_session_opened_on_one_server_works_on_another_sharing_postgresql(tmp_path, tiny_model_path):
    with fresh_postgres_database() as url:
        env = _env(tmp_path, POSTTRAIN_DATABASE_URL=url)
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        a = start_server(tmp_path / "a", tiny_model_path, extra_env=env)
        try:
            b = start_server(tmp_path / "b", tiny_model_path, extra_env=env)
            try:
                session_id = _sign_in(a.base_url)
                assert _signed_in(b.base_url, session_id)
                _sign_out(b.base_url, session_id)  # signed out on B: A no longer takes it either
                assert not _signed_in(a.base_url, session_id)
                assert not _signed_in(b.base_url, session_id)
            finally:
                stop_server(b)
        finally:
            stop_server(a)


def test_a_key_taken_out_of_the_keys_file_opens_none_of_its_sessions(settings, tmp_path):
    """The stored session names the key it was opened with: a server started without that key
    (here: the same store, a keys file holding only Bob's) refuses the cookie."""
    from fastapi.testclient import TestClient

    from posttrain.api.app import create_app
    from posttrain.services.container import build_services

    keys = tmp_path / "keys-alice"
    keys.write_text(f"alice:{digest(ALICE)}\n")
    with_alice = settings.model_copy(update={"api_keys_file": keys, "allowed_hosts": ["testserver"]})
    services = build_services(with_alice)
    try:
        with TestClient(create_app(services=services)) as client:
            form = client.get("/ui/login")
            token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
            assert client.post("/ui/login", data={"api_key": ALICE, "csrf_token": token},
                               follow_redirects=False).status_code == 303
            session_id = client.cookies["posttrain_session"]
            assert client.get("/", follow_redirects=False).status_code == 200
    finally:
        services.close()
    bob_only = tmp_path / "keys-bob"
    bob_only.write_text(f"bob:{digest('pt-bob-session-key')}\n")
    services = build_services(with_alice.model_copy(update={"api_keys_file": bob_only}))
    try:
        with TestClient(create_app(services=services)) as client:
            client.cookies.set("posttrain_session", session_id)
            assert client.get("/", follow_redirects=False).status_code == 303
    finally:
        services.close()


_SESSIONS_HOLDER = """
import sys, time
import psycopg
with psycopg.connect(sys.argv[1]) as connection:
    connection.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_session_lookup_on_a_locked_store_is_a_503_and_stalls_nobody_else(settings, tmp_path):
    """Another process holds the sessions table locked: a request with a session cookie waits for
    the store's lock timeout in a worker thread and answers 503 with Retry-After, while /healthz
    (on the event loop) answers at once."""
    import subprocess
    import sys
    import threading
    import time

    from fastapi.testclient import TestClient

    from posttrain.api.app import create_app
    from posttrain.services.container import build_services

    keys = tmp_path / "keys-locked"
    keys.write_text(f"alice:{digest(ALICE)}\n")
    services = build_services(settings.model_copy(update={"api_keys_file": keys, "allowed_hosts": ["testserver"],
                                                          "store_busy_timeout_seconds": 3}))
    dsn = settings.resolved_database_url.replace("postgresql+psycopg://", "postgresql://")
    holder = subprocess.Popen([sys.executable, "-c", _SESSIONS_HOLDER, dsn, "8"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
            answers: dict[str, object] = {}

            def browser() -> None:
                answers["page"] = client.get("/", cookies={"posttrain_session": "some-session-id"},
                                             follow_redirects=False)

            thread = threading.Thread(target=browser)
            thread.start()
            time.sleep(0.5)  # the cookie request is now waiting on the lock
            started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            assert time.monotonic() - started < 1.0
            thread.join(timeout=30)
            page = answers["page"]
            assert page.status_code == 503 and "Retry-After" in page.headers, page.text
    finally:
        holder.kill()
        holder.wait()
        services.close()
