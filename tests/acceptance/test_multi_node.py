"""Several processes on one PostgreSQL store: an API server without a worker, and standalone
``posttrain worker`` processes that are killed with SIGKILL in the middle of a job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.acceptance.test_crash_recovery import _assert_resumed_and_complete, _submit_long_job
from tests.conftest import POSTGRES_URL, REPO, fresh_postgres_database, start_server, stop_server

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
def cluster(request, tmp_path, tiny_model_path):
    if not POSTGRES_URL:
        if os.environ.get("CI"):
            pytest.fail("POSTTRAIN_TEST_POSTGRES_URL is not set: .ci/run must start PostgreSQL")
        pytest.skip("no PostgreSQL server: set POSTTRAIN_TEST_POSTGRES_URL (bash scripts/start-postgres prints it)")
    with fresh_postgres_database() as url:
        yield from _cluster_on(url, request, tmp_path, tiny_model_path)


def _cluster_on(url, request, tmp_path, tiny_model_path):
    server_env = {"POSTTRAIN_DATABASE_URL": url, "POSTTRAIN_RUN_WORKER": "false", **getattr(request, "param", {})}
    server = start_server(tmp_path, tiny_model_path, extra_env=server_env)
    workers: list[subprocess.Popen] = []

    def start_worker(**env) -> subprocess.Popen:
        log = open(tmp_path / f"worker-{len(workers)}.log", "ab")  # noqa: SIM115
        process = subprocess.Popen([sys.executable, "-m", "posttrain", "worker", "--log-level", "warning"], cwd=REPO,
                                   env={**server.env, **env}, stdout=log, stderr=subprocess.STDOUT)
        workers.append(process)
        return process

    yield server, start_worker
    for process in workers:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
    stop_server(server)


def _kill_worker_mid_job(server, worker, job_uuid: str) -> None:
    running = server.wait_for_job(job_uuid, lambda s: s["status"] == "in_progress" and s["checkpoints"])
    trainer = running["resources_allocated"]["pid"]
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(trainer, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail("the trainer outlived its killed worker")


def test_killed_worker_job_resumes_on_another_worker(cluster):
    server, start_worker = cluster
    job_uuid = _submit_long_job(server)
    assert server.wait_for_job(job_uuid, lambda s: True)["status"] == "scheduled"  # the API alone never trains
    first = start_worker()
    _kill_worker_mid_job(server, first, job_uuid)
    start_worker()
    _assert_resumed_and_complete(server, job_uuid)


@pytest.mark.parametrize("cluster", [{"POSTTRAIN_MAX_ATTEMPTS": "1"}], indirect=True)
def test_job_out_of_attempts_fails_with_the_reason(cluster):
    server, start_worker = cluster
    job_uuid = _submit_long_job(server)
    _kill_worker_mid_job(server, start_worker(), job_uuid)
    start_worker()  # its reaper finds the expired lease
    failed = server.wait_for_job(job_uuid, lambda s: s["status"] == "failed", timeout=60)
    assert failed["checkpoints"], "the checkpoints written before the loss are kept"
    events = server.get("/v1/post-training/job/events", params={"job_uuid": job_uuid}).json()["data"]
    (reason,) = [e["data"] for e in events if e["type"] == "state" and e["data"]["status"] == "failed"]
    assert reason["code"] == "worker_lost" and "no attempts left" in reason["message"]
    shown = subprocess.run([sys.executable, "-m", "posttrain", "jobs", "status", job_uuid], cwd=REPO,
                           env={**server.env, "POSTTRAIN_URL": server.base_url}, capture_output=True, text=True)
    assert "worker_lost" in shown.stdout + shown.stderr
