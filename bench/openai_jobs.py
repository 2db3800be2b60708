"""The OpenAI fine-tuning API through a real server: job latencies, and job listing with a full store.

Starts a real ``python -m posttrain serve`` (one worker slot, a warm trainer) on a tiny model and,
with plain ``httpx`` on the OpenAI paths, times:

* upload (``POST /v1/files``) and create (``POST /v1/fine_tuning/jobs``, supervised) → the job's
  first training step (its first ``metrics`` event);
* pause → ``paused`` (the job's ``Job paused`` event), that its trainer process is gone, and that
  the one slot is free: a second job, created while the first is paused, reaches its first step;
* resume → the first *new* step of the paused job;
* then inserts ``--jobs`` finished jobs (copies of the first job's row) into the store directly, and
  times ``GET /v1/fine_tuning/jobs?limit=20`` (first page, and a page deep in the list) against
  ``GET /healthz`` and the Llama Stack ``GET /v1/post-training/jobs`` in the same run, as ratios,
  and the endpoint's one store query alone (``JobStore.list_newest``, from this process).

    .venv/bin/python bench/openai_jobs.py [--jobs 10000] [--requests 400] [--keep]

Pause and resume use the OpenAI paths ``/v1/fine_tuning/jobs/{id}/pause|resume`` when the server
has them, else our own ``/v1/posttrain/jobs/{job_uuid}/pause|resume`` (the same job id).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from posttrain.trainer.tiny_model import create_tiny_model  # noqa: E402
from tests.conftest import start_server, stop_server  # noqa: E402 - one server launcher for tests and benches

TARGET_P99_MS = 20.0


def chat_lines(count: int) -> bytes:
    return "".join(json.dumps({"messages": [{"role": "user", "content": f"What colour is thing {i}?"},
                                            {"role": "assistant", "content": f"Thing {i} is blue."}]}) + "\n"
                   for i in range(count)).encode()


def create_job(client: httpx.Client, model: str, file_id: str, *, epochs: int, batch_size: int) -> str:
    body = {"model": model, "training_file": file_id, "method": {"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": epochs, "batch_size": batch_size}}}}
    response = client.post("/v1/fine_tuning/jobs", json=body)
    response.raise_for_status()
    return response.json()["id"]


def newest_events(client: httpx.Client, job_id: str, limit: int = 20) -> list[dict]:
    response = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": limit})
    response.raise_for_status()
    return response.json()["data"]


def seq(event: dict) -> int:
    return int(event["id"].removeprefix("ftevent-"))


def wait_for(client: httpx.Client, job_id: str, found, *, timeout: float = 300.0, what: str) -> dict:
    """Poll the job's newest events until ``found(event)`` holds for one; that event."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in newest_events(client, job_id):
            if found(event):
                return event
        time.sleep(0.02)
    raise RuntimeError(f"{job_id}: no {what} within {timeout:.0f} s")


def is_step(after: int = 0):
    return lambda e: e["type"] == "metrics" and seq(e) > after


def control(client: httpx.Client, job_id: str, action: str) -> str:
    """Pause or resume through the OpenAI path if the server has it, else through ours."""
    response = client.post(f"/v1/fine_tuning/jobs/{job_id}/{action}")
    if response.status_code in (404, 405) and "fine_tuning_job_not_found" not in response.text:
        response = client.post(f"/v1/posttrain/jobs/{job_id}/{action}")
        path = f"/v1/posttrain/jobs/{{id}}/{action}"
    else:
        path = f"/v1/fine_tuning/jobs/{{id}}/{action}"
    response.raise_for_status()
    return path


def trainer_pid(client: httpx.Client, job_id: str) -> int | None:
    status = client.get("/v1/post-training/job/status", params={"job_uuid": job_id}).json()
    return (status.get("resources_allocated") or {}).get("pid")


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def fill_store(database_url: str, template_id: str, count: int) -> None:
    """``count`` finished jobs like ``template_id`` (its request and plan), older than it, with three
    state events each, inserted in one transaction."""
    from sqlalchemy import insert, select

    from posttrain.store.engine import make_engine
    from posttrain.store.tables import job_events, jobs

    engine = make_engine(database_url)
    with engine.begin() as conn:
        row = dict(conn.execute(select(jobs).where(jobs.c.job_uuid == template_id)).mappings().one())
        job_rows, event_rows = [], []
        for i in range(count):
            status = "completed" if i % 10 < 8 else ("failed" if i % 10 == 8 else "cancelled")
            scheduled = row["scheduled_at"] - timedelta(hours=1, seconds=60 * (count - i))
            job_id = secrets.token_hex(16)
            job_rows.append({**row, "id": job_id, "job_uuid": f"ftjob-{secrets.token_hex(12)}", "status": status,
                             "scheduled_at": scheduled, "started_at": scheduled + timedelta(seconds=2),
                             "completed_at": scheduled + timedelta(seconds=50), "lease_owner": None,
                             "lease_expires_at": None, "attempt": 1,
                             "error_code": "error" if status == "failed" else None,
                             "error_message": "training failed (bench fixture)" if status == "failed" else None})
            for offset, state in ((0, "scheduled"), (2, "in_progress"), (50, status)):
                event_rows.append({"job_id": job_id, "created_at": scheduled + timedelta(seconds=offset),
                                   "type": "state", "data": {"status": state}})
        conn.execute(insert(jobs), job_rows)
        conn.execute(insert(job_events), event_rows)
    engine.dispose()


def latencies_ms(client: httpx.Client, path: str, requests: int, params: dict | None = None) -> list[float]:
    for _ in range(10):  # warm the path and the connection
        client.get(path, params=params).raise_for_status()
    out = []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.get(path, params=params)
        out.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return sorted(out)


def store_latencies_ms(home: Path, requests: int) -> list[float]:
    """The list endpoint's one store query alone, from this process on the server's SQLite file
    (what the endpoint costs beyond it is shaping the 20 job objects)."""
    from posttrain.store.engine import make_engine
    from posttrain.store.jobs import JobStore

    engine = make_engine(f"sqlite:///{home / 'posttrain.db'}")
    store = JobStore(engine)
    for _ in range(10):
        store.list_newest(tenant="default", limit=21)
    out = []
    for _ in range(requests):
        started = time.perf_counter()
        store.list_newest(tenant="default", limit=21)
        out.append((time.perf_counter() - started) * 1000)
    engine.dispose()
    return sorted(out)


def pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="finished jobs inserted before the list timing")
    parser.add_argument("--requests", type=int, default=400, help="requests per timed endpoint")
    parser.add_argument("--rows", type=int, default=64, help="rows of the first job's training file")
    parser.add_argument("--keep", action="store_true", help="keep the data folder (server log, store)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="openai-bench-"))
    model = create_tiny_model(work / "models" / "tiny-llama")
    home = work / "home"
    home.mkdir()
    server = start_server(home, model, extra_env={"POSTTRAIN_WORKER_SLOTS": "1"})
    print(f"posttrain OpenAI jobs bench, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            started = time.monotonic()
            upload = client.post("/v1/files", data={"purpose": "fine-tune"},
                                 files={"file": ("train.jsonl", chat_lines(args.rows), "application/jsonl")})
            upload.raise_for_status()
            file_id = upload.json()["id"]
            print(f"upload ({args.rows} rows): {(time.monotonic() - started) * 1000:.0f} ms")

            started = time.monotonic()
            first = create_job(client, model.name, file_id, epochs=20, batch_size=1)
            created = time.monotonic()
            step = wait_for(client, first, is_step(), what="first step")
            print(f"create: {(created - started) * 1000:.0f} ms; create -> first step: "
                  f"{time.monotonic() - started:.2f} s ({step['message']})")

            time.sleep(1.0)
            pid = trainer_pid(client, first)
            started = time.monotonic()
            pause_path = control(client, first, "pause")
            paused = wait_for(client, first, lambda e: e["message"].startswith("Job paused"), what="pause")
            print(f"pause ({pause_path}) -> paused: {time.monotonic() - started:.2f} s; "
                  f"trainer pid {pid} {'STILL ALIVE' if alive(pid) else 'gone'}")
            before_resume = seq(newest_events(client, first, 1)[0])

            small = client.post("/v1/files", data={"purpose": "fine-tune"},
                                files={"file": ("small.jsonl", chat_lines(8), "application/jsonl")}).json()["id"]
            started = time.monotonic()
            second = create_job(client, model.name, small, epochs=1, batch_size=4)
            wait_for(client, second, is_step(), what="first step of the second job")
            print(f"slot released: a second job created while the first is paused -> its first step: "
                  f"{time.monotonic() - started:.2f} s")
            wait_for(client, second, lambda e: e["message"] == "The job has successfully completed", what="success")

            started = time.monotonic()
            resume_path = control(client, first, "resume")
            step = wait_for(client, first, is_step(before_resume), what="first step after resume")
            print(f"resume ({resume_path}) -> first new step: {time.monotonic() - started:.2f} s "
                  f"({step['message']}; paused at {paused['message']!r})")
            client.post(f"/v1/fine_tuning/jobs/{first}/cancel").raise_for_status()

            started = time.monotonic()
            fill_store(f"sqlite:///{home / 'posttrain.db'}", first, args.jobs)
            print(f"inserted {args.jobs} finished jobs into the store in {time.monotonic() - started:.1f} s")
            listed = client.get("/v1/fine_tuning/jobs", params={"limit": 1000}).json()["data"]
            depth = 1000 if len(listed) == 1000 and args.jobs > 1020 else len(listed) // 2
            deep = listed[depth - 1]["id"]
            rows = [("GET /healthz (baseline)", latencies_ms(client, "/healthz", args.requests)),
                    ("GET /v1/fine_tuning/jobs?limit=20", latencies_ms(client, "/v1/fine_tuning/jobs", args.requests,
                                                                       {"limit": 20})),
                    (f"  ... &after=<the {depth}th job>", latencies_ms(client, "/v1/fine_tuning/jobs", args.requests,
                                                                    {"limit": 20, "after": deep})),
                    ("  ... &metadata[team]=none (no match)", latencies_ms(
                        client, "/v1/fine_tuning/jobs", max(20, args.requests // 10),
                        {"limit": 20, "metadata[team]": "none"})),
                    (f"GET /v1/post-training/jobs (all {args.jobs + 2} ids)",
                     latencies_ms(client, "/v1/post-training/jobs", max(20, args.requests // 10))),
                    ("JobStore.list_newest(limit=21), in-process", store_latencies_ms(home, args.requests))]
    finally:
        stop_server(server)
        if args.keep:
            print(f"data folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    health = rows[0][1]
    print(f"\n{'endpoint':44} {'p50 ms':>8} {'p99 ms':>8}   p50/p99 vs /healthz")
    for name, ordered in rows:
        print(f"{name:44} {pct(ordered, 0.5):8.2f} {pct(ordered, 0.99):8.2f}   "
              f"{pct(ordered, 0.5) / pct(health, 0.5):5.1f}x / {pct(ordered, 0.99) / pct(health, 0.99):5.1f}x")
    p99 = pct(rows[1][1], 0.99)
    print(f"\nGET /v1/fine_tuning/jobs?limit=20 p99 {p99:.2f} ms: target < {TARGET_P99_MS:.0f} ms "
          f"{'met' if p99 < TARGET_P99_MS else 'missed'} (with {args.jobs} jobs in the store)")


if __name__ == "__main__":
    main()
