"""The store in trouble: another process holds SQLite's write lock (a real second process, as an
attacker or a stray `sqlite3` shell would), or PostgreSQL refuses connections.

The API answers 503 with ``Retry-After`` within seconds and writes nothing; ``/healthz`` answers
at once; ``/readyz`` says not ready; once the lock goes the same write succeeds. A running job
keeps going through a hiccup shorter than its lease: it completes on its first attempt with every
event recorded.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from posttrain.api.app import create_app
from posttrain.domain.jobs import JobStatus
from posttrain.errors import StoreUnavailable
from posttrain.services.container import Services, build_access, build_services
from posttrain.services.datasets import DatasetService
from posttrain.services.jobs import JobService
from posttrain.settings import Settings
from posttrain.store.datasets import DatasetStore
from posttrain.store.engine import make_engine, migrate
from posttrain.store.jobs import JobStore
from posttrain.worker.launcher import Launcher
from tests.worker_helpers import launch_config, stand_in_importable, submit, wait_for

ROWS = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]

_HOLDER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN " + sys.argv[2])
print("locked", flush=True)
time.sleep(float(sys.argv[3]))
connection.execute("ROLLBACK")
"""


def hold_lock(path: Path, seconds: float, mode: str = "EXCLUSIVE") -> subprocess.Popen[str]:
    """Another process takes the database's write lock and keeps it for ``seconds``."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), mode, str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


@pytest.fixture
def sqlite_services(tmp_path, tiny_model_path):
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'store.db'}",
                        model_roots=[tiny_model_path.parent], file_roots=[tmp_path / "files"])
    built = build_services(settings)
    yield built
    built.close()


def _register(client: TestClient, dataset_id: str = "toy"):
    return client.post("/v1/datasets", json={"purpose": "post-training/messages",
                                             "source": {"type": "rows", "rows": ROWS}, "dataset_id": dataset_id})


@pytest.mark.parametrize("mode", ["EXCLUSIVE", "IMMEDIATE"])
def test_a_locked_store_answers_503_quickly_and_writes_nothing(sqlite_services, tmp_path, mode):
    with TestClient(create_app(services=sqlite_services), raise_server_exceptions=False) as client:
        holder = hold_lock(tmp_path / "store.db", seconds=8, mode=mode)
        try:
            started = time.monotonic()
            refused = _register(client)
            took = time.monotonic() - started
            assert refused.status_code == 503, refused.text
            assert took < 5, f"the write waited {took:.1f} s"
            assert int(refused.headers["Retry-After"]) >= 1
            assert refused.headers["content-type"].startswith("application/json")
            body = refused.json()
            assert body["status"] == 503 and body["title"] == "Service Unavailable" and body["instance"] == "/v1/datasets"

            started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            assert time.monotonic() - started < 1
            started = time.monotonic()
            ready = client.get("/readyz")
            assert (ready.status_code, ready.json()["status"]) == (503, "NOT_READY")
            assert time.monotonic() - started < 3
        finally:
            holder.kill()
            holder.wait()
        assert client.get("/v1/datasets").json()["data"] == []
        assert list(sqlite_services.settings.datasets_dir.glob("*.jsonl")) == []
        assert client.get("/readyz").status_code == 200
        assert _register(client).status_code == 200
        assert [d["identifier"] for d in client.get("/v1/datasets").json()["data"]] == ["toy"]


def test_a_launcher_trains_through_a_store_hiccup(tmp_path, monkeypatch, caplog):
    """The store is locked by another process from just after the trainer started until after it
    finished: every metric, the checkpoint and the end land once the lock goes, on attempt 1."""
    stand_in_importable(monkeypatch)
    path = tmp_path / "store.db"
    engine = make_engine(f"sqlite:///{path}", busy_timeout_seconds=0.5)
    migrate(engine)
    store = JobStore(engine)
    submitted = submit(store, tmp_path / "jobs", "slow-1")
    job = store.claim_next(owner="w1", lease_seconds=20)
    assert job is not None and job.id == submitted.id
    launcher = Launcher(job=job, owner="w1", store=store, config=launch_config(lease_seconds=20))
    thread = threading.Thread(target=launcher.run)
    caplog.set_level(logging.WARNING, logger="posttrain.worker")
    thread.start()
    try:
        wait_for(lambda: any(e.type == "started" for e in store.events(job_id=job.id)), what="the started event")
        holder = hold_lock(path, seconds=4)
        try:
            wait_for(lambda: (Path(job.plan.output_dir) / "ran.json").exists(), what="the trainer to finish")
            assert store.get(job_id=job.id).status is JobStatus.IN_PROGRESS  # its end waits for the store
        finally:
            holder.wait(timeout=30)
        thread.join(timeout=30)
    finally:
        thread.join(timeout=30)
    done = store.get(job_id=job.id)
    assert (done.status, done.attempt, done.error_code) == (JobStatus.COMPLETED, 1, None)
    types = [e.type if e.type != "state" else f"state:{e.data['status']}" for e in store.events(job_id=job.id)]
    assert types == ["state:scheduled", "state:in_progress", "started", "metric", "metric", "checkpoint",
                     "state:completed"]
    assert [c.identifier for c in done.checkpoints] == ["slow-1-epoch-1"]
    assert any(getattr(r, "action", None) == "store_unavailable" for r in caplog.records)
    engine.dispose()


def test_a_postgresql_store_that_refuses_connections_is_unavailable():
    """A PostgreSQL store on a closed port: the store says StoreUnavailable at once (a 503 at the
    API), not an OperationalError (a 500)."""
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:9/postgres", busy_timeout_seconds=1)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as refused, engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    assert time.monotonic() - started < 5
    assert refused.value.status_code == 503 and refused.value.retry_after >= 1
    engine.dispose()


def test_a_refused_postgresql_store_answers_503_at_the_api(tmp_path, tiny_model_path):
    """The services wired to a PostgreSQL server that refuses connections (as when the database
    went away after start): writes and reads are 503 with Retry-After, /healthz stays 200 and
    /readyz says not ready."""
    settings = Settings(home=tmp_path / "home", database_url="postgresql+psycopg://postgres@127.0.0.1:9/postgres",
                        model_roots=[tiny_model_path.parent], file_roots=[tmp_path / "files"])
    settings.ensure_dirs()
    engine = make_engine(settings.resolved_database_url, busy_timeout_seconds=1)
    datasets = DatasetStore(engine, settings.datasets_dir)
    services = Services(settings=settings, engine=engine, access=build_access(settings),
                        jobs=JobService(store=JobStore(engine), datasets=datasets, settings=settings),
                        datasets=DatasetService(store=datasets, settings=settings))
    with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
        refused = _register(client)
        assert refused.status_code == 503 and "Retry-After" in refused.headers, refused.text
        listed = client.get("/v1/datasets")
        assert listed.status_code == 503 and listed.json()["status"] == 503
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
    engine.dispose()


_PG_HOLDER = """
import sys, time
import psycopg
with psycopg.connect(sys.argv[1]) as connection:
    connection.execute("LOCK TABLE datasets, alembic_version IN ACCESS EXCLUSIVE MODE")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_locked_postgresql_store_answers_503_quickly_and_writes_nothing(settings, services):
    """Another process keeps a PostgreSQL transaction holding the tables' locks: the write gives
    up after lock_timeout (503, Retry-After), /readyz says not ready, and after the lock goes the
    write succeeds."""
    dsn = settings.resolved_database_url.replace("postgresql+psycopg://", "postgresql://")
    holder = subprocess.Popen([sys.executable, "-c", _PG_HOLDER, dsn, "8"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
        try:
            started = time.monotonic()
            refused = _register(client)
            assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1, refused.text
            assert time.monotonic() - started < 5
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 503
        finally:
            holder.kill()
            holder.wait()
        assert client.get("/v1/datasets").json()["data"] == []
        assert client.get("/readyz").status_code == 200
        assert _register(client).status_code == 200


def test_a_pool_with_every_connection_in_use_is_unavailable_not_a_bug(database_url):
    """A burst of concurrent requests can hold every pooled connection: the next one waits the busy
    timeout and then gets StoreUnavailable (a 503 with Retry-After), not the pool's TimeoutError
    (a 500), on SQLite and on PostgreSQL."""
    engine = make_engine(database_url, busy_timeout_seconds=0.5)
    held = []
    try:
        for _ in range(engine.pool.size() + engine.pool._max_overflow):
            held.append(engine.connect())
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="connections are in use") as refused:
            engine.connect()
        assert 0.4 < time.monotonic() - started < 5
        assert refused.value.status_code == 503 and refused.value.retry_after >= 1
        held.pop().close()
        with engine.connect() as connection:  # one freed: the store answers again
            assert connection.execute(text("SELECT 1")).scalar() == 1
    finally:
        for connection in held:
            connection.close()
        engine.dispose()
