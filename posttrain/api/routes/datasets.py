"""The Datasets and DatasetIO APIs, under ``/v1`` (clients 0.2.x) and ``/v1beta`` (0.3 and later)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from posttrain.api.deps import DatasetServiceDep, TenantDep
from posttrain.api.json_body import INT64_MAX, StrictJSONRoute
from posttrain.api.schemas import (
    AppendRowsRequest,
    DatasetPublic,
    ListDatasetsResponse,
    PaginatedResponse,
    RegisterDatasetRequest,
)
from posttrain.errors import InvalidRequest

router = APIRouter(tags=["Datasets"], route_class=StrictJSONRoute)


def register_dataset(body: RegisterDatasetRequest, datasets: DatasetServiceDep, tenant: TenantDep) -> DatasetPublic:
    """Register a new dataset from inline rows or a URI (local file, file://, data:, huggingface:// from the local cache)."""
    source = body.source.model_dump(mode="json")
    dataset = datasets.register(
        tenant=tenant, purpose=body.purpose, source=source, metadata=body.metadata, dataset_id=body.dataset_id
    )
    return DatasetPublic.from_dataset(dataset)


def list_datasets(datasets: DatasetServiceDep, tenant: TenantDep) -> ListDatasetsResponse:
    """List all datasets."""
    return ListDatasetsResponse(data=[DatasetPublic.from_dataset(d) for d in datasets.list(tenant=tenant)])


def get_dataset(dataset_id: str, datasets: DatasetServiceDep, tenant: TenantDep) -> DatasetPublic:
    """Get a dataset by its ID."""
    return DatasetPublic.from_dataset(datasets.get(tenant=tenant, dataset_id=dataset_id))


def unregister_dataset(dataset_id: str, datasets: DatasetServiceDep, tenant: TenantDep) -> None:
    """Unregister a dataset by its ID."""
    datasets.unregister(tenant=tenant, dataset_id=dataset_id)


def iterrows(
    dataset_id: str,
    request: Request,
    datasets: DatasetServiceDep,
    tenant: TenantDep,
    start_index: int | None = Query(default=None, le=INT64_MAX),
    limit: int | None = Query(default=None, le=INT64_MAX),
) -> PaginatedResponse:
    """Get a page of rows: ``start_index`` (0-based), ``limit`` (None or -1: all the rest)."""
    rows, has_more = datasets.iterrows(tenant=tenant, dataset_id=dataset_id, start_index=start_index, limit=limit)
    return PaginatedResponse(data=rows, has_more=has_more, url=str(request.url.path))


def append_rows(dataset_id: str, body: AppendRowsRequest, datasets: DatasetServiceDep, tenant: TenantDep) -> None:
    """Append rows to a dataset."""
    if body.dataset_id is not None and body.dataset_id != dataset_id:
        raise InvalidRequest(f"dataset_id: the body names '{body.dataset_id}' but the path names '{dataset_id}'")
    datasets.append_rows(tenant=tenant, dataset_id=dataset_id, rows=body.rows)


for prefix in ("/v1", "/v1beta"):
    router.add_api_route(f"{prefix}/datasets", register_dataset, methods=["POST"])
    router.add_api_route(f"{prefix}/datasets", list_datasets, methods=["GET"])
    router.add_api_route(f"{prefix}/datasets/{{dataset_id:path}}", get_dataset, methods=["GET"])
    router.add_api_route(f"{prefix}/datasets/{{dataset_id:path}}", unregister_dataset, methods=["DELETE"])
    router.add_api_route(f"{prefix}/datasetio/iterrows/{{dataset_id:path}}", iterrows, methods=["GET"])
    router.add_api_route(f"{prefix}/datasetio/append-rows/{{dataset_id:path}}", append_rows, methods=["POST"])
