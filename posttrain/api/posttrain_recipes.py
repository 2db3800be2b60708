"""Our own reinforcement door: ``POST /v1/posttrain/reinforcement-fine-tune`` bodies, as the domain's Submission.

The Llama Stack API has no reinforcement method, so this body is shaped like its fine-tune request
(``job_uuid``, ``model``, ``training_config``, ``algorithm_config`` LoRA or none for every weight,
``logger_config``) plus what GRPO needs: ``grader`` (OpenAI's grader object, as the OpenAI door
takes it) and ``grpo`` (the knobs). It becomes the same GRPO recipe the OpenAI door builds; every
check on a knob is the recipe's (``domain/recipes.py``), its refusals renamed to this body's
spelling (``grpo.grader.operation`` -> ``grader.operation``).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from posttrain.api.llama_stack_recipes import FIELD_NAMES, _common_recipe, _lora
from posttrain.api.schemas import Identifier, JSONObject, LoraFinetuningConfig, PathText, RequestModel, TrainingConfig
from posttrain.domain.graders import Grader, parse_grader
from posttrain.domain.recipes import (
    GRPOLossType,
    GRPOScaleRewards,
    ImportanceSamplingLevel,
    JobKind,
    Submission,
    SubmissionNames,
    build_submission,
)
from posttrain.errors import RecipeInvalid
from posttrain.services.paths import MAX_PATH_BYTES, OUTPUT_HEADROOM_BYTES, check_path_lengths

#: Recipe fields -> this body's names (the Llama Stack ones, and the two of our own).
NAMES = FIELD_NAMES | {"grpo": "grpo", "grpo.grader": "grader"}

SUBMISSION_NAMES = SubmissionNames(model="model", dataset_id="training_config.data_config.dataset_id",
                                   validation_dataset_id="training_config.data_config.validation_dataset_id")


class GrpoConfig(RequestModel):
    """The GRPO knobs; each left out (or null) is the recipe's default (docs/trainer-protocol.md)."""

    num_generations: int | None = None
    beta: float | None = None
    epsilon: float | None = None
    epsilon_high: float | None = None
    loss_type: GRPOLossType | None = None
    scale_rewards: GRPOScaleRewards | None = None
    importance_sampling_level: ImportanceSamplingLevel | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_completion_length: int | None = None
    eval_interval: int | None = None
    eval_samples: int | None = None


class ReinforcementFineTuneRequest(RequestModel):
    """A reinforcement fine-tune (GRPO): the dataset's rows are ``{"messages": [...], <reference
    fields>}``, the last message the user's; ``grader`` scores each sampled completion."""

    job_uuid: Identifier
    model: PathText
    training_config: TrainingConfig
    grader: JSONObject
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    algorithm_config: LoraFinetuningConfig | None = None
    hyperparam_search_config: JSONObject = Field(default_factory=dict)
    logger_config: JSONObject = Field(default_factory=dict)
    checkpoint_dir: PathText | None = None


def grader_of(body: ReinforcementFineTuneRequest) -> Grader:
    """The body's grader, parsed; a ``GraderInvalid`` naming ``grader.<field>`` when it is not one."""
    return parse_grader(body.grader, param="grader")


def reinforcement_submission(body: ReinforcementFineTuneRequest, keep: int | None = None) -> Submission:
    """The GRPO job the body asks for. ``keep``: the ``X-Posttrain-Keep-Checkpoints`` header's number."""
    recipe = _common_recipe(body.training_config, body.hyperparam_search_config, body.logger_config, keep)
    recipe["method"] = JobKind.GRPO.value
    if isinstance(body.algorithm_config, LoraFinetuningConfig):
        recipe["adapter"] = _lora(body.algorithm_config)
    knobs = {key: value for key, value in body.grpo.model_dump().items() if value is not None}
    recipe["grpo"] = {**knobs, "grader": body.grader}
    check_path_lengths(body.model, field="model")
    if body.checkpoint_dir is not None:
        check_path_lengths(body.checkpoint_dir, field="checkpoint_dir", max_bytes=MAX_PATH_BYTES - OUTPUT_HEADROOM_BYTES)
    data = body.training_config.data_config
    assert data is not None  # _common_recipe refused its absence
    try:
        return build_submission({
            "job_uuid": body.job_uuid, "model": body.model, "dataset_id": data.dataset_id,
            "validation_dataset_id": data.validation_dataset_id, "checkpoint_dir": body.checkpoint_dir,
            "recipe": recipe, "names": SUBMISSION_NAMES,
        })
    except RecipeInvalid as refusal:
        field = (refusal.field or "").removeprefix("recipe.")
        raise RecipeInvalid(field=field or None, reason=refusal.reason).renamed(NAMES) from None


def recorded_request(body: ReinforcementFineTuneRequest) -> dict[str, Any]:
    """The body as kept with the job."""
    return body.model_dump(mode="json", exclude_unset=True)
