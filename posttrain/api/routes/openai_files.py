"""OpenAI's Files API (``/v1/files``), for the files a fine-tuning job trains on.

Objects are shaped as the ``openai`` SDK parses them (``FileObject``, ``FileDeleted``, a cursor
page); refusals leave in OpenAI's error envelope (``api/problems.py`` decides by path).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from posttrain.api.deps import TenantDep
from posttrain.api.multipart_upload import UploadForm, boundary_of
from posttrain.domain.files import StoredFile
from posttrain.services.files import FileInvalid, FileService

router = APIRouter(tags=["OpenAI Files"])


def _files(request: Request) -> FileService:
    return request.app.state.files


FileServiceDep = Annotated[FileService, Depends(_files)]


def file_object(stored: StoredFile) -> dict[str, Any]:
    """The file as OpenAI's ``FileObject``: processed at once (nothing is checked until a job names it)."""
    return {"id": stored.id, "object": "file", "bytes": stored.bytes, "created_at": int(stored.created_at.timestamp()),
            "filename": stored.filename, "purpose": stored.purpose, "status": "processed", "expires_at": None,
            "status_details": None}


#: The upload's body as OpenAPI says it (the route reads the stream itself, so FastAPI cannot infer it).
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"},
                   "purpose": {"type": "string", "description": "fine-tune (the only purpose kept here)"}}}}}}}


@router.post("/v1/files", openapi_extra=UPLOAD_BODY)
async def upload_file(request: Request, files: FileServiceDep, tenant: TenantDep) -> dict[str, Any]:
    """Upload a file (multipart fields ``file`` and ``purpose``; only ``fine-tune`` is kept).

    The bytes go to a temp file in the tenant's folder as they arrive; the file is kept only when
    the whole body was read and its fields are accepted."""
    form = UploadForm(boundary_of(request.headers.get("content-type", "")))
    pending = await run_in_threadpool(files.begin_upload, tenant=tenant)
    try:
        async for chunk in request.stream():
            data = form.feed(chunk)  # this chunk's file bytes, written in one call
            if data:
                await run_in_threadpool(files.write, pending, data)
        form.finish()
        if "purpose" not in form.fields:
            raise FileInvalid("purpose: field required ('fine-tune')", param="purpose")
        purpose = form.fields["purpose"].decode("utf-8", "replace").strip()
        filename = form.filename or "upload"
        stored = await run_in_threadpool(lambda: files.finish_upload(pending, filename=filename, purpose=purpose))
    except BaseException:
        pending.abort()
        raise
    return file_object(stored)


@router.get("/v1/files")
def list_files(files: FileServiceDep, tenant: TenantDep, purpose: str | None = None,
               limit: int = Query(10_000, description="How many files a page holds (1 to 10000)."),
               after: str | None = Query(None, description="The id of the file this page starts after."),
               order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
    """The caller's files, newest first unless ``order=asc``, in OpenAI's cursor pages."""
    page = files.list(tenant=tenant, purpose=purpose, limit=limit, after=after, order=order)
    data = [file_object(f) for f in page.data]
    return {"object": "list", "data": data, "has_more": page.has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get("/v1/files/{file_id}")
def retrieve_file(file_id: str, files: FileServiceDep, tenant: TenantDep) -> dict[str, Any]:
    return file_object(files.get(tenant=tenant, file_id=file_id))


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, files: FileServiceDep, tenant: TenantDep) -> StreamingResponse:
    """The file's bytes as uploaded."""
    return StreamingResponse(iterate_in_threadpool(files.content(tenant=tenant, file_id=file_id)),
                             media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, files: FileServiceDep, tenant: TenantDep) -> dict[str, Any]:
    files.delete(tenant=tenant, file_id=file_id)
    return {"id": file_id, "object": "file", "deleted": True}
