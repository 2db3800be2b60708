"""OpenAI's models API (``/v1/models``) on the catalogue: the server's base models and the caller's
fine-tuned models and checkpoints; and the export of a fine-tuned model as a tar.gz.

Each item is OpenAI's ``Model`` (``id``, ``object``, ``created``, ``owned_by``) with the fields the
Llama Stack clients' ``models.list()``/``retrieve()`` read besides (``identifier``,
``provider_id``, ``model_type``, ``type``, ``metadata``, ``custom_metadata``); the ``openai`` SDK
ignores them. Ids hold ``:`` and ``/``, so they are whole-path parameters. Errors leave in
OpenAI's envelope; another tenant's model is answered exactly like an unknown one.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.background import BackgroundTask
from starlette.responses import FileResponse

from posttrain.api.deps import TenantDep
from posttrain.domain.serving import ServedModel
from posttrain.services.model_catalog import ModelCatalog
from posttrain.services.model_export import ModelExporter

log = logging.getLogger("posttrain.api")

router = APIRouter(tags=["OpenAI Models"])
export_router = APIRouter(tags=["Models"])

PROVIDER_ID = "posttrain"


def _catalog(request: Request) -> ModelCatalog:
    return request.app.state.models


CatalogDep = Annotated[ModelCatalog, Depends(_catalog)]


def model_object(model: ServedModel) -> dict[str, Any]:
    kind = "base" if model.adapter_path is None and model.owned_by == "system" else \
        ("adapter" if model.adapter_path is not None else "full")
    metadata = {"kind": kind}
    return {"id": model.id, "object": "model", "created": model.created, "owned_by": model.owned_by,
            # What the Llama Stack clients' Model (0.2.x) / ModelRetrieveResponse (0.5+) read.
            "identifier": model.id, "provider_id": PROVIDER_ID, "provider_resource_id": model.id,
            "model_type": "llm", "type": "model", "metadata": metadata,
            "custom_metadata": {"model_type": "llm", "provider_id": PROVIDER_ID, **metadata}}


@router.get("/v1/models")
def list_models(catalog: CatalogDep, tenant: TenantDep) -> dict[str, Any]:
    """The base models, then the caller's fine-tuned models and their checkpoints."""
    return {"object": "list", "data": [model_object(m) for m in catalog.list(tenant)]}


@router.get("/v1/models/{model_id:path}")
def retrieve_model(model_id: str, catalog: CatalogDep, tenant: TenantDep) -> dict[str, Any]:
    return model_object(catalog.resolve(tenant, model_id))


@router.delete("/v1/models/{model_id:path}")
async def delete_model(model_id: str, request: Request, catalog: CatalogDep, tenant: TenantDep) -> dict[str, Any]:
    """Delete a fine-tuned model's checkpoint files: every checkpoint of its job for an ``ft:`` id,
    just that one for a checkpoint id. The job and its events stay. A base model is a 403; a job
    still training (or paused) is a 409."""
    from starlette.concurrency import run_in_threadpool

    removed = await run_in_threadpool(catalog.delete, tenant, model_id)
    serving = getattr(request.app.state, "serving", None)
    if serving is not None:
        for path in removed:
            try:
                await serving.forget(path)
            except Exception:  # the files are gone; a worker that cannot hear it fails to load them
                log.warning("the serving worker did not forget a deleted model", exc_info=True,
                            extra={"action": "serving_forget_failed", "path": path})
    return {"id": model_id, "object": "model", "deleted": True}


@export_router.get("/v1/posttrain/models/{model_id:path}/export")
def export_model(model_id: str, request: Request, tenant: TenantDep,
                 format: str = Query("merged", description="merged (a plain safetensors model) or adapter (the PEFT "  # noqa: A002
                                                           "adapter folder)")) -> FileResponse:
    """The fine-tuned model as a tar.gz of one folder: the PEFT adapter, or the merged model."""
    exporter: ModelExporter = request.app.state.model_export
    export = exporter.export(tenant, model_id, format)
    return FileResponse(export.archive, media_type="application/gzip", filename=export.filename,
                        background=BackgroundTask(export.remove))
