"""Issue 12, class 4: one job's checkpoints are bounded, on disk, in the store and in what a
status poll or an event stream reads.

A job of huge ``n_epochs`` and one-step epochs wrote a checkpoint per step (816 in 40 s), and with
~2,000 of them every status poll and every event stream's poll read them all. Now the trainer keeps
the newest N folders (``POSTTRAIN_KEEP_CHECKPOINTS``, at most ``POSTTRAIN_MAX_CHECKPOINTS_PER_JOB``),
the store deletes the rows of the deleted ones, and a job is read with at most the cap's newest.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from posttrain.api.app import create_app
from posttrain.demo import colour_rows
from posttrain.domain.jobs import JobKind
from posttrain.domain.recipes import JobPlan, TrainerSpec, build_recipe
from posttrain.services.container import build_services
from posttrain.settings import Settings
from posttrain.store.jobs import new_job_id
from tests.conftest import start_server, stop_server
from tests.integration.test_api import assert_problem, lora_request, register
from tests.worker_helpers import launch_config


def _claimed(store, tmp_path, job_uuid: str = "ckpt-many"):
    """A running job of the open server's tenant, ``default``, held by worker ``w1``."""
    job_id = new_job_id()
    plan = JobPlan(recipe=build_recipe({"method": "sft"}), model=str(tmp_path / "model"),
                   output_dir=str(tmp_path / job_id), train_rows_path=str(tmp_path / "train.jsonl"))
    job = store.create(job_id=job_id, job_uuid=job_uuid, tenant="default", kind=JobKind.SFT,
                       request={"job_uuid": job_uuid}, plan=plan, max_attempts=1)
    claimed = store.claim_next(owner="w1", lease_seconds=600)
    assert claimed is not None and claimed.id == job.id
    return claimed


def _record(store, job, epochs, *, keep=None) -> None:
    for epoch in epochs:
        store.record_checkpoint(job_id=job.id, owner="w1", attempt=job.attempt, identifier=f"{job.job_uuid}-epoch-{epoch}",
                                epoch=epoch, step=epoch, path=f"/ckpt/epoch_{epoch}", train_loss=1.0,
                                validation_loss=1.0, perplexity=2.7, keep=keep)


def test_recording_with_keep_deletes_the_rows_beyond_the_newest(store, tmp_path):
    job = _claimed(store, tmp_path)
    _record(store, job, range(1, 31), keep=3)
    assert [c.epoch for c in store.get(job_id=job.id).checkpoints] == [28, 29, 30]
    _record(store, job, [30], keep=3)  # a resumed trainer re-sends the newest: nothing changes
    assert [c.epoch for c in store.get(job_id=job.id).checkpoints] == [28, 29, 30]
    # Every checkpoint still has its event (the log is history; the dashboard counts them).
    assert sum(e.type == "checkpoint" for e in store.events(job_id=job.id, limit=100)) == 30


def test_status_and_event_streams_of_a_job_with_2000_checkpoint_rows_read_at_most_the_cap(store, settings, tmp_path):
    """2,000 rows, as a launcher from before the save policy recorded them: the status lists the
    newest ``max_checkpoints_per_job`` only, in epoch order, and the event page reads no more."""
    job = _claimed(store, tmp_path)
    _record(store, job, range(1, 2001))
    capped = settings.model_copy(update={"max_checkpoints_per_job": 7})
    services = build_services(capped)
    try:
        with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
            started = time.perf_counter()
            response = client.get("/v1/post-training/job/status", params={"job_uuid": job.job_uuid})
            elapsed = time.perf_counter() - started
            assert response.status_code == 200, response.text
            listed = response.json()["checkpoints"]
            assert [c["epoch"] for c in listed] == list(range(1994, 2001))
            assert listed[-1]["identifier"] == f"{job.job_uuid}-epoch-2000"
            assert elapsed < 5, elapsed
            # What each request asks the database for (a listener on the app's own engine): the
            # status reads checkpoints with a LIMIT; an event page reads none.
            statements: list[str] = []

            def seen(_conn, _cursor, statement, *_args) -> None:
                statements.append(statement)

            event.listen(services.engine, "before_cursor_execute", seen)
            try:
                assert client.get("/v1/post-training/job/status", params={"job_uuid": job.job_uuid}).status_code == 200
                reads = [q for q in statements if "FROM checkpoints" in q]
                assert len(reads) == 1 and "LIMIT" in reads[0], reads
                statements.clear()
                page = client.get("/v1/post-training/job/events", params={"job_uuid": job.job_uuid, "limit": 10})
                assert page.status_code == 200 and len(page.json()["data"]) == 10
                assert not [q for q in statements if "FROM checkpoints" in q], statements
            finally:
                event.remove(services.engine, "before_cursor_execute", seen)
            with client.stream("GET", "/v1/post-training/job/events", params={"job_uuid": job.job_uuid, "after": 0},
                               headers={"Accept": "text/event-stream"}) as stream:
                assert stream.status_code == 200
                first = next(stream.iter_lines())
                assert first.startswith("id: ")
    finally:
        services.close()
    assert services.jobs.store.listed_checkpoints == 7


def test_the_settings_bound_the_keep():
    assert Settings().keep_checkpoints == 5 and Settings().max_checkpoints_per_job == 20
    with pytest.raises(ValueError, match="max_checkpoints_per_job"):
        Settings(max_checkpoints_per_job=0)
    with pytest.raises(ValueError, match="keep_checkpoints"):
        Settings(keep_checkpoints=0)


SFT = "/v1/post-training/supervised-fine-tune"
HEADER = "X-Posttrain-Keep-Checkpoints"


def test_the_keep_header_goes_into_the_jobs_recipe_and_a_bad_one_is_a_400(client, services, settings, tiny_model_path):
    """The Llama Stack body is closed (additionalProperties: false), so the number rides in our own
    header; a bad value is a 400 naming the header and creates nothing."""
    register(client)
    for bad, words in (("abc", ["whole number"]), ("-1", ["whole number"]), ("0", ["greater than or equal"]),
                       ("1001", ["less than or equal"])):
        assert_problem(client.post(SFT, json=lora_request(str(tiny_model_path), "toy"), headers={HEADER: bad}), 400,
                       HEADER, *words)
    assert client.get("/v1/post-training/jobs").json() == {"data": []}
    assert list(settings.jobs_dir.iterdir()) == []

    body = lora_request(str(tiny_model_path), "toy")
    assert client.post(SFT, json=body, headers={HEADER: "3"}).status_code == 200
    job = services.jobs.store.find(tenant="default", job_uuid=body["job_uuid"])
    assert job.plan.recipe.keep_checkpoints == 3
    plain = lora_request(str(tiny_model_path), "toy")
    assert client.post(SFT, json=plain).status_code == 200
    assert services.jobs.store.find(tenant="default", job_uuid=plain["job_uuid"]).plan.recipe.keep_checkpoints is None


@pytest.mark.parametrize(("asked", "default", "cap", "kept"),
                         [(None, 5, 20, 5), (3, 5, 20, 3), (50, 5, 20, 20), (None, 30, 20, 20), (None, None, None, None)])
def test_the_launcher_keeps_the_recipes_number_else_the_default_never_over_the_cap(store, tmp_path, asked, default,
                                                                                  cap, kept):
    from posttrain.worker.launcher import Launcher

    job_id = new_job_id()
    plan = JobPlan(recipe=build_recipe({"method": "sft", "keep_checkpoints": asked}), model=str(tmp_path / "model"),
                   output_dir=str(tmp_path / "out"), train_rows_path=str(tmp_path / "train.jsonl"))
    (tmp_path / "train.jsonl").write_text("{}\n")
    job = store.create(job_id=job_id, job_uuid="k", tenant="default", kind=JobKind.SFT, request={}, plan=plan,
                       max_attempts=1)
    launcher = Launcher(job=job, owner="w1", store=store,
                        config=launch_config(keep_checkpoints=default, max_checkpoints_per_job=cap))
    spec = launcher._spec()
    assert TrainerSpec.model_validate_json(spec.read_text()).keep_checkpoints == kept


@pytest.mark.slow
def test_a_real_run_of_many_tiny_epochs_keeps_only_n_checkpoints(tmp_path, tiny_model_path):
    """A real ``posttrain serve`` trains 9 one-step epochs asking (``posttrain jobs submit
    --keep-checkpoints 2``, i.e. the header) to keep 2, under
    the operator's default of 5 and cap of 3: 2 folders left on disk, 2 in the status, the newest;
    9 checkpoint events."""
    home = tmp_path / "home"
    home.mkdir()
    server = start_server(home, tiny_model_path, extra_env={"POSTTRAIN_KEEP_CHECKPOINTS": "5",
                                                            "POSTTRAIN_MAX_CHECKPOINTS_PER_JOB": "3"})
    try:
        response = server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "colours",
                                                     "source": {"type": "rows", "rows": colour_rows(repeat=1)}})
        assert response.status_code == 200, response.text
        body = lora_request(str(tiny_model_path), "colours")
        body["job_uuid"] = f"many-{uuid.uuid4().hex[:8]}"
        body["training_config"].update(n_epochs=9, max_steps_per_epoch=1, max_validation_steps=1)
        config = tmp_path / "job.json"
        config.write_text(json.dumps(body))
        # Through the real command line: `posttrain jobs submit --keep-checkpoints 2` sends the header.
        submitted = subprocess.run([sys.executable, "-m", "posttrain", "jobs", "submit", str(config),
                                    "--keep-checkpoints", "2", "--url", server.base_url],
                                   capture_output=True, text=True, timeout=120)
        assert submitted.returncode == 0, submitted.stderr
        assert submitted.stdout.strip() == body["job_uuid"]
        deadline = time.monotonic() + 300
        while True:
            status = server.get("/v1/post-training/job/status", params={"job_uuid": body["job_uuid"]}).json()
            if status["status"] in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert status["status"] == "completed", status
        assert [c["epoch"] for c in status["checkpoints"]] == [8, 9]
        folders = {p.name for p in (home / "jobs").glob("*/checkpoints/*")}
        assert folders == {"epoch_8", "epoch_9"}, folders
        events = server.get("/v1/post-training/job/events", params={"job_uuid": body["job_uuid"]}).json()["data"]
        assert [e["data"]["epoch"] for e in events if e["type"] == "checkpoint"] == list(range(1, 10))
    finally:
        stop_server(server)
