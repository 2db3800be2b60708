"""Shared fixtures: settings on a temporary data folder, real stores (SQLite always, PostgreSQL
when ``POSTTRAIN_TEST_POSTGRES_URL`` names a server), the real app, and a real server process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.fixtures_tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get("POSTTRAIN_TEST_POSTGRES_URL")
# Starlette's TestClient names its host "testserver"; the gate answers only names it is told of.
os.environ.setdefault("POSTTRAIN_ALLOWED_HOSTS", '["testserver"]')


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory)


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """An empty database on the test server, dropped afterwards (with whatever still holds it: a
    killed process's connections): thousands of tests each make one, and left behind they fill the
    disk."""
    from sqlalchemy import create_engine, text

    name = f"pt_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    if not POSTGRES_URL:
        if os.environ.get("CI"):
            pytest.fail("POSTTRAIN_TEST_POSTGRES_URL is not set: .ci/run must start PostgreSQL")
        pytest.skip("no PostgreSQL server: set POSTTRAIN_TEST_POSTGRES_URL (bash scripts/start-postgres prints it)")
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def store(database_url):
    """A real ``JobStore`` on a migrated database of ``database_url`` (SQLite, and PostgreSQL)."""
    from posttrain.store.engine import make_engine, migrate
    from posttrain.store.jobs import JobStore

    engine = make_engine(database_url)
    migrate(engine)
    yield JobStore(engine)
    engine.dispose()


@pytest.fixture
def settings(tmp_path, database_url, tiny_model_path):
    from posttrain.settings import Settings

    return Settings(
        home=tmp_path / "home",
        database_url=database_url,
        model_roots=[tiny_model_path.parent],
        file_roots=[tmp_path / "files"],
    )


@pytest.fixture
def keyed_client(settings, tmp_path):
    """The real app with API keys for alice and bob (``tests.serving_helpers.ALICE``/``BOB``)."""
    from tests.serving_helpers import keyed_app

    yield from keyed_app(settings, tmp_path)


@pytest.fixture
def services(settings):
    from posttrain.services.container import build_services

    built = build_services(settings)
    yield built
    built.close()


@pytest.fixture
def client(services):
    """The real app through Starlette's TestClient (no scheduler: jobs stay where the test puts them)."""
    from fastapi.testclient import TestClient

    from posttrain.api.app import create_app

    with TestClient(create_app(services=services), raise_server_exceptions=False) as test_client:
        yield test_client


def cpu_dtype_for_bf16() -> str:
    """What the trainer computes in on this machine's CPU when a job asks for bf16 (the spec's
    default): bf16 where the CPU has it natively (AVX512-BF16/AMX), fp32 elsewhere."""
    from posttrain.trainer.precision import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "fp32"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    base_url: str
    home: Path
    tiny_model_path: Path
    process: subprocess.Popen
    env: dict[str, str]

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.base_url + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.base_url + path, timeout=30, **kwargs)

    def job_status(self, job_uuid: str) -> dict:
        """The job's Llama Stack status body (``GET /v1/post-training/job/status``)."""
        return self.get("/v1/post-training/job/status", params={"job_uuid": job_uuid}).json()

    def wait_for_job(self, job_uuid: str, predicate, *, timeout: float = 120, poll: float = 0.2) -> dict:
        """The job's status once ``predicate(status)`` holds; AssertionError with the last one after ``timeout``."""
        deadline = time.monotonic() + timeout
        status: dict = {}
        while time.monotonic() < deadline:
            status = self.job_status(job_uuid)
            if predicate(status):
                return status
            time.sleep(poll)
        raise AssertionError(f"timed out after {timeout} s; last status {status}")


def start_server(home: Path, tiny_model_path: Path, *, extra_env: dict[str, str] | None = None) -> LiveServer:
    port = free_port()
    env = {
        **os.environ,
        "POSTTRAIN_HOME": str(home),
        "POSTTRAIN_PORT": str(port),
        "POSTTRAIN_MODEL_ROOTS": f'["{tiny_model_path.parent}", "{home / "models"}"]',
        "POSTTRAIN_LEASE_SECONDS": "6",
        "POSTTRAIN_HEARTBEAT_SECONDS": "1",
        "POSTTRAIN_CANCEL_GRACE_SECONDS": "5",
        "POSTTRAIN_POLL_SECONDS": "0.2",
        **(extra_env or {}),
    }
    log = open(home / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        [sys.executable, "-m", "posttrain", "serve", "--log-level", "warning"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{(home / 'server.log').read_text()[-3000:]}")
        try:
            if httpx.get(base_url + "/readyz", timeout=2).status_code == 200:
                return LiveServer(base_url, home, tiny_model_path, process, env)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become ready within 60 s")


def stop_server(server: LiveServer) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory, tiny_model_path):
    """A real ``posttrain serve`` process with its local worker, shared by the end-to-end tests."""
    home = tmp_path_factory.mktemp("live-home")
    server = start_server(home, tiny_model_path)
    yield server
    stop_server(server)
