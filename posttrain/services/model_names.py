"""The public names of what a job trained, in one place: the fine-tuning API shows them
(``fine_tuned_model``, ``fine_tuned_model_checkpoint``) and the models API resolves them.

A succeeded job's model is ``ft:<base>:<suffix or tenant>:<job id>``, OpenAI's form, naming its
final checkpoint; each checkpoint is ``<that>:ckpt-step-<step>``. The job id is the name's last
part (before the checkpoint tail), so a name is parsed from the right: a base name may itself
hold ``:``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.domain.jobs import Job
from posttrain.services.fine_tuning import OPENAI_KEY

FINE_TUNED_PREFIX = "ft:"
CHECKPOINT_TAIL = ":ckpt-step-"
_CHECKPOINT_RE = re.compile(r"^(?P<model>.+):ckpt-step-(?P<step>[0-9]{1,12})$")


def fine_tuned_model_id(*, base: str, suffix: str | None, tenant: str, job_uuid: str) -> str:
    """``ft:<base>:<suffix or tenant>:<job id>``."""
    return f"{FINE_TUNED_PREFIX}{base}:{suffix or tenant}:{job_uuid}"


def checkpoint_model_id(fine_tuned: str, step: object) -> str:
    """A checkpoint's name: its job's fine-tuned model name and the step it was written at."""
    return f"{fine_tuned}{CHECKPOINT_TAIL}{step}"


@dataclass(frozen=True)
class ParsedName:
    """What a fine-tuned name says: its job, and the checkpoint's step when it names one."""

    fine_tuned: str
    job_uuid: str
    step: int | None


def parse_fine_tuned(name: str) -> ParsedName | None:
    """The job (and step) ``name`` names, or None when it is not of the ``ft:`` form. Only the
    form is checked: the caller compares the name it rebuilds from the job with ``name``."""
    if not name.startswith(FINE_TUNED_PREFIX):
        return None
    step: int | None = None
    fine_tuned = name
    match = _CHECKPOINT_RE.match(name)
    if match is not None:
        fine_tuned, step = match["model"], int(match["step"])
    parts = fine_tuned[len(FINE_TUNED_PREFIX):].rsplit(":", 2)
    if len(parts) != 3 or not all(parts):
        return None
    return ParsedName(fine_tuned=fine_tuned, job_uuid=parts[2], step=step)


def base_name(request: dict[str, Any], plan_model: str | None) -> str:
    """The base model a job names, as the fine-tuning API shows it: the OpenAI job's ``model``;
    a Llama Stack job's ``model`` (or ``finetuned_model``), else its model folder's name."""
    fields = request.get(OPENAI_KEY) if isinstance(request, dict) else None
    if isinstance(fields, dict):
        return str(fields.get("model", ""))
    named = request.get("model") or request.get("finetuned_model")
    if named:
        return str(named)
    return Path(plan_model).name if plan_model else ""


def fine_tuned_name(request: dict[str, Any], plan_model: str | None, *, tenant: str, job_uuid: str) -> str:
    """The job's fine-tuned model name (what ``fine_tuned_model`` shows once it succeeded)."""
    fields = request.get(OPENAI_KEY) if isinstance(request, dict) else None
    suffix = fields.get("suffix") if isinstance(fields, dict) else None
    return fine_tuned_model_id(base=base_name(request, plan_model), suffix=str(suffix) if suffix else None,
                               tenant=tenant, job_uuid=job_uuid)


def is_openai_job(request: dict[str, Any]) -> bool:
    """Whether the job was created through OpenAI's fine-tuning API (it keeps OpenAI's fields)."""
    return isinstance(request, dict) and isinstance(request.get(OPENAI_KEY), dict)


def base_name_of(job: Job) -> str:
    return base_name(job.request or {}, job.plan.model if job.plan else None)
