"""The OpenAI list endpoints page in the store, not in the API process: following ``after`` cursors
visits every item exactly once, in order, even with new items arriving between pages, and the
query each page runs has a ``LIMIT`` (seen on the engine with ``before_cursor_execute``), on
SQLite and PostgreSQL through the real app."""

from __future__ import annotations

import secrets
from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy import event, insert, select

from posttrain.store.jobs import utcnow
from posttrain.store.tables import job_events, jobs
from tests.integration.test_openai_api import create_job, upload


@contextmanager
def statements(engine):
    """The SQL the engine runs inside the block."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def pages(client, path: str, *, limit: int, between=None, **params) -> list[str]:
    """Every id ``path`` lists, following ``after`` page by page; ``between`` runs after each page."""
    ids: list[str] = []
    after = None
    for _ in range(100):
        query = {"limit": limit, **params, **({"after": after} if after else {})}
        body = client.get(path, params=query).json()
        assert len(body["data"]) <= limit, body
        ids += [item["id"] for item in body["data"]]
        if not body["has_more"]:
            return ids
        after = body["data"][-1]["id"]
        if between is not None:
            between()
    raise AssertionError("paging did not end")


def clone_jobs(services, template_id: str, count: int, *, metadata=lambda i: None, same_time_every: int = 1) -> None:
    """``count`` more jobs like ``template_id`` inserted into the store directly, one second apart
    into the past (``same_time_every`` jobs share each second, so the id breaks their tie)."""
    with services.engine.begin() as conn:
        row = dict(conn.execute(select(jobs).where(jobs.c.job_uuid == template_id)).mappings().one())
        rows = []
        for i in range(count):
            request = {"openai": {**row["request"]["openai"], "metadata": metadata(i)}}
            rows.append({**row, "id": secrets.token_hex(16), "job_uuid": f"ftjob-{secrets.token_hex(12)}",
                         "request": request,
                         "scheduled_at": row["scheduled_at"] - timedelta(seconds=1 + i // same_time_every)})
        conn.execute(insert(jobs), rows)


def newest_first(services, team: str | None = None) -> list[str]:
    """The jobs' ids newest first, as read here (the whole table, in Python), of one team or all."""
    with services.engine.connect() as conn:
        rows = conn.execute(select(jobs.c.job_uuid, jobs.c.request)
                            .order_by(jobs.c.scheduled_at.desc(), jobs.c.id.desc())).all()
    return [job_uuid for job_uuid, request in rows
            if team is None or (request["openai"].get("metadata") or {}).get("team") == team]


def test_jobs_page_newest_first_each_exactly_once_across_new_jobs(client, services, tiny_model_path):
    file = upload(client).json()
    template = create_job(client, tiny_model_path, file["id"], metadata={"team": "a"}).json()
    clone_jobs(services, template["id"], 22, metadata=lambda i: {"team": "ab"[i % 2]}, same_time_every=3)
    expected = newest_first(services)
    added: list[str] = []

    def a_new_job() -> None:
        added.append(create_job(client, tiny_model_path, file["id"], metadata={"team": "a"}).json()["id"])

    assert pages(client, "/v1/fine_tuning/jobs", limit=4, between=a_new_job) == expected
    assert len(added) == 5 and not set(added) & set(expected)
    team_a = newest_first(services, "a")
    assert len(team_a) == 1 + 11 + 5
    assert pages(client, "/v1/fine_tuning/jobs", limit=3, **{"metadata[team]": "a"}) == team_a
    assert pages(client, "/v1/fine_tuning/jobs", limit=3, **{"metadata[team]": "a", "metadata[x]": "y"}) == []


def test_a_metadata_key_of_any_text_is_matched_as_text(client, services, tiny_model_path):
    """The key is the client's text: quotes, commas, braces and dots must neither break the query
    nor match something else."""
    file = upload(client).json()
    template = create_job(client, tiny_model_path, file["id"]).json()  # metadata null: matches nothing
    odd = 'we"ird, {key}.$[0]'
    clone_jobs(services, template["id"], 3, metadata=lambda i: [{odd: "v"}, {"we": "v"}, {odd: "w"}][i])
    listed = client.get("/v1/fine_tuning/jobs", params={f"metadata[{odd}]": "v"})
    assert listed.status_code == 200, listed.text
    assert [j["metadata"] for j in listed.json()["data"]] == [{odd: "v"}]
    assert client.get("/v1/fine_tuning/jobs", params={"metadata[we]": "v"}).json()["data"][0]["metadata"] == {"we": "v"}


def test_jobs_list_runs_one_query_with_a_limit(client, services, tiny_model_path):
    file = upload(client).json()
    template = create_job(client, tiny_model_path, file["id"]).json()
    clone_jobs(services, template["id"], 30)
    with statements(services.engine) as seen:
        body = client.get("/v1/fine_tuning/jobs", params={"limit": 5}).json()
    assert len(body["data"]) == 5 and body["has_more"] is True
    listing = [s for s in seen if "FROM jobs" in s and "ORDER BY jobs.scheduled_at DESC" in s]
    assert len(listing) == 1 and "LIMIT" in listing[0], seen
    assert all("LIMIT" in s or "jobs.job_uuid =" in s for s in seen if "FROM jobs" in s), seen


def test_an_unknown_after_is_400_naming_after(client):
    response = client.get("/v1/fine_tuning/jobs", params={"after": "ftjob-nope"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "after"
    response = client.get("/v1/files", params={"after": "file-nope"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "after"


def test_files_page_in_both_orders_each_exactly_once_across_new_uploads(client, services):
    made = [upload(client, f"{{}}\n{i}".encode(), name=f"{i}.jsonl").json()["id"] for i in range(7)]
    added: list[str] = []

    def a_new_upload() -> None:
        added.append(upload(client, b"{}\n").json()["id"])

    assert pages(client, "/v1/files", limit=2, between=a_new_upload) == made[::-1]  # desc: new ones are before
    assert len(added) == 3
    added_before = list(added)
    ascending = pages(client, "/v1/files", limit=3, order="asc", between=a_new_upload)
    assert ascending == made + added_before + added[len(added_before):]  # asc: new ones arrive at the end
    assert pages(client, "/v1/files", limit=100, purpose="batch") == []
    with statements(services.engine) as seen:
        client.get("/v1/files", params={"limit": 2, "after": made[3]})
    listing = [s for s in seen if "FROM files" in s and "ORDER BY" in s]
    assert len(listing) == 1 and "LIMIT" in listing[0], seen


def test_events_page_newest_first_each_exactly_once_across_new_events(client, services, tiny_model_path):
    file = upload(client).json()
    job = create_job(client, tiny_model_path, file["id"]).json()
    job_key = services.jobs.get(tenant="default", job_uuid=job["id"]).id

    def log(message: str) -> None:
        with services.engine.begin() as conn:
            conn.execute(insert(job_events).values(job_id=job_key, created_at=utcnow(), type="log",
                                                   data={"level": "info", "message": message}))

    for i in range(10):
        log(f"line {i}")
    path = f"/v1/fine_tuning/jobs/{job['id']}/events"
    expected = [e["id"] for e in client.get(path, params={"limit": 1000}).json()["data"]]
    assert len(expected) == 11 and expected == sorted(expected, key=lambda e: -int(e.removeprefix("ftevent-")))
    assert pages(client, path, limit=3, between=lambda: log("later")) == expected


@pytest.mark.parametrize("after", ["ftevent-x", "nope"])
def test_a_bad_event_cursor_is_400(client, tiny_model_path, after):
    file = upload(client).json()
    job = create_job(client, tiny_model_path, file["id"]).json()
    response = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"after": after})
    assert response.status_code == 400 and response.json()["error"]["param"] == "after"
