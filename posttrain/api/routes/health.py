"""Liveness and readiness: ``/v1/health`` as Llama Stack serves it, ``/healthz`` and ``/readyz``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["Health"])


@router.get("/v1/health")
@router.get("/healthz")
async def health() -> dict[str, str]:
    """The process is up. Async on purpose: it runs on the event loop, so it answers at once even
    when every worker thread is waiting on a locked store; it never touches the store."""
    return {"status": "OK"}


@router.get("/readyz")
def ready(request: Request) -> JSONResponse:
    """The store can be read and written within a short timeout and its schema is current."""
    ok = request.app.state.store_ready()
    return JSONResponse({"status": "OK" if ok else "NOT_READY"}, status_code=200 if ok else 503)
