"""Building the FastAPI application: routes, error bodies, tenancy, and (optionally) the scheduler.

The API process never trains. When a scheduler is handed in, it runs beside the API in
background threads and every job trains in a child process of its own.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator, Protocol

from fastapi import FastAPI, Request

from posttrain import __version__
from posttrain.api.problems import install_problem_handlers, problem
from posttrain.api.schemas import PROBLEM_RESPONSES
from posttrain.dashboard.routes import router as dashboard_router
from posttrain.api.routes import datasets, events, health, metrics, post_training
from posttrain.errors import RateLimited, ServiceError, Unauthorized
from posttrain.services.access import DEFAULT_TENANT
from posttrain.services.container import Services, build_services
from posttrain.settings import Settings


#: Answered without an API key: liveness for load balancers, and the API's own description.
OPEN_PATHS = frozenset({"/v1/health", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect"})


class Background(Protocol):
    """Anything started and stopped with the app (the scheduler)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def create_app(settings: Settings | None = None, *, services: Services | None = None,
               background: Background | None = None) -> FastAPI:
    settings = settings or (services.settings if services else Settings())
    services = services or build_services(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if background is not None:
            background.start()
        try:
            yield
        finally:
            if background is not None:
                background.stop()
            services.close()

    app = FastAPI(
        title="posttrain",
        version=__version__,
        description="Fine-tuning server behind the Llama Stack Post-Training API.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.jobs = services.jobs
    app.state.datasets = services.datasets
    app.state.store_ready = services.ready

    install_problem_handlers(app)

    access = services.access

    @app.middleware("http")
    async def tenancy_and_limits(request: Request, call_next):  # noqa: ANN001, ANN202
        """Body size, API key -> tenant, and the per-key rate limit, before any route runs."""
        path = request.url.path
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return problem(413, f"the request body is larger than {settings.max_body_bytes} bytes", instance=path)
        if path in OPEN_PATHS:
            request.state.tenant = DEFAULT_TENANT
            return await call_next(request)
        try:
            request.state.tenant, identity = access.authenticate(request.headers.get("authorization"))
            access.check_rate(identity)
        except ServiceError as exc:
            headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else None
            if isinstance(exc, Unauthorized):
                headers = {"WWW-Authenticate": "Bearer"}
            return problem(exc.status_code, exc.detail, title=exc.title, instance=path, headers=headers)
        return await call_next(request)

    for router in (post_training.router, datasets.router, events.router):
        app.include_router(router, responses=PROBLEM_RESPONSES)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(dashboard_router)
    metrics.install_metrics(app, services.jobs)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, less its 422 answers: we answer invalid requests with a 400 Problem."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
