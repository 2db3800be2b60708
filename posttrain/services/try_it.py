"""What the dashboard's "Try it" panel offers for one job: the job's own models, newest first, and
the base model it was trained from, by the ids ``GET /v1/models`` lists (so the page's chat calls
name them exactly as any client would, and resolve through the same catalogue and tenant checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from posttrain.domain.jobs import Job
from posttrain.domain.serving import ServedModel
from posttrain.services.model_catalog import ModelCatalog
from posttrain.services.model_names import CHECKPOINT_TAIL, FINE_TUNED_PREFIX, base_name


@dataclass(frozen=True)
class TryItModels:
    #: The job's model ids, newest first: its fine-tuned model (once it succeeded), then its checkpoints.
    models: tuple[str, ...]
    #: The base model's id, or None when this server does not serve it by name.
    base: str | None


def _same_folder(a: str, b: str | None) -> bool:
    return bool(b) and Path(a).is_absolute() and Path(str(b)).is_absolute() and Path(a).resolve() == Path(str(b)).resolve()


def _newest_first(trained: list[ServedModel]) -> tuple[str, ...]:
    """The catalogue gives the fine-tuned model (no checkpoint tail) then the checkpoints oldest
    first; checkpoints written within one second share ``created``, so the order is kept, reversed."""
    finals = [m.id for m in trained if m.id.startswith(FINE_TUNED_PREFIX) and CHECKPOINT_TAIL not in m.id]
    rest = [m.id for m in trained if m.id not in finals]
    return tuple(finals + rest[::-1])


def try_it_models(catalog: ModelCatalog, tenant: str, job: Job) -> TryItModels:
    """The job's models and its base: the base model whose folder the job trained from (else the
    one its request names), so the two columns of the panel differ only by what the job learned."""
    trained = catalog.of_job(tenant, job.job_uuid)
    if not trained:
        return TryItModels(models=(), base=None)
    bases = catalog.bases()
    plan_model = job.plan.model if job.plan is not None else None
    base = next((b.id for b in bases if _same_folder(b.base_path, plan_model)), None)
    if base is None:
        named = base_name(job.request, plan_model)
        base = next((b.id for b in bases if b.id == named), None)
    return TryItModels(models=_newest_first(trained), base=base)
