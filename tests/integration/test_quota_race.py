"""The per-tenant queued-jobs quota holds under concurrent submits: the count and the insert are
one atomic step in the store, so 40 submits at once against a quota of 2 queue exactly 2 jobs
(the others get 429 and leave no job folder behind), on SQLite and on PostgreSQL. On a loaded
machine some may instead get 503 (the store busy past its timeout): they too leave nothing, and
the quota is never overshot."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from posttrain.services.access import DEFAULT_TENANT
from tests.integration.test_api import ROWS, assert_problem, lora_request

SUBMITS, QUOTA = 40, 2


def test_concurrent_submits_never_overshoot_the_quota(client, services, settings, tiny_model_path):
    services.settings.max_queued_jobs_per_tenant = QUOTA
    assert client.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "d",
                                             "source": {"type": "rows", "rows": ROWS}}).status_code == 200
    bodies = [lora_request(str(tiny_model_path), "d") for _ in range(SUBMITS)]
    start = threading.Barrier(SUBMITS)

    def submit(body: dict):
        start.wait()
        return client.post("/v1/post-training/supervised-fine-tune", json=body)

    with ThreadPoolExecutor(SUBMITS) as pool:
        responses = list(pool.map(submit, bodies))

    accepted = [r for r in responses if r.status_code == 200]
    over_quota = [r for r in responses if r.status_code == 429]
    busy = [r for r in responses if r.status_code == 503]  # a loaded machine: the store said "try again"
    assert len(accepted) + len(over_quota) + len(busy) == SUBMITS, [r.status_code for r in responses]
    assert len(accepted) == QUOTA or (busy and len(accepted) < QUOTA), [r.status_code for r in responses]
    for response in over_quota:
        assert_problem(response, 429, f"{QUOTA} scheduled or running")
        assert int(response.headers["retry-after"]) >= 1
    for response in busy:
        assert_problem(response, 503, "store is busy")
        assert int(response.headers["retry-after"]) >= 1
    listed = client.get("/v1/post-training/jobs").json()["data"]
    assert len(listed) == len(accepted)
    # Only the accepted jobs keep a folder: a refused submit removes the rows it copied.
    folders = list(settings.jobs_dir.iterdir()) if settings.jobs_dir.exists() else []
    assert len(folders) == len(accepted), folders
    assert {f.name for f in folders} == {job.id for job in services.jobs.list_jobs(tenant=DEFAULT_TENANT)}


def test_a_finished_job_frees_its_place(client, services, tiny_model_path):
    """The atomic count sees only scheduled and running jobs: cancelling one makes room again."""
    services.settings.max_queued_jobs_per_tenant = 1
    assert client.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "d",
                                             "source": {"type": "rows", "rows": ROWS}}).status_code == 200
    first = lora_request(str(tiny_model_path), "d")
    assert client.post("/v1/post-training/supervised-fine-tune", json=first).status_code == 200
    assert_problem(client.post("/v1/post-training/supervised-fine-tune", json=lora_request(str(tiny_model_path), "d")),
                   429)
    assert client.post("/v1/post-training/job/cancel", json={"job_uuid": first["job_uuid"]}).status_code == 200
    assert client.post("/v1/post-training/supervised-fine-tune",
                       json=lora_request(str(tiny_model_path), "d")).status_code == 200
