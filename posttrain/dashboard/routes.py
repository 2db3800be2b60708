"""The dashboard: read-only HTML views over the services, served by the API server itself.

``/`` lists the caller's jobs, ``/ui/jobs/{job_uuid}`` shows one job (live loss curves,
checkpoints, log, a cancel button), ``/ui/datasets`` lists datasets with a preview of their rows.
The pages are Jinja2 templates plus one vanilla script; the live parts read the public JSON
endpoints (``/v1/posttrain/jobs``, ``/v1/post-training/job/events``) and cancel through
``/v1/post-training/job/cancel``, so the dashboard itself never writes.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader
from pydantic import BaseModel

from posttrain.domain.jobs import Job
from posttrain.services.access import KEY_COOKIE, AccessControl
from posttrain.services.datasets import DatasetService
from posttrain.services.job_views import JobSummary, JobViews

HERE = Path(__file__).parent
STATIC = HERE / "static"
STATIC_FILES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
PREVIEW_ROWS = 5
CELL_CHARS = 160

router = APIRouter(tags=["Dashboard (posttrain extension)"])
env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True,
                  trim_blocks=True, lstrip_blocks=True)


# -- JSON -----------------------------------------------------------------------------------------


class JobSummaryPublic(BaseModel):
    job_uuid: str
    status: str
    kind: str
    method: str
    model: str | None
    scheduled_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    attempt: int
    step: int | None
    total_steps: int | None
    epoch: int | None
    loss: float | None
    checkpoints: int
    error: dict[str, str | None] | None

    @classmethod
    def from_summary(cls, s: JobSummary) -> JobSummaryPublic:
        p = s.progress
        error = {"code": s.error_code, "message": s.error_message} if s.error_code or s.error_message else None
        return cls(job_uuid=s.job_uuid, status=s.status, kind=s.kind, method=s.method, model=s.model,
                   scheduled_at=s.scheduled_at, started_at=s.started_at, completed_at=s.completed_at,
                   attempt=s.attempt, step=p.step, total_steps=p.total_steps, epoch=p.epoch, loss=p.loss,
                   checkpoints=p.checkpoints, error=error)


class JobSummariesPublic(BaseModel):
    data: list[JobSummaryPublic]
    count: int


def _views(request: Request) -> JobViews:
    """One ``JobViews`` per app, so its memory of read events lasts between requests."""
    views = getattr(request.app.state, "job_views", None)
    if views is None:
        views = request.app.state.job_views = JobViews(jobs=request.app.state.jobs)
    return views


@router.get("/v1/posttrain/jobs", response_model=JobSummariesPublic)
def list_job_summaries(request: Request, limit: int = Query(default=200, ge=1, le=1000)) -> JobSummariesPublic:
    """The caller's jobs, newest first, with status, method, model, times, latest progress and error."""
    summaries = _views(request).summaries(tenant=request.state.tenant, limit=limit)
    return JobSummariesPublic(data=[JobSummaryPublic.from_summary(s) for s in summaries], count=len(summaries))


# -- HTML -----------------------------------------------------------------------------------------


def _page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A dashboard page (never cached); it shows "Sign out" to a browser signed in with a key."""
    html = env.get_template(name).render(signed_in=KEY_COOKIE in request.cookies, **context)
    return HTMLResponse(html, status_code=status_code, headers={"Cache-Control": "no-store"})


@router.get("/ui/login", response_class=HTMLResponse, include_in_schema=False)
def login_page(request: Request) -> Response:
    if not _access(request).enabled:
        return RedirectResponse("/", status_code=303)  # an open server needs no sign-in
    return _page(request, "login.html", page="login", error=None)


@router.post("/ui/login", response_class=HTMLResponse, include_in_schema=False)
async def log_in(request: Request) -> Response:
    """Check the key against the configured ones; keep it in the sign-in cookie and go to the jobs."""
    access = _access(request)
    if not access.enabled:
        return RedirectResponse("/", status_code=303)
    key = (parse_qs((await request.body()).decode("utf-8", "replace")).get("api_key") or [""])[0].strip()
    if access.tenant_for_key(key) is None:
        return _page(request, "login.html", status_code=401, page="login", error="That API key is not valid.")
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(KEY_COOKIE, key, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
    return response


@router.post("/ui/logout", include_in_schema=False)
def log_out() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(KEY_COOKIE, path="/")
    return response


def _access(request: Request) -> AccessControl:
    return request.app.state.access


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def jobs_page(request: Request) -> HTMLResponse:
    summaries = _views(request).summaries(tenant=request.state.tenant)
    return _page(request, "jobs.html", page="jobs", jobs=[JobSummaryPublic.from_summary(s) for s in summaries])


@router.get("/ui/jobs/{job_uuid:path}", response_class=HTMLResponse, include_in_schema=False)
def job_page(request: Request, job_uuid: str) -> HTMLResponse:
    views = _views(request)
    job: Job | None = views.find(tenant=request.state.tenant, job_uuid=job_uuid)
    if job is None:
        return _page(request, "not_found.html", status_code=404, page="missing", what=f"No training job '{job_uuid}'.")
    summary = JobSummaryPublic.from_summary(views.summary(job))
    config = json.dumps({"training_config": job.request.get("training_config"),
                         "algorithm_config": job.request.get("algorithm_config")}, indent=2, default=str)
    return _page(request, "job.html", page="job", job=summary, resources=job.resources, config=config)


@router.get("/ui/datasets", response_class=HTMLResponse, include_in_schema=False)
def datasets_page(request: Request) -> HTMLResponse:
    service: DatasetService = request.app.state.datasets
    tenant = request.state.tenant
    shown = []
    for dataset in sorted(service.list(tenant=tenant), key=lambda d: d.identifier):
        rows, _ = service.iterrows(tenant=tenant, dataset_id=dataset.identifier, start_index=0, limit=PREVIEW_ROWS)
        columns = list(dict.fromkeys(key for row in rows for key in row))
        cells = [[_cell(row.get(c)) for c in columns] for row in rows]
        shown.append({"dataset": dataset, "columns": columns, "rows": cells, "source": dataset.source.get("type", "")})
    return _page(request, "datasets.html", page="datasets", datasets=shown)


@router.get("/ui/static/{name}", include_in_schema=False)
def static_file(name: str) -> Response:
    if name not in STATIC_FILES:
        return Response(status_code=404)
    return FileResponse(STATIC / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})


def _cell(value: Any) -> str:
    text = "" if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= CELL_CHARS else text[: CELL_CHARS - 1] + "…"
