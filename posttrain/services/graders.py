"""The submit-time policy on a reinforcement job's grader (the grader's shape is checked in domain).

What the grader's JSON alone cannot decide: a python grader runs the tenant's code, so on a server
with API keys it needs the operator's POSTTRAIN_ALLOW_PYTHON_GRADERS=true; and a score_model
grader's judge must be a model this server serves to the submitting tenant (a base model, or one of
the tenant's own fine-tuned models or checkpoints, as ``GET /v1/models`` lists them). Both raise
GraderInvalid naming the field, which the API answers with 400. An unknown judge and another
tenant's read exactly the same.

``judges_for`` then resolves the judges again inside the job service and pins their folders (like
the job's own model folder), so what the trainer loads is what was checked here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from posttrain.domain.graders import Grader, GraderInvalid, MultiGrader, ScoreModelGrader, SingleGrader
from posttrain.domain.pins import PathPin
from posttrain.domain.recipes import Judge
from posttrain.domain.serving import ServedModel
from posttrain.services.base_models import ModelNotFound
from posttrain.services.paths import FileAreas, pin_checked
from posttrain.settings import Settings

if TYPE_CHECKING:  # model_catalog -> model_names -> fine_tuning -> jobs -> here: a type only
    from posttrain.services.model_catalog import ModelCatalog

PYTHON_REFUSED = ("python graders are off on this server (it has API keys, and a python grader runs the "
                  "tenant's code); the operator can allow them with POSTTRAIN_ALLOW_PYTHON_GRADERS=true")
PYTHON_OFF = "python graders are turned off on this server (POSTTRAIN_ALLOW_PYTHON_GRADERS=false)"
SCORE_MODEL_REFUSED = ("score_model graders need a judge model served by this server, and this door cannot "
                       "look one up; use the OpenAI fine-tuning API or /v1/posttrain/reinforcement-fine-tune")


def python_graders_allowed(settings: Settings, keys_on: bool) -> bool:
    """The operator's choice, or by default: yes without API keys, no with them."""
    if settings.allow_python_graders is not None:
        return settings.allow_python_graders
    return not keys_on


def _named(grader: Grader, param: str) -> list[tuple[SingleGrader, str]]:
    if isinstance(grader, MultiGrader):
        return [(sub, f"{param}.graders.{key}") for key, sub in grader.graders.items()]
    return [(grader, param)]


def judge_not_found(model: str) -> str:
    """The one refusal for a judge that is not the caller's to use: unknown, deleted or another tenant's."""
    return (f"The model '{model}' does not exist on this server; a judge is one of its base models or one of "
            "your own fine-tuned models or checkpoints (GET /v1/models lists them)")


def find_judge(grader: ScoreModelGrader, *, tenant: str, models: ModelCatalog, param: str) -> ServedModel:
    """The model ``grader.model`` names for ``tenant``, or GraderInvalid at ``<param>.model``."""
    try:
        return models.resolve(tenant, grader.model)
    except ModelNotFound:
        raise GraderInvalid(judge_not_found(grader.model), f"{param}.model") from None


def check_grader_allowed(grader: Grader, settings: Settings, keys_on: bool, *, param: str = "grader",
                         tenant: str | None = None, models: ModelCatalog | None = None) -> None:
    """Raise GraderInvalid if this server will not run ``grader`` for ``tenant``; ``keys_on``: the
    server has API keys. A score_model grader needs ``tenant`` and ``models`` to find its judge."""
    for sub, where in _named(grader, param):
        if isinstance(sub, ScoreModelGrader):
            if tenant is None or models is None:
                raise GraderInvalid(SCORE_MODEL_REFUSED, f"{where}.type")
            find_judge(sub, tenant=tenant, models=models, param=where)
        if sub.type == "python" and not python_graders_allowed(settings, keys_on):
            refused = PYTHON_OFF if settings.allow_python_graders is False else PYTHON_REFUSED
            raise GraderInvalid(refused, f"{where}.type")


def judges_for(grader: Grader, *, tenant: str, models: ModelCatalog, settings: Settings, areas: FileAreas,
               param: str) -> tuple[tuple[Judge, ...], list[PathPin]]:
    """Each model id the grader's score_model graders name, resolved for ``tenant`` and its folders
    pinned (``judge_model``, ``judge_adapter``): entries may lead into the model roots, the Hugging
    Face cache or the folder itself, never into another tenant's file area."""
    judges: dict[str, Judge] = {}
    pins: list[PathPin] = []
    roots = [root.expanduser().resolve() for root in settings.allowed_model_roots]
    roots.append(settings.hf_cache.expanduser().resolve())
    for sub, where in _named(grader, param):
        if not isinstance(sub, ScoreModelGrader) or sub.model in judges:
            continue
        served = find_judge(sub, tenant=tenant, models=models, param=where)
        base = Path(served.base_path).resolve()
        pins.append(pin_checked(base, role="judge_model", within=[*roots, base], areas=areas, field=f"{where}.model"))
        adapter = Path(served.adapter_path).resolve() if served.adapter_path else None
        if adapter is not None:
            pins.append(pin_checked(adapter, role="judge_adapter", within=[*roots, adapter], areas=areas,
                                    field=f"{where}.model"))
        judges[sub.model] = Judge(model=sub.model, base_path=str(base),
                                  adapter_path=str(adapter) if adapter else None,
                                  tokenizer_path=str(Path(served.tokenizer_path).resolve()))
    return tuple(judges.values()), pins
