"""Typed dependencies for route handlers: the services, built once per app, and the caller's tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from posttrain.services.datasets import DatasetService
from posttrain.services.jobs import JobService


def _jobs(request: Request) -> JobService:
    return request.app.state.jobs


def _datasets(request: Request) -> DatasetService:
    return request.app.state.datasets


def _tenant(request: Request) -> str:
    """The tenant of the caller; set by the API-key middleware (``default`` when keys are off)."""
    return request.state.tenant


JobServiceDep = Annotated[JobService, Depends(_jobs)]
DatasetServiceDep = Annotated[DatasetService, Depends(_datasets)]
TenantDep = Annotated[str, Depends(_tenant)]
