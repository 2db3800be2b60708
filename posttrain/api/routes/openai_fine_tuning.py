"""OpenAI's fine-tuning API (``/v1/fine_tuning/jobs…``) on the same jobs as the Llama Stack API.

Objects are shaped as the ``openai`` SDK parses them (``FineTuningJob``, ``FineTuningJobEvent``,
``FineTuningJobCheckpoint``, cursor pages). Every job of the tenant is listed here, Llama Stack
jobs included (their id is their job_uuid); refusals leave in OpenAI's error envelope.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from posttrain.api import openai_recipes
from posttrain.api.deps import TenantDep
from posttrain.api.json_body import StrictJSONRoute
from posttrain.api.openai_recipes import CreateFineTuningJob
from posttrain.domain.graders import GraderInvalid
from posttrain.domain.jobs import Job, JobEvent, JobKind, JobStatus
from posttrain.domain.recipes import DEFAULT_LEARNING_RATE
from posttrain.services.fine_tuning import (
    FineTuningService,
    StagedData,
    estimated_finish,
    new_openai_job_id,
    openai_fields,
    trained_tokens,
)
from posttrain.services.graders import check_grader_allowed
from posttrain.services.model_names import base_name_of, checkpoint_model_id, fine_tuned_model_id

router = APIRouter(tags=["OpenAI Fine-tuning"], route_class=StrictJSONRoute)

#: Our statuses as OpenAI's (files are checked at create, so no job is ever ``validating_files``).
#: ``pausing`` and ``paused`` are not in the SDKs' ``FineTuningJob.status`` literal; both SDK
#: releases tested keep the string as sent (docs/openai-api.md).
STATUSES = {JobStatus.SCHEDULED: "queued", JobStatus.IN_PROGRESS: "running", JobStatus.COMPLETED: "succeeded",
            JobStatus.FAILED: "failed", JobStatus.CANCELLED: "cancelled", JobStatus.PAUSING: "pausing",
            JobStatus.PAUSED: "paused"}
LEVELS = {"warning": "warn", "warn": "warn", "error": "error"}
#: A state event's message, as OpenAI words them where it has the event.
STATE_MESSAGES = {JobStatus.SCHEDULED: "Job queued", JobStatus.IN_PROGRESS: "Fine-tuning job started",
                  JobStatus.COMPLETED: "The job has successfully completed", JobStatus.FAILED: "Job failed",
                  JobStatus.CANCELLED: "Job cancelled", JobStatus.PAUSING: "Job pausing",
                  JobStatus.PAUSED: "Job paused"}
#: The optional metrics a step's ``metrics`` event carries when the trainer measured them.
STEP_EXTRAS = ("valid_loss", "valid_mean_token_accuracy",
               # a reinforcement job's (trainer/grpo.py)
               "reward_mean", "reward_std", "valid_reward_mean", "kl", "entropy", "completion_length",
               "clip_ratio_region")


def _service(request: Request) -> FineTuningService:
    return request.app.state.fine_tuning


FineTuningDep = Annotated[FineTuningService, Depends(_service)]


def _ts(value: Any) -> int | None:
    return int(value.timestamp()) if value is not None else None


def _llama_stack_fields(job: Job) -> dict[str, Any]:
    """What a Llama Stack job shows through the OpenAI API: read from its request and plan."""
    request, recipe = job.request or {}, job.plan.recipe if job.plan else None
    model = base_name_of(job)
    data = (request.get("training_config") or {}).get("data_config") or {}
    hyper: dict[str, Any] = {}
    if recipe is not None:
        hyper = {"n_epochs": recipe.schedule.n_epochs, "batch_size": recipe.data.batch_size,
                 "learning_rate_multiplier": recipe.optimizer.lr / DEFAULT_LEARNING_RATE}
    kind = {JobKind.DPO: "dpo", JobKind.GRPO: "reinforcement"}.get(job.kind, "supervised")
    method_hyper = {**hyper, "beta": recipe.dpo.beta} if recipe is not None and recipe.dpo is not None else hyper
    return {"model": model, "training_file": data.get("dataset_id", ""),
            "validation_file": data.get("validation_dataset_id"), "suffix": None, "metadata": None,
            "seed": recipe.seed if recipe else 0, "hyperparameters": hyper,
            "method": {"type": kind, kind: {"hyperparameters": method_hyper}}, "integrations": []}


def fine_tuned_model(job: Job, fields: dict[str, Any]) -> str:
    """The name OpenAI gives the trained model: ``ft:<model>:<suffix or tenant>:<job id>``
    (``services.model_names``, which the models API resolves)."""
    return fine_tuned_model_id(base=fields["model"], suffix=fields.get("suffix"), tenant=job.tenant,
                               job_uuid=job.job_uuid)


def _fields(job: Job) -> dict[str, Any]:
    return openai_fields(job) or _llama_stack_fields(job)


def job_object(job: Job, service: FineTuningService) -> dict[str, Any]:
    fields = _fields(job)
    status = STATUSES[job.status]
    model, suffix = fields["model"], fields.get("suffix")
    trained = finish = None
    if status in ("succeeded", "running"):
        events = service.events(job)
        if status == "succeeded":
            trained = trained_tokens(events)
        else:
            finish = estimated_finish(events, time.time())
    error = None
    if status == "failed":
        error = {"code": job.error_code or "error", "message": job.error_message or "the job failed", "param": None}
    return {
        "id": job.job_uuid, "object": "fine_tuning.job", "created_at": _ts(job.scheduled_at),
        "finished_at": _ts(job.completed_at) if job.is_terminal else None, "model": model,
        "fine_tuned_model": fine_tuned_model(job, fields) if status == "succeeded" else None,
        "organization_id": f"org-{job.tenant}", "status": status, "error": error,
        "hyperparameters": fields["hyperparameters"], "method": fields["method"], "trained_tokens": trained,
        "estimated_finish": finish, "result_files": [], "seed": fields["seed"],
        "metadata": fields.get("metadata"), "integrations": fields.get("integrations") or [],
        "training_file": fields["training_file"], "validation_file": fields.get("validation_file"),
        "user_provided_suffix": suffix,
    }


def _state_message(data: dict[str, Any], previous: str | None) -> tuple[str, str]:
    """A state event's message and level: OpenAI's words, the reason after a colon when there is
    one (a queued job after a pause reads "Job resumed", after a lost worker "Job requeued")."""
    raw, reason = str(data.get("status", "")), data.get("reason")
    status = JobStatus(raw) if raw in JobStatus._value2member_map_ else None
    if status is None:
        return f"Job {raw}", "info"
    message = STATE_MESSAGES[status]
    if status is JobStatus.SCHEDULED and previous is not None:
        message = "Job resumed" if previous == JobStatus.PAUSED.value else "Job requeued"
    if reason and (status is JobStatus.FAILED or message == "Job requeued"):
        message += f": {reason}"
    return message, "error" if status is JobStatus.FAILED else "info"


def event_objects(job: Job, events: list[JobEvent]) -> list[dict[str, Any]]:
    """The job's events as OpenAI's, oldest first: state changes as messages (a completed job's
    also says "New fine-tuned model created"), each step as a ``metrics`` event, checkpoints and
    trainer log lines as messages."""
    fields, previous, out = _fields(job), None, []

    def add(event: JobEvent, message: str, *, level: str = "info", kind: str = "message",
            data: dict[str, Any] | None = None, key: str = "") -> None:
        out.append({"id": f"ftevent-{event.seq}{key}", "object": "fine_tuning.job.event",
                    "created_at": _ts(event.created_at), "level": level, "message": message, "type": kind,
                    "data": data})

    for event in events:
        data = event.data
        if event.type == "state":
            if data.get("status") == JobStatus.COMPLETED.value:
                add(event, f"New fine-tuned model created: {fine_tuned_model(job, fields)}", key="-model")
            message, level = _state_message(data, previous)
            previous = str(data.get("status"))
            add(event, message, level=level)
        elif event.type == "metric":
            metrics = {"step": data.get("step"), "train_loss": data.get("loss"),
                       "train_mean_token_accuracy": data.get("train_mean_token_accuracy"),
                       "total_steps": data.get("total_steps")}
            metrics |= {name: data[name] for name in STEP_EXTRAS if data.get(name) is not None}
            loss = data.get("loss")
            message = f"Step {data.get('step')}/{data.get('total_steps')}" + \
                (f": training loss={loss:.4f}" if isinstance(loss, (int, float)) else "")
            add(event, message, kind="metrics", data=metrics)
        elif event.type == "checkpoint":
            add(event, f"Checkpoint created at step {data.get('step')} with Snapshot ID: "
                       f"{checkpoint_model_id(fine_tuned_model(job, fields), data.get('step'))}")
        elif event.type == "log":
            add(event, str(data.get("message", "")), level=LEVELS.get(str(data.get("level", "info")).lower(), "info"))
        elif event.type == "started":
            add(event, f"Training started ({data.get('total_steps', '?')} steps)")
        else:
            add(event, event.type)
    return out


def checkpoint_objects(job: Job, events: list[JobEvent]) -> list[dict[str, Any]]:
    """The job's checkpoints on disk, newest first, with the metrics the trainer measured for each
    (kept in its checkpoint event; None where it measured none, as without a validation file)."""
    fields = _fields(job)
    measured = {e.data.get("identifier"): e.data for e in events if e.type == "checkpoint"}
    objects = []
    for c in reversed(job.checkpoints):
        data = measured.get(c.identifier, {})
        objects.append({
            "id": f"ftckpt-{job.id}-{c.epoch}", "object": "fine_tuning.job.checkpoint",
            "created_at": _ts(c.created_at), "fine_tuning_job_id": job.job_uuid, "step_number": c.step,
            "fine_tuned_model_checkpoint": checkpoint_model_id(fine_tuned_model(job, fields), c.step),
            "metrics": {"step": c.step,
                        "train_loss": data.get("train_loss", c.metrics.train_loss if c.metrics else None),
                        "train_mean_token_accuracy": data.get("train_mean_token_accuracy"),
                        "valid_loss": data.get("validation_loss",
                                               c.metrics.validation_loss if c.metrics else None),
                        "valid_mean_token_accuracy": data.get("valid_mean_token_accuracy"),
                        "full_valid_loss": data.get("full_valid_loss"),
                        "full_valid_mean_token_accuracy": data.get("full_valid_mean_token_accuracy"),
                        **(_rewards_by(c.step, events) if job.kind is JobKind.GRPO else {})},
        })
    return objects


def _rewards_by(step: int, events: list[JobEvent]) -> dict[str, float | None]:
    """A reinforcement job's rewards at a checkpoint: the mean step reward of the epoch that ends at
    ``step`` (its steps since the previous checkpoint) and the latest validation reward by then,
    read from the step metrics (the checkpoint event itself carries losses only)."""
    previous = max((int(e.data.get("step") or 0) for e in events if e.type == "checkpoint"
                    and int(e.data.get("step") or 0) < step), default=0)
    steps = {int(e.data["step"]): e.data for e in events if e.type == "metric" and isinstance(e.data.get("step"), int)}
    epoch = [d["reward_mean"] for s, d in steps.items() if previous < s <= step
             and isinstance(d.get("reward_mean"), (int, float))]
    valid = [d["valid_reward_mean"] for s, d in sorted(steps.items()) if s <= step
             and isinstance(d.get("valid_reward_mean"), (int, float))]
    return {"train_reward_mean": sum(epoch) / len(epoch) if epoch else None,
            "valid_reward_mean": valid[-1] if valid else None}


def _after(objects: list[dict[str, Any]], after: str | None, what: str) -> list[dict[str, Any]]:
    """The objects after the one whose id is ``after`` (OpenAI's cursor); an id not among them is a 400."""
    if after is None:
        return objects
    ids = [o["id"] for o in objects]
    if after not in ids:
        raise openai_recipes.Refusal("after", f"not {what} id of this job: {after!r}")
    return objects[ids.index(after) + 1:]


def _page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": has_more}


@router.post("/v1/fine_tuning/jobs")
def create_job(body: CreateFineTuningJob, service: FineTuningDep, tenant: TenantDep) -> dict[str, Any]:
    """Create a fine-tuning job on an uploaded training file (supervised: chat rows; dpo: preference rows)."""
    method = openai_recipes.method_of(body)
    grader = openai_recipes.grader_of(body)
    if grader is not None:  # what this server runs: python graders by the operator's leave, judges it serves
        try:
            check_grader_allowed(grader, service.settings, keys_on=service.settings.api_keys_file is not None,
                                 param="method.reinforcement.grader", tenant=tenant, models=service.jobs.models)
        except GraderInvalid as exc:
            raise openai_recipes.Refusal(exc.param, exc.message) from None
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
    if body.metadata is None:
        del openai["metadata"]  # absent, not null: the list's metadata filter reads a missing key as no metadata
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


@router.post("/v1/fine_tuning/jobs/{job_id}/pause")
def pause_job(job_id: str, service: FineTuningDep, tenant: TenantDep) -> dict[str, Any]:
    """Pause a queued job (``paused`` at once) or a running one (``pausing`` until its trainer has
    written a resume point, then ``paused``); any other status is a 409."""
    return job_object(service.pause(tenant=tenant, job_id=job_id), service)


@router.post("/v1/fine_tuning/jobs/{job_id}/resume")
def resume_job(job_id: str, service: FineTuningDep, tenant: TenantDep) -> dict[str, Any]:
    """Queue a paused job again; it continues from the step where it paused. Not paused: 409."""
    return job_object(service.resume(tenant=tenant, job_id=job_id), service)


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
def list_events(job_id: str, service: FineTuningDep, tenant: TenantDep,
                after: str | None = Query(None, description="The id of the event this page starts after."),
                limit: int = Query(20, ge=1, le=10000)) -> dict[str, Any]:
    """The job's events, newest first: state changes, per-step metrics, checkpoints, log lines."""
    job = service.get(tenant=tenant, job_id=job_id)
    objects = _after(list(reversed(event_objects(job, service.events(job)))), after, "an event")
    return _page(objects[:limit], len(objects) > limit)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(job_id: str, service: FineTuningDep, tenant: TenantDep,
                     after: str | None = Query(None, description="The id of the checkpoint this page starts after."),
                     limit: int = Query(10, ge=1, le=1000)) -> dict[str, Any]:
    """The job's checkpoints (one per epoch), newest first."""
    job = service.get(tenant=tenant, job_id=job_id)
    objects = _after(checkpoint_objects(job, service.events(job)), after, "a checkpoint")
    page = objects[:limit]
    body = _page(page, len(objects) > limit)
    body.update(first_id=page[0]["id"] if page else None, last_id=page[-1]["id"] if page else None)
    return body
