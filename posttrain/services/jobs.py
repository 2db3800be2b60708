"""Submitting, reading, cancelling, pausing and resuming training jobs.

Submitting resolves everything a trainer will need (model folder, the job's own copy of its
rows, its output folder) and refuses the request if any of it is wrong, so a job that is
accepted can run; a refused request leaves nothing behind.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.domain.graders import GraderInvalid, parse_grader
from posttrain.domain.jobs import Job, JobKind, JobStatus
from posttrain.domain.pins import PathPin
from posttrain.domain.recipes import MAX_ID_LENGTH, JobPlan, Judge, Submission
from posttrain.domain.rows import RowFormatError, normalize_prompt_row
from posttrain.domain.search import SearchConfig
from posttrain.errors import (
    DuplicateJob,
    InvalidRequest,
    InvalidTransition,
    JobNotFound,
    RateLimited,
    RecipeInvalid,
    TransitionRefused,
)
from posttrain.services.graders import judges_for
from posttrain.services.models import check_adapter_size, check_default_lora_targets, resolve_model
from posttrain.services.paths import FileAreas, areas_of, create_output_folder, pin_checked, resolve_writable
from posttrain.settings import Settings
from posttrain.store.datasets import DatasetStore
from posttrain.store.jobs import JobStore, QuotaFull, new_job_id


def job_folder(jobs_dir: Path, job_id: str) -> Path:
    """A job's own folder, named by the service's key (job_uuid is client text, and two tenants
    may use the same one)."""
    return jobs_dir / job_id


def _quota_full(quota: int) -> RateLimited:
    return RateLimited(f"this tenant already has {quota} scheduled or running job(s), the most allowed; "
                       "wait for one to finish or cancel one", retry_after=30)


class JobService:
    def __init__(self, *, store: JobStore, datasets: DatasetStore, settings: Settings) -> None:
        self.store = store
        self.datasets = datasets
        self.settings = settings

    @property
    def models(self):  # noqa: ANN201 - a ModelCatalog (imported here: it imports this module's importers)
        """What a score_model grader's judge is looked up in (the tenant's models, as /v1/models lists them)."""
        from posttrain.services.model_catalog import ModelCatalog
        from posttrain.store.model_catalog import ModelCatalogStore

        return ModelCatalog(ModelCatalogStore(self.store.engine), self.settings)

    # -- submit --------------------------------------------------------------------------------

    def submit(self, *, tenant: str, submission: Submission, request: dict[str, Any],
               search: SearchConfig | None = None) -> Job:
        """Resolve what ``submission`` names and queue the job; ``request`` is the body as the
        client sent it, kept with the job for the record. Refused requests leave nothing behind.

        With ``search`` the job is a hyperparameter search: its plan is the one every trial starts
        from, and a worker's search driver queues the trials as child jobs
        (docs/hyperparameter-search.md)."""
        names, recipe = submission.names, submission.recipe
        if search is not None and search.num_trials > self.settings.max_search_trials:
            raise InvalidRequest(f"hyperparam_search_config.num_trials: at most {self.settings.max_search_trials} on "
                                 f"this server (POSTTRAIN_MAX_SEARCH_TRIALS), got {search.num_trials}")
        if search is not None and len(f"{submission.job_uuid}.trial-{search.num_trials - 1}") > MAX_ID_LENGTH:
            raise InvalidRequest(f"job_uuid: a search names its trials <job_uuid>.trial-<n>, which must fit "
                                 f"{MAX_ID_LENGTH} characters; use a shorter job_uuid")
        job_uuid = submission.job_uuid
        if self.store.find(tenant=tenant, job_uuid=job_uuid, with_payload=False) is not None:
            raise DuplicateJob(f"a job with job_uuid '{job_uuid}' already exists")
        quota = self.settings.max_queued_jobs_per_tenant
        # A cheap early refusal (no rows copied); the insert below counts again, atomically, so
        # concurrent submits cannot all pass this check and overshoot the quota.
        if quota is not None and self.store.count_active(tenant=tenant) >= quota:
            raise _quota_full(quota)
        model_name = submission.model
        model_roots = list(self.settings.allowed_model_roots)
        if recipe.method is JobKind.DPO and model_name:
            # DPO may start from one of the caller's own checkpoints, named by identifier or path,
            # wherever this server keeps it (never another tenant's: the lookup is by tenant).
            own = self.store.find_checkpoint(tenant=tenant, reference=model_name.removeprefix("file://"))
            if own is not None:
                model_name = own.path
                model_roots.append(Path(own.path))
        areas = areas_of(self.settings, tenant)
        model, adapter = resolve_model(
            model_name,
            model_roots=model_roots,
            hf_cache=self.settings.hf_cache,
            trust_remote_code=self.settings.trust_remote_code,
            field=names.model,
            allow_adapter=recipe.method is JobKind.DPO,
            areas=areas,
        )
        # What the trainer will read, pinned as checked (the launcher and trainer re-check it),
        # before anything in it is read here.
        readable = [*model_roots, self.settings.hf_cache.expanduser().resolve()]
        model = model.resolve()
        pins = [pin_checked(model, role="model", within=readable, areas=areas, field=names.model)]
        if adapter:
            pins.append(pin_checked(adapter, role="adapter", within=readable, areas=areas, field=names.model))
        check_default_lora_targets(model, recipe.adapter, field=names.model)
        check_adapter_size(model, recipe.adapter, field=names.model)
        judges, judge_pins = self._judges(tenant, submission, areas)
        pins.extend(judge_pins)
        sources = [("train.jsonl", submission.dataset_id, names.dataset_id)]
        if submission.validation_dataset_id:
            sources.append(("validation.jsonl", submission.validation_dataset_id, names.validation_dataset_id))
        for _, dataset_id, field in sources:
            self._dataset(tenant, dataset_id, field)  # refused before anything is written
        job_id = new_job_id()
        folder = job_folder(self.settings.jobs_dir, job_id)
        output_areas = areas if submission.checkpoint_dir else None
        if submission.checkpoint_dir:
            # Only into the tenant's own file area: never another tenant's, never a shared root.
            output_dir = resolve_writable(submission.checkpoint_dir, areas=areas, field=names.checkpoint_dir)
            output_dir = output_dir / folder.name
        else:
            output_dir = folder / "checkpoints"
        # The job keeps its own copy of its rows: later appends or an unregister do not change a
        # submitted job, and a resumed job sees exactly the rows its first attempt saw.
        folder.mkdir(parents=True, exist_ok=True)
        made_output = False
        try:
            for name, dataset_id, field in sources:
                self._copy_rows(tenant, dataset_id, field, folder / name,
                                prompts_only=recipe.method is JobKind.GRPO)
            train_rows = folder / "train.jsonl"
            validation_rows = folder / "validation.jsonl" if len(sources) > 1 else None
            # The server makes the output folder, so the trainer never creates a folder on a path
            # a tenant can swap; the trainer re-checks the pin before it writes.
            create_output_folder(output_dir, areas=output_areas, field=names.checkpoint_dir,
                                 raw=submission.checkpoint_dir or "")
            made_output = True
            pins.append(pin_checked(output_dir, role="output_dir", within=[output_dir], areas=None,
                                    field=names.checkpoint_dir))
            plan = JobPlan(recipe=recipe, model=str(model), adapter=str(adapter) if adapter else None,
                           output_dir=str(output_dir), train_rows_path=str(train_rows),
                           validation_rows_path=str(validation_rows) if validation_rows else None, pins=tuple(pins),
                           judges=judges)
            try:
                return self.store.create(job_id=job_id, job_uuid=job_uuid, tenant=tenant, kind=recipe.method,
                                         request=request, plan=plan, max_attempts=self.settings.max_attempts,
                                         max_active=quota,
                                         search=search.model_dump(mode="json") if search is not None else None)
            except QuotaFull as exc:
                raise _quota_full(exc.quota) from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            if made_output and submission.checkpoint_dir:
                with contextlib.suppress(OSError):
                    output_dir.rmdir()  # empty: nothing has written there yet
            raise

    def _judges(self, tenant: str, submission: Submission, areas: FileAreas) -> tuple[tuple[Judge, ...], list[PathPin]]:
        """A GRPO job's score_model judges, resolved for this tenant and pinned (the doors checked
        them already, naming the field their way; this is the check that holds)."""
        grpo = submission.recipe.grpo
        if submission.recipe.method is not JobKind.GRPO or grpo is None:
            return (), []
        try:
            return judges_for(parse_grader(grpo.grader, param="grpo.grader"), tenant=tenant, models=self.models,
                              settings=self.settings, areas=areas, param="grpo.grader")
        except GraderInvalid as exc:
            raise RecipeInvalid(field=exc.param, reason=exc.message) from None

    def _dataset(self, tenant: str, dataset_id: str, field: str) -> None:
        dataset = self.datasets.get(tenant=tenant, identifier=dataset_id)
        if dataset is None:
            raise InvalidRequest(f"{field}: no dataset with id '{dataset_id}'; register it first")
        if dataset.row_count == 0:
            raise InvalidRequest(f"{field}: dataset '{dataset_id}' has no rows")

    def _copy_rows(self, tenant: str, dataset_id: str, field: str, target: Path, *, prompts_only: bool = False) -> None:
        """The job's own copy of a dataset's rows, from the version its record names when the copy
        starts (an append or unregister meanwhile replaces the file, never the open handle's), and
        no row past the record's ``row_count``. ``prompts_only`` (a GRPO job): each row must be a
        prompt (``normalize_prompt_row``), refused naming the row, not failed in the trainer."""
        opened = self.datasets.open_rows(tenant=tenant, identifier=dataset_id)
        if opened is None:
            raise InvalidRequest(f"{field}: no dataset with id '{dataset_id}'; register it first")
        dataset, handle = opened
        with handle, target.open("w", encoding="utf-8") as out:
            for index, line in enumerate(handle):
                if index >= dataset.row_count:
                    break
                if prompts_only:
                    try:
                        normalize_prompt_row(json.loads(line), row_index=index)
                    except RowFormatError as exc:
                        raise InvalidRequest(f"{field}: dataset '{dataset_id}' {exc}") from None
                out.write(line)

    # -- read and cancel -----------------------------------------------------------------------

    def get(self, *, tenant: str, job_uuid: str, with_payload: bool = True, with_checkpoints: bool = True) -> Job:
        job = self.store.find(tenant=tenant, job_uuid=job_uuid, with_payload=with_payload,
                              with_checkpoints=with_checkpoints)
        if job is None:
            raise JobNotFound(f"no training job with job_uuid '{job_uuid}'")
        return job

    def list(self, *, tenant: str) -> list[str]:
        return self.store.list_uuids(tenant=tenant)

    def cancel(self, *, tenant: str, job_uuid: str) -> Job:
        """Cancel the job; cancelling a cancelled job again is a success (the client's retry),
        cancelling a completed or failed one is a 409 naming its status."""
        job = self.get(tenant=tenant, job_uuid=job_uuid, with_payload=False)
        try:
            self.store.cancel(job_id=job.id)
        except TransitionRefused as refused:
            if refused.status != JobStatus.CANCELLED.value:
                raise InvalidTransition(
                    f"job '{job_uuid}' is {refused.status} and can no longer be cancelled") from refused
        return self.get(tenant=tenant, job_uuid=job_uuid)

    def pause(self, *, tenant: str, job_uuid: str) -> Job:
        """Pause the job: a queued one is ``paused`` at once; a running one is ``pausing`` until its
        trainer has written a resume point and stopped (seconds: it stops between optimizer
        steps), then ``paused``, holding no process or slot until ``resume``.

        ``JobNotFound`` (404) when the tenant has no such job; ``InvalidTransition`` (409) when it
        is pausing, paused or terminal. Returns the job as it is now."""
        return self._move(tenant, job_uuid, self.store.pause, "only a scheduled or running job can be paused")

    def resume(self, *, tenant: str, job_uuid: str) -> Job:
        """Put a paused job back in the queue (``scheduled``); when a worker trains it again it
        continues from the step where it paused (same weights, optimizer, schedule, data order).

        ``JobNotFound`` (404) when the tenant has no such job; ``InvalidTransition`` (409) when it
        is not ``paused`` (a ``pausing`` one included: resume it once it has paused). Returns the
        job as it is now."""
        return self._move(tenant, job_uuid, self.store.resume, "only a paused job can be resumed")

    def _move(self, tenant: str, job_uuid: str, move: Callable[..., object], allowed: str) -> Job:
        """Make the store ``move`` on the tenant's job; a refused move is a 409 saying what is ``allowed``."""
        job = self.get(tenant=tenant, job_uuid=job_uuid, with_payload=False)
        try:
            move(job_id=job.id)
        except TransitionRefused as refused:
            raise InvalidTransition(f"job '{job_uuid}' is {refused.status}; {allowed}") from refused
        return self.get(tenant=tenant, job_uuid=job_uuid, with_payload=False)

    def events(self, job: Job, *, after: int, limit: int):  # noqa: ANN201
        """A page of the job's event log (the job as ``get`` found it for its tenant)."""
        return self.store.events(job_id=job.id, after=after, limit=limit)

    # -- operations -----------------------------------------------------------------------------

    def operational_snapshot(self) -> dict[str, Any]:
        """Jobs by status (all tenants) and the latest progress of each running job, for /metrics."""
        running = []
        for job in self.store.list(status=JobStatus.IN_PROGRESS):
            metric = self.store.latest_event(job_id=job.id, type="metric")
            checkpoint = self.store.latest_event(job_id=job.id, type="checkpoint")
            running.append({
                "job_uuid": job.job_uuid,
                "kind": job.kind.value,
                "metric": metric.data if metric else {},
                "checkpoint": checkpoint.data if checkpoint else {},
            })
        return {"by_status": self.store.count_by_status(), "running": running}

    # -- views (read-only, for the dashboard and the jobs summary endpoint) ----------------------

    def find(self, *, tenant: str, job_uuid: str) -> Job | None:
        """The tenant's job, or None when it has none with this id (a page answers "not found"
        itself, where ``get`` raises for the Llama Stack endpoints)."""
        return self.store.find(tenant=tenant, job_uuid=job_uuid)

    def list_jobs(self, *, tenant: str) -> builtins.list[Job]:
        """All of the tenant's jobs, oldest first (``list`` gives only their ids)."""
        return self.store.list(tenant=tenant)
