"""OpenAI's fine-tuning API (``/v1/fine_tuning/jobs…``) on the same jobs as the Llama Stack API.

Objects are shaped as the ``openai`` SDK parses them (``FineTuningJob``, ``FineTuningJobEvent``,
``FineTuningJobCheckpoint``, cursor pages). Every job of the tenant is listed here, Llama Stack
jobs included (their id is their job_uuid); refusals leave in OpenAI's error envelope.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from posttrain.api import openai_recipes
from posttrain.api.deps import TenantDep
from posttrain.api.json_body import StrictJSONRoute
from posttrain.api.openai_recipes import CreateFineTuningJob
from posttrain.domain.jobs import Job, JobEvent, JobKind, JobStatus
from posttrain.domain.recipes import DEFAULT_LEARNING_RATE
from posttrain.services.fine_tuning import FineTuningService, StagedData, new_openai_job_id, openai_fields

router = APIRouter(tags=["OpenAI Fine-tuning"], route_class=StrictJSONRoute)

#: Our statuses as OpenAI's (files are checked at create, so no job is ever ``validating_files``).
STATUSES = {JobStatus.SCHEDULED: "queued", JobStatus.IN_PROGRESS: "running", JobStatus.COMPLETED: "succeeded",
            JobStatus.FAILED: "failed", JobStatus.CANCELLED: "cancelled"}
LEVELS = {"warning": "warn", "warn": "warn", "error": "error"}


def _service(request: Request) -> FineTuningService:
    return request.app.state.fine_tuning


FineTuningDep = Annotated[FineTuningService, Depends(_service)]


def _ts(value: Any) -> int | None:
    return int(value.timestamp()) if value is not None else None


def _llama_stack_fields(job: Job) -> dict[str, Any]:
    """What a Llama Stack job shows through the OpenAI API: read from its request and plan."""
    request, recipe = job.request or {}, job.plan.recipe if job.plan else None
    model = request.get("model") or request.get("finetuned_model") or (Path(job.plan.model).name if job.plan else "")
    data = (request.get("training_config") or {}).get("data_config") or {}
    hyper: dict[str, Any] = {}
    if recipe is not None:
        hyper = {"n_epochs": recipe.schedule.n_epochs, "batch_size": recipe.data.batch_size,
                 "learning_rate_multiplier": recipe.optimizer.lr / DEFAULT_LEARNING_RATE}
    kind = "dpo" if job.kind is JobKind.DPO else "supervised"
    method_hyper = {**hyper, "beta": recipe.dpo.beta} if recipe is not None and recipe.dpo is not None else hyper
    return {"model": model, "training_file": data.get("dataset_id", ""),
            "validation_file": data.get("validation_dataset_id"), "suffix": None, "metadata": None,
            "seed": recipe.seed if recipe else 0, "hyperparameters": hyper,
            "method": {"type": kind, kind: {"hyperparameters": method_hyper}}, "integrations": []}


def job_object(job: Job, service: FineTuningService) -> dict[str, Any]:
    fields = openai_fields(job) or _llama_stack_fields(job)
    status = STATUSES[job.status]
    model, suffix = fields["model"], fields.get("suffix")
    trained_tokens = estimated_finish = None
    if status == "succeeded":
        trained_tokens = sum(int(e.data.get("tokens") or 0) for e in service.events(job) if e.type == "metric")
    elif status == "running":
        metric = service.latest_metric(job)
        if metric is not None and metric.data.get("total_steps"):
            left = max(0, int(metric.data["total_steps"]) - int(metric.data.get("step", 0)))
            estimated_finish = int(metric.created_at.timestamp() + left * float(metric.data.get("step_seconds", 0)))
    error = None
    if status == "failed":
        error = {"code": job.error_code or "error", "message": job.error_message or "the job failed", "param": None}
    return {
        "id": job.job_uuid, "object": "fine_tuning.job", "created_at": _ts(job.scheduled_at),
        "finished_at": _ts(job.completed_at), "model": model,
        "fine_tuned_model": f"ft:{model}:{suffix or job.tenant}:{job.job_uuid}" if status == "succeeded" else None,
        "organization_id": f"org-{job.tenant}", "status": status, "error": error,
        "hyperparameters": fields["hyperparameters"], "method": fields["method"], "trained_tokens": trained_tokens,
        "estimated_finish": estimated_finish, "result_files": [], "seed": fields["seed"],
        "metadata": fields.get("metadata"), "integrations": fields.get("integrations") or [],
        "training_file": fields["training_file"], "validation_file": fields.get("validation_file"),
        "user_provided_suffix": suffix,
    }


def event_object(event: JobEvent) -> dict[str, Any]:
    data, kind, level = event.data, "message", "info"
    payload: dict[str, Any] | None = None
    if event.type == "state":
        status = data.get("status", "")
        named = STATUSES.get(JobStatus(status), status) if status in JobStatus._value2member_map_ else status
        message = f"Job {named}" + (f": {data['reason']}" if data.get("reason") else "")
        level = "error" if named == "failed" else "info"
    elif event.type == "started":
        message = f"Training started ({data.get('total_steps', '?')} steps)"
    elif event.type == "metric":
        kind = "metrics"
        payload = {"step": data.get("step"), "train_loss": data.get("loss"), "total_steps": data.get("total_steps"),
                   "learning_rate": data.get("lr"), "epoch": data.get("epoch"), "tokens": data.get("tokens")}
        loss = data.get("loss")
        message = f"Step {data.get('step')}/{data.get('total_steps')}: training loss={loss:.4f}" if loss is not None \
            else f"Step {data.get('step')}/{data.get('total_steps')}"
    elif event.type == "checkpoint":
        message = f"Checkpoint created at step {data.get('step')} (epoch {data.get('epoch')})"
        payload = {"step": data.get("step"), "train_loss": data.get("train_loss"),
                   "valid_loss": data.get("validation_loss")}
    elif event.type == "log":
        message, level = str(data.get("message", "")), LEVELS.get(str(data.get("level", "info")).lower(), "info")
    else:
        message = event.type
    return {"id": f"ftevent-{event.seq}", "object": "fine_tuning.job.event", "created_at": _ts(event.created_at),
            "level": level, "message": message, "type": kind, "data": payload}


def _page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": has_more}


@router.post("/v1/fine_tuning/jobs")
def create_job(body: CreateFineTuningJob, service: FineTuningDep, tenant: TenantDep) -> dict[str, Any]:
    """Create a fine-tuning job on an uploaded training file (supervised: chat rows; dpo: preference rows)."""
    method = openai_recipes.method_of(body)
    wandb = openai_recipes.wandb_run(body, mode=service.settings.wandb_mode)
    hyperparameters, _ = openai_recipes.resolved_hyperparameters(body)
    job_uuid = new_openai_job_id()

    def build(staged: StagedData):  # noqa: ANN202 - a Submission
        return openai_recipes.submission(
            body, job_uuid=job_uuid, model=staged.model.reference, dataset_id=staged.dataset_id,
            validation_dataset_id=staged.validation_dataset_id, train_rows=staged.train_rows,
            validation_rows=staged.validation_rows, wandb=wandb)

    openai: dict[str, Any] = {"model": body.model, "training_file": body.training_file, "validation_file": body.validation_file,
              "suffix": body.suffix, "metadata": body.metadata,
              "seed": body.seed if body.seed is not None else openai_recipes.DEFAULT_SEED,
              "hyperparameters": openai_recipes.top_level_hyperparameters(hyperparameters),
              "method": openai_recipes.method_object(body, hyperparameters),
              "integrations": openai_recipes.integrations_object(wandb)}
    job = service.create(tenant=tenant, job_uuid=job_uuid, model=body.model, training_file=body.training_file,
                         validation_file=body.validation_file, method=method, build=build, openai=openai)
    return job_object(job, service)


@router.get("/v1/fine_tuning/jobs")
def list_jobs(request: Request, service: FineTuningDep, tenant: TenantDep,
              after: str | None = Query(None, description="The id of the job this page starts after."),
              limit: int = Query(20, ge=1, le=1000)) -> dict[str, Any]:
    """The tenant's jobs, newest first; ``metadata[key]=value`` keeps those whose metadata holds it."""
    metadata = {key[len("metadata["):-1]: value for key, value in request.query_params.items()
                if key.startswith("metadata[") and key.endswith("]")}
    jobs, has_more = service.list(tenant=tenant, after=after, limit=limit, metadata=metadata)
    return _page([job_object(job, service) for job in jobs], has_more)


@router.get("/v1/fine_tuning/jobs/{job_id}")
def retrieve_job(job_id: str, service: FineTuningDep, tenant: TenantDep) -> dict[str, Any]:
    return job_object(service.get(tenant=tenant, job_id=job_id), service)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, service: FineTuningDep, tenant: TenantDep) -> dict[str, Any]:
    """Cancel a queued or running job (a finished one is a 409)."""
    return job_object(service.cancel(tenant=tenant, job_id=job_id), service)


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
def list_events(job_id: str, service: FineTuningDep, tenant: TenantDep,
                after: str | None = Query(None, description="The id of the event this page starts after."),
                limit: int = Query(20, ge=1, le=10000)) -> dict[str, Any]:
    """The job's events, newest first: state changes, per-step metrics, checkpoints, log lines."""
    job = service.get(tenant=tenant, job_id=job_id)
    before = None
    if after is not None:
        seq = after.removeprefix("ftevent-")
        if not seq.isascii() or not seq.isdigit():
            raise openai_recipes.Refusal("after", f"not an event id of this job: {after!r}")
        before = int(seq)
    events, has_more = service.events_page(job, before=before, limit=limit)
    return _page([event_object(e) for e in events], has_more)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(job_id: str, service: FineTuningDep, tenant: TenantDep,
                     after: str | None = Query(None, description="The id of the checkpoint this page starts after."),
                     limit: int = Query(10, ge=1, le=1000)) -> dict[str, Any]:
    """The job's checkpoints (one per epoch), newest first."""
    job = service.get(tenant=tenant, job_id=job_id)
    fields = openai_fields(job) or _llama_stack_fields(job)
    objects = [{
        "id": f"ftckpt-{job.id}-{c.epoch}", "object": "fine_tuning.job.checkpoint", "created_at": _ts(c.created_at),
        "fine_tuning_job_id": job.job_uuid, "step_number": c.step,
        "fine_tuned_model_checkpoint": f"ft:{fields['model']}:{fields.get('suffix') or job.tenant}:{job.job_uuid}"
                                       f":ckpt-step-{c.step}",
        "metrics": {"step": c.step, "train_loss": c.metrics.train_loss if c.metrics else None,
                    "valid_loss": c.metrics.validation_loss if c.metrics else None,
                    "full_valid_loss": c.metrics.validation_loss if c.metrics else None},
    } for c in reversed(job.checkpoints)]
    if after is not None:
        ids = [o["id"] for o in objects]
        if after not in ids:
            raise openai_recipes.Refusal("after", f"not a checkpoint id of this job: {after!r}")
        objects = objects[ids.index(after) + 1:]
    page = objects[:limit]
    body = _page(page, len(objects) > limit)
    body.update(first_id=page[0]["id"] if page else None, last_id=page[-1]["id"] if page else None)
    return body
