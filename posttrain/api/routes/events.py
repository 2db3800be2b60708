"""Our own endpoint beside the Llama Stack ones: a job's events, in order, with a cursor.

``GET /v1/post-training/job/events?job_uuid=…&after=<seq>`` answers a JSON page; with
``Accept: text/event-stream`` the same events are pushed live as Server-Sent Events (each with
``id: <seq>``, so a reconnecting client resumes with ``Last-Event-ID``) until the job ends.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from posttrain.api.deps import JobServiceDep, TenantDep
from posttrain.api.json_body import INT64_MAX, StrictJSONRoute
from posttrain.api.schemas import JobEventPublic, JobEventsPublic
from posttrain.errors import InvalidRequest
from posttrain.services.jobs import JobService

router = APIRouter(tags=["Events (posttrain extension)"], route_class=StrictJSONRoute)
STREAM_POLL_SECONDS = 0.5


def _page(jobs: JobService, tenant: str, job_uuid: str, after: int, limit: int) -> JobEventsPublic:
    # Only the status: an event stream polls this twice a second, whatever the job recorded.
    job = jobs.get(tenant=tenant, job_uuid=job_uuid, with_payload=False, with_checkpoints=False)
    events = jobs.events(job, after=after, limit=limit)
    return JobEventsPublic(
        job_uuid=job_uuid,
        status=job.status.value,
        data=[JobEventPublic(seq=e.seq, type=e.type, created_at=e.created_at, data=e.data) for e in events],
        next_cursor=events[-1].seq if events else after,
    )


async def _stream(jobs: JobService, tenant: str, job_uuid: str, after: int, request: Request) -> AsyncIterator[str]:
    cursor = after
    while True:
        page = await run_in_threadpool(_page, jobs, tenant, job_uuid, cursor, 500)
        for event in page.data:
            yield f"id: {event.seq}\nevent: {event.type}\ndata: {json.dumps(event.model_dump(mode='json'))}\n\n"
        cursor = page.next_cursor
        if page.status in ("completed", "failed", "cancelled") and not page.data:
            yield f"event: end\ndata: {json.dumps({'status': page.status})}\n\n"
            return
        if await request.is_disconnected():
            return
        if not page.data:
            yield ": keep-alive\n\n"
            await asyncio.sleep(STREAM_POLL_SECONDS)


def _resume_point(last_event_id: str | None, after: int) -> int:
    """Where a reconnecting stream resumes: the ``Last-Event-ID`` it was sent (one of our ``id:``
    lines, a decimal seq), else ``after``. Anything else was not sent by us, so it is refused before
    the stream starts: ``str.isdigit`` took ``²`` and ``int`` then failed, and a seq past 2^63
    failed in the store's query with the stream already open."""
    if not last_event_id:
        return after
    if re.fullmatch("[0-9]{1,19}", last_event_id) is None or int(last_event_id) > INT64_MAX:
        raise InvalidRequest("Last-Event-ID: must be the id of an event this stream sent (a decimal seq from 0 to "
                             "2^63-1)")
    return int(last_event_id)


def job_events(
    request: Request,
    jobs: JobServiceDep,
    tenant: TenantDep,
    job_uuid: str = Query(description="The UUID of the job."),
    after: int = Query(default=0, ge=0, le=INT64_MAX, description="Return events after this sequence number."),
    limit: int = Query(default=1000, ge=1, le=10000, description="Most events in one page."),
    accept: str | None = Header(default=None),
    last_event_id: str | None = Header(default=None),
) -> StreamingResponse | JobEventsPublic:
    """A job's state changes, per-step metrics, checkpoints, log lines and error, in order."""
    if accept and "text/event-stream" in accept:
        jobs.get(tenant=tenant, job_uuid=job_uuid, with_payload=False, with_checkpoints=False)  # 404 before the stream
        start = _resume_point(last_event_id, after)
        return StreamingResponse(_stream(jobs, tenant, job_uuid, start, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return _page(jobs, tenant, job_uuid, after, limit)


for prefix in ("/v1", "/v1alpha"):
    router.add_api_route(f"{prefix}/post-training/job/events", job_events, methods=["GET"],
                         response_model=JobEventsPublic)
