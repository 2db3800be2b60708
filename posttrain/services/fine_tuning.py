"""OpenAI fine-tuning jobs on the same engine as every other job.

A job created here is an ordinary job (the same ``jobs`` row, listed by the Llama Stack API too):
its ``job_uuid`` is its OpenAI id (``ftjob-…``) and its OpenAI fields (file ids, suffix, metadata,
the hyperparameters as resolved) are kept in the job's ``request`` under ``"openai"``. The
training file's rows become a dataset only for the length of the submit: the job takes its own
copy of them, as every job does, and the dataset is removed again, so nothing outside the job
depends on the file afterwards.
"""

from __future__ import annotations

import builtins
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from posttrain.domain.jobs import Job, JobEvent
from posttrain.domain.openai_rows import FineTuningFileInvalid, check_fine_tuning_lines
from posttrain.domain.recipes import Submission
from posttrain.domain.rows import RowFormatError, require_known_layouts
from posttrain.errors import NotFound
from posttrain.services.base_models import KnownModel, resolve_base_model
from posttrain.services.files import FileInvalid, FileService
from posttrain.services.jobs import JobService
from posttrain.settings import Settings
from posttrain.store.datasets import DatasetStore

#: Where an OpenAI job keeps its OpenAI fields in ``jobs.request``.
OPENAI_KEY = "openai"


class FineTuningJobNotFound(NotFound):
    """No such fine-tuning job."""

    code = "fine_tuning_job_not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"No such fine-tuning job: {job_id}")


def new_openai_job_id() -> str:
    return "ftjob-" + secrets.token_hex(12)


def training_rows(lines: Iterable[str], method: Literal["supervised", "dpo", "reinforcement"], *,
                  param: str) -> list[dict[str, Any]]:
    """The internal rows of an OpenAI fine-tuning file, or a refusal naming the line.

    ``domain/openai_rows.py`` reads the format (chat rows for ``supervised``, OpenAI's preference
    rows for ``dpo``) and names what is wrong on which line; here its refusal becomes the API's,
    under ``param`` (the request field naming the file), and the rows are checked once more
    against the layouts every dataset must fit."""
    try:
        rows = check_fine_tuning_lines(lines, method)
    except FineTuningFileInvalid as exc:
        where = f" ({exc.param})" if exc.param else ""
        raise FileInvalid(f"{param}: {exc.message}{where}", param=param, code=exc.code) from None
    if method == "reinforcement":  # prompts and reference fields, read by the GRPO trainer as they are
        return rows
    try:
        require_known_layouts(rows)
    except RowFormatError as exc:
        raise FileInvalid(f"{param}: {exc}", param=param, code="invalid_file_format") from None
    return rows


@dataclass(frozen=True)
class StagedData:
    """What a submission names: the model as the job's Submission names it, and the staged datasets."""

    model: KnownModel
    dataset_id: str
    validation_dataset_id: str | None
    train_rows: int
    validation_rows: int


SubmissionBuilder = Callable[[StagedData], Submission]


class FineTuningService:
    def __init__(self, *, jobs: JobService, files: FileService, datasets: DatasetStore, settings: Settings) -> None:
        self.jobs = jobs
        self.files = files
        self.datasets = datasets
        self.settings = settings

    def create(self, *, tenant: str, job_uuid: str, model: str, training_file: str, validation_file: str | None,
               method: Literal["supervised", "dpo", "reinforcement"], build: SubmissionBuilder, openai: dict[str, Any]) -> Job:
        """Check the model and files, then submit the job ``build`` makes of them; ``openai`` is kept
        in the job's request. A refusal leaves nothing behind."""
        known = resolve_base_model(model, self.settings)
        sources = [("training_file", training_file)]
        if validation_file is not None:
            sources.append(("validation_file", validation_file))
        staged_rows = []
        for param, file_id in sources:
            lines = self.files.read_lines(tenant=tenant, file_id=file_id, param=param)
            staged_rows.append(training_rows(lines, method, param=param))
        created: list[str] = []
        try:
            for (param, _), rows in zip(sources, staged_rows, strict=True):
                identifier = f"{job_uuid}-{param}"
                self.datasets.create(tenant=tenant, identifier=identifier, purpose="post-training/messages",
                                     source={"type": "uri", "uri": f"openai-file:{dict(sources)[param]}"},
                                     metadata={"openai_job": job_uuid}, rows=rows)
                created.append(identifier)
            staged = StagedData(model=known, dataset_id=created[0],
                                validation_dataset_id=created[1] if len(created) > 1 else None,
                                train_rows=len(staged_rows[0]),
                                validation_rows=len(staged_rows[1]) if len(staged_rows) > 1 else 0)
            submission = build(staged)
            return self.jobs.submit(tenant=tenant, submission=submission, request={OPENAI_KEY: openai})
        finally:
            for identifier in created:
                self.datasets.delete(tenant=tenant, identifier=identifier)

    def get(self, *, tenant: str, job_id: str) -> Job:
        job = self.jobs.find(tenant=tenant, job_uuid=job_id)
        if job is None:
            raise FineTuningJobNotFound(job_id)
        return job

    def list(self, *, tenant: str, after: str | None, limit: int,
             metadata: dict[str, str]) -> tuple[builtins.list[Job], bool]:
        """The tenant's jobs, newest first, after the job named ``after``, whose OpenAI metadata
        holds every pair of ``metadata``; and whether more follow. Paged in the store (one keyset
        query with ``LIMIT``, the metadata matched in SQL), never by reading every job."""
        found = self.jobs.store.list_newest(tenant=tenant, limit=limit + 1, after_uuid=after,
                                            request_object=(OPENAI_KEY, "metadata"), request_matches=metadata)
        if found is None:
            raise FileInvalid(f"after: no fine-tuning job '{after}' to page after", param="after")
        return found[:limit], len(found) > limit

    def cancel(self, *, tenant: str, job_id: str) -> Job:
        self.get(tenant=tenant, job_id=job_id)
        return self.jobs.cancel(tenant=tenant, job_uuid=job_id)

    def pause(self, *, tenant: str, job_id: str) -> Job:
        """Pause a queued (``paused`` at once) or running (``pausing``, then ``paused``) job; 404
        when the tenant has no such job (another tenant's included), 409 when it cannot be paused."""
        self.get(tenant=tenant, job_id=job_id)
        self.jobs.pause(tenant=tenant, job_uuid=job_id)
        return self.get(tenant=tenant, job_id=job_id)  # with its request and plan, for its OpenAI fields

    def resume(self, *, tenant: str, job_id: str) -> Job:
        """Queue a paused job again, to continue from where it stopped; 404 as ``pause``, 409 when
        it is not ``paused``."""
        self.get(tenant=tenant, job_id=job_id)
        self.jobs.resume(tenant=tenant, job_uuid=job_id)
        return self.get(tenant=tenant, job_id=job_id)

    def events(self, job: Job) -> builtins.list[JobEvent]:
        """All of the job's events, oldest first."""
        return self.jobs.store.events(job_id=job.id, after=0, limit=10_000_000)

    def latest_metric(self, job: Job) -> JobEvent | None:
        return self.jobs.store.latest_event(job_id=job.id, type="metric")


#: How many of the latest steps the finish estimate's step rate is measured over.
RATE_WINDOW = 20


def trained_tokens(events: Iterable[JobEvent]) -> int | None:
    """The real (non-padding) tokens the job trained on, from its metric events' ``tokens``: a
    step run twice (a requeue after a lost worker repeats the steps since the last checkpoint)
    counts once, as its last run. None when no metric event carries a count."""
    per_step: dict[int, int] = {}
    for event in events:
        if event.type == "metric" and isinstance(event.data.get("tokens"), int) \
                and isinstance(event.data.get("step"), int):
            per_step[event.data["step"]] = event.data["tokens"]
    return sum(per_step.values()) if per_step else None


def estimated_finish(events: builtins.list[JobEvent], now: float) -> int | None:
    """Unix seconds when the job should finish: ``now`` plus the steps left times the mean seconds
    per step over the latest ``RATE_WINDOW`` steps of the current run (wall-clock between their
    metric events, so validation and checkpoint writes count; the trainer's own ``step_seconds``
    when only one step is known). None before the run's first step."""
    started = max((i for i, e in enumerate(events) if e.type == "started"), default=-1)
    metrics = [e for e in events[started + 1:] if e.type == "metric" and isinstance(e.data.get("step"), int)]
    if not metrics or not metrics[-1].data.get("total_steps"):
        return None
    window, last = metrics[-RATE_WINDOW:], metrics[-1]
    first = window[0]
    steps = last.data["step"] - first.data["step"]
    if steps > 0:
        per_step = (last.created_at - first.created_at).total_seconds() / steps
    else:
        per_step = float(last.data.get("step_seconds") or 0.0)
    left = max(0, int(last.data["total_steps"]) - last.data["step"])
    return int(now + left * per_step)


def openai_fields(job: Job) -> dict[str, Any]:
    """The OpenAI fields a job created through the OpenAI API keeps; ``{}`` for other jobs."""
    fields = job.request.get(OPENAI_KEY) if isinstance(job.request, dict) else None
    return fields if isinstance(fields, dict) else {}
