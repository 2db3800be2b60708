"""The dashboard: read-only HTML views over the services, served by the API server itself.

``/`` lists the caller's jobs, ``/ui/jobs/{job_uuid}`` shows one job (live loss curves,
checkpoints, log, cancel, pause and resume buttons, and a "Try it" panel that chats with one of the
job's checkpoints beside its base model), ``/ui/datasets`` lists datasets with a preview of their
rows. The pages are Jinja2 templates plus one vanilla script; the live parts read the
public JSON endpoints (``/v1/posttrain/jobs``, ``/v1/post-training/job/events``) and cancel, pause
and resume through ``/v1/post-training/job/cancel`` and ``/v1/posttrain/jobs/{job_uuid}/pause|resume``,
so the dashboard itself never writes jobs. The Try it panel streams from ``/v1/chat/completions``
like any client, signed in by the page's session and CSRF token.

Every state-changing request a page makes carries a CSRF token: the signed-in session's own
(synchronizer), or before sign-in and on an open server a random one also kept in an HttpOnly
cookie (double-submit). Pages hold it in ``<meta name="csrf-token">`` and in their forms.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from posttrain.domain.jobs import Job
from posttrain.services.access import (
    CSRF_COOKIE,
    CSRF_FIELD,
    SESSION_COOKIE,
    AccessControl,
    Session,
    new_token,
    same_token,
)
from posttrain.services.datasets import DatasetService
from posttrain.services.job_views import JobSummary, JobViews
from posttrain.services.model_catalog import ModelCatalog
from posttrain.services.try_it import TryItModels, try_it_models

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
    """A dashboard page (never cached) with the CSRF token its forms and scripts send back; it shows
    "Sign out" to a signed-in browser."""
    session: Session | None = request.state.session
    fresh = None if session is not None or request.state.csrf_cookie else new_token()
    token = session.csrf_token if session is not None else fresh or request.state.csrf_cookie
    html = env.get_template(name).render(signed_in=session is not None, csrf_token=token, **context)
    response = HTMLResponse(html, status_code=status_code, headers={"Cache-Control": "no-store"})
    if fresh is not None:
        response.set_cookie(CSRF_COOKIE, fresh, httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")
    return response


def _form_field(body: bytes, name: str) -> str:
    return (parse_qs(body.decode("utf-8", "replace")).get(name) or [""])[0].strip()


def _forbidden(request: Request) -> HTMLResponse:
    return _page(request, "login.html", status_code=403, page="login",
                 error="This form is out of date or came from another site; try again.")


@router.get("/ui/login", response_class=HTMLResponse, include_in_schema=False)
def login_page(request: Request) -> Response:
    if not _access(request).enabled:
        return RedirectResponse("/", status_code=303)  # an open server needs no sign-in
    return _page(request, "login.html", page="login", error=None)


@router.post("/ui/login", response_class=HTMLResponse, include_in_schema=False)
async def log_in(request: Request) -> Response:
    """Check the form's CSRF token and the key; open a session, put only its id in the cookie."""
    access = _access(request)
    if not access.enabled:
        return RedirectResponse("/", status_code=303)
    body = await request.body()
    if not same_token(_form_field(body, CSRF_FIELD), request.state.csrf_cookie):
        return _forbidden(request)
    # The sessions are in the store: written off the event loop.
    opened = await run_in_threadpool(access.open_session, _form_field(body, "api_key"))
    if opened is None:
        return _page(request, "login.html", status_code=401, page="login", error="That API key is not valid.")
    session_id, _session = opened
    # A browser signing in again leaves no old session.
    await run_in_threadpool(access.close_session, request.state.session_id)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(SESSION_COOKIE, session_id, httponly=True, samesite="strict", path="/",
                        max_age=int(access.session_seconds), secure=request.url.scheme == "https")
    return response


@router.post("/ui/logout", include_in_schema=False)
async def log_out(request: Request) -> Response:
    """Revoke the session (its id opens nothing afterwards, wherever a copy of the cookie is)."""
    session: Session | None = request.state.session
    if session is not None:
        if not same_token(_form_field(await request.body(), CSRF_FIELD), session.csrf_token):
            return _forbidden(request)
        await run_in_threadpool(_access(request).close_session, request.state.session_id)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
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
    return _page(request, "job.html", page="job", job=summary, resources=job.resources, config=config,
                 try_it=_try_it(request, job), rendered_at=datetime.now(UTC).isoformat())


def _try_it(request: Request, job: Job) -> TryItModels:
    """The Try it panel's models: the job's own (as ``/v1/models`` names them) and its base."""
    catalog: ModelCatalog | None = getattr(request.app.state, "models", None)
    if catalog is None:
        return TryItModels(models=(), base=None)
    return try_it_models(catalog, request.state.tenant, job)


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
