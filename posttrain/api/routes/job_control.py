"""Our own endpoints beside the Llama Stack ones: pause and resume a training job.

``POST /v1/posttrain/jobs/{job_uuid}/pause`` pauses a queued job at once and a running one within
seconds (``pausing`` until its trainer has written a resume point and stopped, then ``paused``,
holding no process or slot); ``POST /v1/posttrain/jobs/{job_uuid}/resume`` puts a paused job back
in the queue, to continue from the step where it stopped. Both answer the job's status as it is now
(the real one; the Llama Stack status endpoint shows ``pausing`` as ``in_progress`` and ``paused``
as ``scheduled``). A job in a state that does not allow the move is a 409, another tenant's or a
missing one a 404, both RFC 7807 bodies.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from posttrain.api.deps import JobServiceDep, TenantDep
from posttrain.api.json_body import StrictJSONRoute
from posttrain.domain.jobs import Job

router = APIRouter(tags=["Job control (posttrain extension)"], route_class=StrictJSONRoute)


class JobControlResponse(BaseModel):
    """The job after the request: ``status`` is its own (``pausing``, ``paused``, ``scheduled``, …)."""

    job_uuid: str
    status: Literal["scheduled", "in_progress", "pausing", "paused", "completed", "failed", "cancelled"]

    @classmethod
    def from_job(cls, job: Job) -> JobControlResponse:
        return cls(job_uuid=job.job_uuid, status=job.status.value)


def pause_job(job_uuid: str, jobs: JobServiceDep, tenant: TenantDep) -> JobControlResponse:
    """Pause a training job (a queued one at once, a running one at its next optimizer step)."""
    return JobControlResponse.from_job(jobs.pause(tenant=tenant, job_uuid=job_uuid))


def resume_job(job_uuid: str, jobs: JobServiceDep, tenant: TenantDep) -> JobControlResponse:
    """Resume a paused training job: back to the queue, continuing where it paused."""
    return JobControlResponse.from_job(jobs.resume(tenant=tenant, job_uuid=job_uuid))


# ``:path`` so a job_uuid with a slash in it is reached too, as the Llama Stack path routes do.
router.add_api_route("/v1/posttrain/jobs/{job_uuid:path}/pause", pause_job, methods=["POST"])
router.add_api_route("/v1/posttrain/jobs/{job_uuid:path}/resume", resume_job, methods=["POST"])
