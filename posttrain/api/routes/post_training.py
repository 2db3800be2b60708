"""The Post-Training API: submit, list, status, artifacts, cancel.

Path generations: clients 0.2.x call ``/v1/post-training/…``; 0.3 to 0.5 call
``/v1alpha/post-training/job/…?job_uuid=``; 0.6 calls ``/v1alpha/post-training/jobs/{job_uuid}/…``.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from posttrain.api import llama_stack_recipes
from posttrain.api.deps import JobServiceDep, TenantDep
from posttrain.api.json_body import StrictJSONRoute
from posttrain.api.schemas import (
    CancelTrainingJobRequest,
    ListPostTrainingJobsResponse,
    PostTrainingJob,
    PostTrainingJobArtifactsResponse,
    PostTrainingJobStatusResponse,
    PreferenceOptimizeRequest,
    SupervisedFineTuneRequest,
)
from posttrain.errors import InvalidRequest

router = APIRouter(tags=["PostTraining"], route_class=StrictJSONRoute)
JobUUIDQuery = Query(description="The UUID of the job.")


def _keep(request: Request) -> int | None:
    return llama_stack_recipes.keep_checkpoints(request.headers.get(llama_stack_recipes.KEEP_CHECKPOINTS_HEADER))


def supervised_fine_tune(body: SupervisedFineTuneRequest, jobs: JobServiceDep, tenant: TenantDep,
                         request: Request) -> PostTrainingJob:
    """Run supervised fine-tuning (LoRA, or a full fine-tune without algorithm_config)."""
    devices = llama_stack_recipes.devices_wanted(request.headers.get(llama_stack_recipes.DEVICES_HEADER))
    submission = llama_stack_recipes.sft_submission(body, _keep(request), devices)
    job = jobs.submit(tenant=tenant, submission=submission, request=body.model_dump(mode="json", exclude_unset=True),
                      search=llama_stack_recipes.search_config(body.hyperparam_search_config, submission))
    return PostTrainingJob(job_uuid=job.job_uuid)


def preference_optimize(body: PreferenceOptimizeRequest, jobs: JobServiceDep, tenant: TenantDep,
                        request: Request) -> PostTrainingJob:
    """Run preference optimization (DPO)."""
    devices = llama_stack_recipes.devices_wanted(request.headers.get(llama_stack_recipes.DEVICES_HEADER))
    submission = llama_stack_recipes.dpo_submission(body, _keep(request), devices)
    job = jobs.submit(tenant=tenant, submission=submission, request=body.model_dump(mode="json", exclude_unset=True),
                      search=llama_stack_recipes.search_config(body.hyperparam_search_config, submission))
    return PostTrainingJob(job_uuid=job.job_uuid)


def list_jobs(jobs: JobServiceDep, tenant: TenantDep) -> ListPostTrainingJobsResponse:
    """Get all training jobs."""
    return ListPostTrainingJobsResponse.from_uuids(jobs.list(tenant=tenant))


def job_status(jobs: JobServiceDep, tenant: TenantDep, job_uuid: str = JobUUIDQuery) -> PostTrainingJobStatusResponse:
    """Get the status of a training job."""
    return PostTrainingJobStatusResponse.from_job(jobs.get(tenant=tenant, job_uuid=job_uuid, with_payload=False))


def job_artifacts(jobs: JobServiceDep, tenant: TenantDep, job_uuid: str = JobUUIDQuery) -> PostTrainingJobArtifactsResponse:
    """Get the artifacts (checkpoints) of a training job."""
    return PostTrainingJobArtifactsResponse.from_job(jobs.get(tenant=tenant, job_uuid=job_uuid, with_payload=False))


def cancel_job(
    jobs: JobServiceDep,
    tenant: TenantDep,
    body: CancelTrainingJobRequest | None = None,
    job_uuid: str | None = Query(default=None, description="The job to cancel, when the body does not name it."),
) -> None:
    """Cancel a training job: a scheduled one at once, a running one within seconds.

    Clients 0.5 and later cannot put job_uuid in the body of this call; they may send it as a
    query parameter instead, so both are accepted.
    """
    target = body.job_uuid if body is not None else job_uuid
    if not target:
        raise InvalidRequest("job_uuid: field required (in the JSON body)")
    jobs.cancel(tenant=tenant, job_uuid=target)


def job_status_by_path(job_uuid: str, jobs: JobServiceDep, tenant: TenantDep) -> PostTrainingJobStatusResponse:
    """Get the status of a training job (0.6 client path form)."""
    return PostTrainingJobStatusResponse.from_job(jobs.get(tenant=tenant, job_uuid=job_uuid, with_payload=False))


def job_artifacts_by_path(job_uuid: str, jobs: JobServiceDep, tenant: TenantDep) -> PostTrainingJobArtifactsResponse:
    """Get the artifacts of a training job (0.6 client path form)."""
    return PostTrainingJobArtifactsResponse.from_job(jobs.get(tenant=tenant, job_uuid=job_uuid, with_payload=False))


def cancel_job_by_path(job_uuid: str, jobs: JobServiceDep, tenant: TenantDep) -> None:
    """Cancel a training job (0.6 client path form)."""
    jobs.cancel(tenant=tenant, job_uuid=job_uuid)


for prefix in ("/v1", "/v1alpha"):
    base = f"{prefix}/post-training"
    router.add_api_route(f"{base}/supervised-fine-tune", supervised_fine_tune, methods=["POST"])
    router.add_api_route(f"{base}/preference-optimize", preference_optimize, methods=["POST"])
    router.add_api_route(f"{base}/jobs", list_jobs, methods=["GET"])
    router.add_api_route(f"{base}/job/status", job_status, methods=["GET"])
    router.add_api_route(f"{base}/job/artifacts", job_artifacts, methods=["GET"])
    router.add_api_route(f"{base}/job/cancel", cancel_job, methods=["POST"])

# ``:path`` so a job_uuid with a slash in it (accepted at submit, and reached by the query routes
# every released client calls) is reached here too, sent as is or percent-encoded (%2F).
router.add_api_route("/v1alpha/post-training/jobs/{job_uuid:path}/status", job_status_by_path, methods=["GET"])
router.add_api_route("/v1alpha/post-training/jobs/{job_uuid:path}/artifacts", job_artifacts_by_path, methods=["GET"])
router.add_api_route("/v1alpha/post-training/jobs/{job_uuid:path}/cancel", cancel_job_by_path, methods=["POST"])
