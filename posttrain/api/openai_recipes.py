"""The OpenAI door: ``POST /v1/fine_tuning/jobs`` bodies, as the domain's Submission.

The body's shape is checked by ``CreateFineTuningJob`` (closed, like OpenAI's schema); this module
resolves OpenAI's ``"auto"`` hyperparameters to this server's choices, turns the learning-rate
*multiplier* into a learning rate (``DEFAULT_LEARNING_RATE`` x multiplier), and refuses what the
API can ask for and this server cannot do (a grader type this server cannot run; a W&B integration
the operator has not set up: ``wandb_run``). ``method.type: reinforcement`` becomes a GRPO recipe
(``reinforcement_options``). Every other
check is the recipe's; its refusals come back with the field spelled as the body spells it
(``optimizer.lr`` -> ``method.supervised.hyperparameters.learning_rate_multiplier``).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

from posttrain.domain.graders import Grader, GraderInvalid, parse_grader
from posttrain.domain.recipes import (
    DEFAULT_LEARNING_RATE,
    DEFAULT_SEED,
    DPO_ADAPTER,
    JobKind,
    Submission,
    SubmissionNames,
    WandbRun,
    build_submission,
    recipe_error,
)
from posttrain.errors import RecipeInvalid

#: What ``"auto"`` (or leaving a hyperparameter out) means here.
AUTO_N_EPOCHS = 3
AUTO_BATCH_SIZE = 4
AUTO_LEARNING_RATE_MULTIPLIER = 1.0
AUTO_BETA, MAX_BETA = 0.1, 2.0
#: Reinforcement: completions sampled per prompt at compute_multiplier 1 (the multiplier scales it,
#: at least 2 and at most MAX_GENERATIONS_HERE), validation samples and eval interval for "auto",
#: and the completion length a job samples up to.
AUTO_GENERATIONS, MAX_GENERATIONS_HERE = 4, 64
AUTO_EVAL_SAMPLES, AUTO_EVAL_INTERVAL = 4, 1
MAX_EVAL_SAMPLES_HERE = 64
RFT_MAX_COMPLETION_LENGTH = 256
MAX_COMPUTE_MULTIPLIER = 10.0
#: OpenAI's own bounds on each hyperparameter, kept so a body valid there is valid here.
MAX_N_EPOCHS, MAX_BATCH_SIZE, MAX_MULTIPLIER = 50, 256, 10.0
MAX_SUFFIX = 64
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


Auto = Literal["auto"]


class Hyperparameters(_Closed):
    n_epochs: Auto | StrictInt | None = Field(None, description=f"1 to {MAX_N_EPOCHS}, or auto ({AUTO_N_EPOCHS})")
    batch_size: Auto | StrictInt | None = Field(None, description=f"1 to {MAX_BATCH_SIZE}, or auto ({AUTO_BATCH_SIZE})")
    learning_rate_multiplier: Auto | StrictFloat | StrictInt | None = Field(
        None, description=f"times {DEFAULT_LEARNING_RATE}; above 0, at most {MAX_MULTIPLIER}, or auto (1)")


class DpoHyperparameters(Hyperparameters):
    beta: Auto | StrictFloat | StrictInt | None = None


class ReinforcementHyperparameters(Hyperparameters):
    compute_multiplier: Auto | StrictFloat | StrictInt | None = Field(
        None, description=f"scales the completions sampled per prompt ({AUTO_GENERATIONS} at 1); above 0, at most "
        f"{MAX_COMPUTE_MULTIPLIER}, or auto (1)")
    eval_interval: Auto | StrictInt | None = None
    eval_samples: Auto | StrictInt | None = None
    reasoning_effort: Literal["default", "low", "medium", "high"] | None = None


class ReinforcementMethod(_Closed):
    grader: dict[str, Any]
    hyperparameters: ReinforcementHyperparameters | None = None


class SupervisedMethod(_Closed):
    hyperparameters: Hyperparameters | None = None


class DpoMethod(_Closed):
    hyperparameters: DpoHyperparameters | None = None


class Method(_Closed):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None


class CreateFineTuningJob(_Closed):
    """OpenAI's ``FineTuningJobCreateParams``."""

    model: str = Field(min_length=1, max_length=255)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, min_length=1, max_length=64)
    suffix: str | None = Field(None, max_length=MAX_SUFFIX)
    seed: StrictInt | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None
    integrations: list[dict[str, Any]] | None = None


class Refusal(RecipeInvalid):
    """A body this server will not run, naming the body's field (OpenAI's ``param``)."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(field=param, reason=reason)
        self.param = param


def method_of(body: CreateFineTuningJob) -> Literal["supervised", "dpo", "reinforcement"]:
    """The training method the body asks for, refusing those this server has not."""
    kind = body.method.type if body.method else "supervised"
    if kind == "reinforcement" and (body.method is None or body.method.reinforcement is None):
        raise Refusal("method.reinforcement", "a reinforcement job needs method.reinforcement with its grader")
    if kind == "reinforcement" and body.hyperparameters is not None:
        raise Refusal("hyperparameters", "a reinforcement job takes its hyperparameters in "
                      "method.reinforcement.hyperparameters")
    if kind == "reinforcement" and body.method is not None and body.method.reinforcement is not None:
        check_grader(body.method.reinforcement.grader)
    for other in ("supervised", "dpo", "reinforcement"):
        if body.method is not None and other != kind and getattr(body.method, other) is not None:
            raise Refusal(f"method.{other}", f"method.type is {kind!r}: send its options in method.{kind}, "
                          f"not method.{other}")
    if body.metadata is not None:
        check_metadata(body.metadata)
    return kind


def check_grader(grader: dict[str, Any], *, param: str = "method.reinforcement.grader") -> None:
    """Refuse a grader object that cannot be run, naming its field (``domain.graders.parse_grader``);
    what this server allows to run (python, score_model) is the service's ``check_grader_allowed``."""
    try:
        parse_grader(grader, param=param)
    except GraderInvalid as exc:
        raise Refusal(exc.param, exc.message) from None


#: What each W&B integration's ``wandb`` object may hold (OpenAI's ``FineTuningIntegration``).
WANDB_KEYS = {"project", "name", "entity", "tags"}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here, found without importing it (wandb is heavy, and the
    request path never imports it: the trainer does)."""
    return importlib.util.find_spec(module) is not None


def wandb_run(body: CreateFineTuningJob, *, mode: str, module: str = "wandb") -> WandbRun | None:
    """The W&B run the body's ``integrations`` ask for, or None; refused (naming the field) when
    the operator has not set W&B up (``POSTTRAIN_WANDB_MODE`` off, or wandb not installed) or the
    integration is not one this server knows. Never accepted and ignored."""
    if not body.integrations:
        return None
    for index, item in enumerate(body.integrations):
        if item.get("type") != "wandb":
            raise Refusal(f"integrations.{index}.type", "the only integration this server has is "
                          f"'wandb' (Weights & Biases), got {item.get('type')!r}")
    if mode == "off":
        raise Refusal("integrations", "this server does not log to Weights & Biases (the operator has not set "
                      "POSTTRAIN_WANDB_MODE); leave integrations out (the job's metrics are in its events)")
    if not installed(module):
        raise Refusal("integrations", "wandb is not installed on this server, so it cannot log to Weights & "
                      "Biases; leave integrations out (the job's metrics are in its events)")
    if len(body.integrations) > 1:
        raise Refusal("integrations.1", "at most one wandb integration a job (one run)")
    item = body.integrations[0]
    unknown = sorted(set(item) - {"type", "wandb"})
    if unknown:
        raise Refusal(f"integrations.0.{unknown[0]}", "an integration holds only type and wandb")
    options = item.get("wandb")
    if not isinstance(options, dict):
        raise Refusal("integrations.0.wandb", "must be an object with at least project")
    unknown = sorted(set(options) - WANDB_KEYS)
    if unknown:
        raise Refusal(f"integrations.0.wandb.{unknown[0]}", f"not a W&B option: send {', '.join(sorted(WANDB_KEYS))}")
    if options.get("project") is None:
        raise Refusal("integrations.0.wandb.project", "the W&B project is required")
    for key in ("project", "name", "entity"):
        if options.get(key) is not None and not isinstance(options[key], str):
            raise Refusal(f"integrations.0.wandb.{key}", f"must be a string, got {options[key]!r}")
    tags = options.get("tags")
    if tags is not None and (not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags)):
        raise Refusal("integrations.0.wandb.tags", "must be a list of strings")
    try:
        return WandbRun.model_validate({**options, "tags": tuple(tags or ())})
    except ValidationError as exc:
        refusal = recipe_error(exc)
        raise Refusal(f"integrations.0.wandb.{refusal.field}" if refusal.field else "integrations.0.wandb",
                      refusal.reason) from None


def integrations_object(run: WandbRun | None) -> list[dict[str, Any]]:
    """The job's ``integrations`` as OpenAI shows them: what was accepted, with the run's name."""
    if run is None:
        return []
    return [{"type": "wandb", "wandb": {"project": run.project, "name": run.name, "entity": run.entity,
                                        "tags": list(run.tags)}}]


def check_metadata(metadata: dict[str, str]) -> None:
    if len(metadata) > MAX_METADATA_KEYS:
        raise Refusal("metadata", f"at most {MAX_METADATA_KEYS} keys, got {len(metadata)}")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise Refusal(f"metadata.{key[:MAX_METADATA_KEY]}", f"keys are at most {MAX_METADATA_KEY} characters "
                          f"and values at most {MAX_METADATA_VALUE}")


def _hyperparameters(body: CreateFineTuningJob) -> tuple[Hyperparameters, str]:
    """The hyperparameters asked for, and the body's path to them (for refusals)."""
    method = body.method
    kind = method.type if method else "supervised"
    nested: Hyperparameters | None = None
    if method is not None and kind == "supervised" and method.supervised:
        nested = method.supervised.hyperparameters
    elif method is not None and kind == "dpo" and method.dpo:
        nested = method.dpo.hyperparameters
    elif method is not None and kind == "reinforcement" and method.reinforcement:
        nested = method.reinforcement.hyperparameters or ReinforcementHyperparameters()
    if body.hyperparameters is not None and nested is not None:
        raise Refusal("hyperparameters", f"send the hyperparameters in method.{kind}.hyperparameters only "
                      "(the top-level field is OpenAI's deprecated spelling)")
    if nested is not None:
        return nested, f"method.{kind}.hyperparameters"
    if kind == "dpo" and body.hyperparameters is not None:
        raise Refusal("hyperparameters", "a DPO job takes its hyperparameters in method.dpo.hyperparameters")
    return body.hyperparameters or Hyperparameters(), "hyperparameters"


def resolved_hyperparameters(body: CreateFineTuningJob) -> tuple[dict[str, Any], str]:
    """``n_epochs``, ``batch_size`` and ``learning_rate_multiplier`` with ``auto`` resolved."""
    asked, where = _hyperparameters(body)
    n_epochs = AUTO_N_EPOCHS if asked.n_epochs in (None, "auto") else asked.n_epochs
    batch_size = AUTO_BATCH_SIZE if asked.batch_size in (None, "auto") else asked.batch_size
    multiplier = (AUTO_LEARNING_RATE_MULTIPLIER if asked.learning_rate_multiplier in (None, "auto")
                  else float(asked.learning_rate_multiplier))
    assert isinstance(n_epochs, int) and isinstance(batch_size, int)
    if not 1 <= n_epochs <= MAX_N_EPOCHS:
        raise Refusal(f"{where}.n_epochs", f"must be 1 to {MAX_N_EPOCHS} or 'auto', got {n_epochs}")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise Refusal(f"{where}.batch_size", f"must be 1 to {MAX_BATCH_SIZE} or 'auto', got {batch_size}")
    if not 0 < multiplier <= MAX_MULTIPLIER:
        raise Refusal(f"{where}.learning_rate_multiplier",
                      f"must be above 0 and at most {MAX_MULTIPLIER}, or 'auto', got {multiplier}")
    resolved: dict[str, Any] = {"n_epochs": n_epochs, "batch_size": batch_size,
                                "learning_rate_multiplier": multiplier}
    if body.method is not None and body.method.type == "dpo":
        beta = getattr(asked, "beta", None)
        beta = AUTO_BETA if beta in (None, "auto") else float(beta)
        if not 0 < beta <= MAX_BETA:
            raise Refusal(f"{where}.beta", f"must be above 0 and at most {MAX_BETA}, or 'auto', got {beta}")
        resolved["beta"] = beta
    if body.method is not None and body.method.type == "reinforcement":
        resolved |= _reinforcement_hyperparameters(asked, where)
    return resolved, where


def _reinforcement_hyperparameters(asked: Hyperparameters, where: str) -> dict[str, Any]:
    compute = getattr(asked, "compute_multiplier", None)
    compute = 1.0 if compute in (None, "auto") else float(compute)
    if not 0 < compute <= MAX_COMPUTE_MULTIPLIER:
        raise Refusal(f"{where}.compute_multiplier",
                      f"must be above 0 and at most {MAX_COMPUTE_MULTIPLIER}, or 'auto', got {compute}")
    interval = getattr(asked, "eval_interval", None)
    interval = AUTO_EVAL_INTERVAL if interval in (None, "auto") else interval
    samples = getattr(asked, "eval_samples", None)
    samples = AUTO_EVAL_SAMPLES if samples in (None, "auto") else samples
    assert isinstance(interval, int) and isinstance(samples, int)
    if interval < 1:
        raise Refusal(f"{where}.eval_interval", f"must be at least 1 or 'auto', got {interval}")
    if not 1 <= samples <= MAX_EVAL_SAMPLES_HERE:
        raise Refusal(f"{where}.eval_samples", f"must be 1 to {MAX_EVAL_SAMPLES_HERE} or 'auto', got {samples}")
    effort = getattr(asked, "reasoning_effort", None) or "default"
    return {"compute_multiplier": compute, "eval_interval": interval, "eval_samples": samples,
            "reasoning_effort": effort}


def num_generations(compute_multiplier: float) -> int:
    """Completions sampled per prompt: ``AUTO_GENERATIONS`` times the compute multiplier, rounded,
    within 2 (a group needs two to compare) and ``MAX_GENERATIONS_HERE``."""
    return max(2, min(MAX_GENERATIONS_HERE, round(AUTO_GENERATIONS * compute_multiplier)))


def submission(body: CreateFineTuningJob, *, job_uuid: str, model: str, dataset_id: str,
               validation_dataset_id: str | None, train_rows: int, validation_rows: int,
               wandb: WandbRun | None) -> Submission:
    """A supervised or DPO job: a LoRA adapter on the architecture's attention layers (OpenAI's API
    has no adapter options), over every training row each epoch, validated on the whole validation
    file; DPO with the sigmoid loss and the body's beta. ``wandb`` is ``wandb_run``'s answer for the
    body (no default: a caller that skipped the check must not drop the integrations unseen)."""
    if bool(body.integrations) != (wandb is not None):
        raise AssertionError("submission() needs wandb_run(body)'s answer for a body with integrations")
    hyper, where = resolved_hyperparameters(body)
    batch = hyper["batch_size"]
    names = {"schedule.n_epochs": f"{where}.n_epochs", "data.batch_size": f"{where}.batch_size",
             "optimizer.lr": f"{where}.learning_rate_multiplier", "dpo.beta": f"{where}.beta", "seed": "seed",
             "model": "model", "dataset_id": "training_file", "validation_dataset_id": "validation_file"}
    dpo = "beta" in hyper
    reinforcement = body.method is not None and body.method.reinforcement is not None \
        and body.method.type == "reinforcement"
    names |= {"grpo.num_generations": f"{where}.compute_multiplier", "grpo.eval_interval": f"{where}.eval_interval",
              "grpo.eval_samples": f"{where}.eval_samples", "grpo.grader": "method.reinforcement.grader"}
    kind = JobKind.GRPO if reinforcement else JobKind.DPO if dpo else JobKind.SFT
    recipe: dict[str, Any] = {
        "method": kind.value,
        "schedule": {"n_epochs": hyper["n_epochs"], "max_steps_per_epoch": max(1, math.ceil(train_rows / batch)),
                     "max_validation_steps": max(1, math.ceil((validation_rows or train_rows) / batch))},
        "data": {"batch_size": batch, "shuffle": True, "data_format": "dialog"},
        "optimizer": {"lr": DEFAULT_LEARNING_RATE * hyper["learning_rate_multiplier"]},
        "adapter": DPO_ADAPTER.model_dump(),
        "seed": DEFAULT_SEED if body.seed is None else body.seed,
    }
    if dpo:
        recipe["dpo"] = {"beta": hyper["beta"], "loss_type": "sigmoid"}
    if reinforcement:
        assert body.method is not None and body.method.reinforcement is not None
        recipe["grpo"] = {"grader": body.method.reinforcement.grader,
                          "num_generations": num_generations(hyper["compute_multiplier"]),
                          "eval_interval": hyper["eval_interval"], "eval_samples": hyper["eval_samples"],
                          "max_completion_length": RFT_MAX_COMPLETION_LENGTH}
        if hyper["reasoning_effort"] != "default":
            note = (f"reasoning_effort {hyper['reasoning_effort']!r} has no effect here: the model samples its "
                    "answer as it is, with no separate reasoning budget")
            recipe["notes"] = [note]
    if wandb is not None:
        recipe["wandb"] = wandb.model_dump()
    try:
        return build_submission({
            "job_uuid": job_uuid, "model": model, "dataset_id": dataset_id,
            "validation_dataset_id": validation_dataset_id, "recipe": recipe,
            "names": SubmissionNames(model="model", dataset_id="training_file",
                                     validation_dataset_id="validation_file"),
        })
    except RecipeInvalid as refusal:
        field = (refusal.field or "").removeprefix("recipe.")
        renamed = RecipeInvalid(field=field or None, reason=refusal.reason).renamed(names)
        raise Refusal(renamed.field or "body", renamed.reason) from None


def method_object(body: CreateFineTuningJob, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The job's ``method`` as OpenAI shows it: the values this job trains with."""
    if body.method is not None and body.method.type == "reinforcement" and body.method.reinforcement is not None:
        return {"type": "reinforcement", "reinforcement": {"grader": body.method.reinforcement.grader,
                                                           "hyperparameters": hyperparameters}}
    kind = "dpo" if "beta" in hyperparameters else "supervised"
    return {"type": kind, kind: {"hyperparameters": hyperparameters}}


def grader_of(body: CreateFineTuningJob) -> Grader | None:
    """The reinforcement method's grader, parsed (``method_of`` has checked it), or None."""
    if body.method is None or body.method.type != "reinforcement" or body.method.reinforcement is None:
        return None
    return parse_grader(body.method.reinforcement.grader, param="method.reinforcement.grader")


def top_level_hyperparameters(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The job's (deprecated) top-level ``hyperparameters``: OpenAI's shape has only these three."""
    return {key: value for key, value in hyperparameters.items()
            if key in ("n_epochs", "batch_size", "learning_rate_multiplier")}
