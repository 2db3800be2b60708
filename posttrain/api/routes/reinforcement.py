"""Our own reinforcement door beside the Llama Stack paths: ``POST /v1/posttrain/reinforcement-fine-tune``.

The job it makes is an ordinary job: listed, watched and cancelled through the Llama Stack paths
(``/v1/post-training/job/status`` shows its checkpoints like any other), the events stream, the
CLI and the dashboard. Refusals are RFC 7807 Problems, as on the Llama Stack paths.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from posttrain.api import llama_stack_recipes, posttrain_recipes
from posttrain.api.deps import JobServiceDep, TenantDep
from posttrain.api.json_body import StrictJSONRoute
from posttrain.api.posttrain_recipes import ReinforcementFineTuneRequest
from posttrain.api.schemas import PostTrainingJob
from posttrain.domain.graders import GraderInvalid
from posttrain.errors import RecipeInvalid
from posttrain.services.graders import check_grader_allowed

router = APIRouter(tags=["PostTraining"], route_class=StrictJSONRoute)


@router.post("/v1/posttrain/reinforcement-fine-tune")
def reinforcement_fine_tune(body: ReinforcementFineTuneRequest, jobs: JobServiceDep, tenant: TenantDep,
                            request: Request) -> PostTrainingJob:
    """Run reinforcement fine-tuning (GRPO) with a grader scoring each sampled completion."""
    settings = request.app.state.settings
    try:
        grader = posttrain_recipes.grader_of(body)
        # What this server runs: python graders by the operator's leave, judges it serves to this tenant.
        check_grader_allowed(grader, settings, keys_on=settings.api_keys_file is not None, param="grader",
                             tenant=tenant, models=jobs.models)
    except GraderInvalid as exc:
        raise RecipeInvalid(field=exc.param, reason=exc.message) from None
    keep = llama_stack_recipes.keep_checkpoints(request.headers.get(llama_stack_recipes.KEEP_CHECKPOINTS_HEADER))
    submission = posttrain_recipes.reinforcement_submission(body, keep)
    job = jobs.submit(tenant=tenant, submission=submission, request=posttrain_recipes.recorded_request(body))
    return PostTrainingJob(job_uuid=job.job_uuid)
