"""Liveness and readiness: ``/v1/health`` as Llama Stack serves it, ``/healthz`` and ``/readyz``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["Health"])


@router.get("/v1/health")
@router.get("/healthz")
def health() -> dict[str, str]:
    """The process is up."""
    return {"status": "OK"}


@router.get("/readyz")
def ready(request: Request) -> JSONResponse:
    """The store is reachable and its schema is current."""
    ok = request.app.state.store_ready()
    return JSONResponse({"status": "OK" if ok else "NOT_READY"}, status_code=200 if ok else 503)
