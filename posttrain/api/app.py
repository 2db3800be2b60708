"""Building the FastAPI application: routes, error bodies, tenancy, and (optionally) the scheduler.

The API process never trains. When a scheduler is handed in, it runs beside the API in
background threads and every job trains in a child process of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

from posttrain import __version__
from posttrain.api.gate import Gate
from posttrain.api.problems import OPENAI_ERROR_RESPONSES, install_problem_handlers
from posttrain.api.routes import (
    datasets,
    events,
    health,
    job_control,
    metrics,
    openai_files,
    openai_fine_tuning,
    openai_inference,
    openai_models,
    post_training,
)
from posttrain.api.schemas import PROBLEM_RESPONSES
from posttrain.dashboard.routes import router as dashboard_router
from posttrain.services.container import Services, build_services
from posttrain.services.model_export import ModelExporter
from posttrain.settings import Settings


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
        description="Fine-tuning server behind the Llama Stack Post-Training API and OpenAI's fine-tuning API.",
        lifespan=lifespan,
        docs_url=None,  # served by _install_docs from local files, not a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.jobs = services.jobs
    app.state.datasets = services.datasets
    app.state.access = services.access
    app.state.files = services.files
    app.state.fine_tuning = services.fine_tuning
    app.state.models = services.models
    app.state.model_export = ModelExporter(services.models, settings) if services.models is not None else None
    app.state.serving = services.serving
    app.state.store_ready = services.ready

    install_problem_handlers(app)

    observe = metrics.install_metrics(app, services.jobs)
    app.add_middleware(Gate, access=services.access, max_body_bytes=settings.max_body_bytes, observe=observe,
                       allowed_hosts=settings.allowed_host_names, open_max_body_bytes=settings.open_max_body_bytes)

    for router in (post_training.router, datasets.router, events.router, job_control.router):
        app.include_router(router, responses=PROBLEM_RESPONSES)
    for router in (openai_files.router, openai_fine_tuning.router, openai_models.router, openai_inference.router):
        app.include_router(router, responses=OPENAI_ERROR_RESPONSES)
    app.include_router(openai_models.export_router, responses=PROBLEM_RESPONSES)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(dashboard_router, responses=PROBLEM_RESPONSES)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]  # FastAPI's documented way to customise it
    _install_docs(app)
    return app


#: Where the Swagger UI and ReDoc files are served; the gate lets this prefix through like /docs.
DOCS_STATIC = "/docs/static"


def _install_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc with their JavaScript, CSS and icon served by this server.

    FastAPI's own pages load them from a CDN, so on a machine without internet (where this server
    is meant to run) /docs was a blank page. The files come from the fastapi-offline package.
    """
    app.mount(DOCS_STATIC, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-static")
    openapi_url, oauth2_redirect_url = app.openapi_url, app.swagger_ui_oauth2_redirect_url
    if openapi_url is None or oauth2_redirect_url is None:
        raise ValueError("the docs pages need the app's openapi_url and swagger_ui_oauth2_redirect_url")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{app.title} - Swagger UI", oauth2_redirect_url=oauth2_redirect_url,
            swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js", swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_STATIC}/favicon.png")

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{DOCS_STATIC}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_STATIC}/favicon.png", with_google_fonts=False)


def _openapi(app: FastAPI) -> dict[str, Any]:
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
