"""The Llama Stack door: its fine-tune and preference-optimize requests, as the domain's Submission.

The request schemas (``api/schemas.py``) have already checked types and closed shapes; this module
only renames and regroups. What the Llama Stack request can ask for and this server would
otherwise accept and ignore (FSDP switches, a logger other than TensorBoard) is refused here,
since the recipe has no field to hold it. A ``hyperparam_search_config`` is typed and checked
against the request's recipe by ``search_config`` (``domain/search.py``). Every other check lives
with the recipe (``domain/recipes.py``); its refusals come back with the field renamed to the
request's own spelling (``optimizer.lr`` -> ``training_config.optimizer_config.lr``).
"""

from __future__ import annotations

from typing import Any

from posttrain.api.schemas import (
    DPOAlignmentConfig,
    LoraFinetuningConfig,
    PreferenceOptimizeRequest,
    QATFinetuningConfig,
    SupervisedFineTuneRequest,
    TrainingConfig,
)
from posttrain.domain.recipes import DPO_ADAPTER, JobKind, Submission, SubmissionNames, build_submission
from posttrain.domain.search import SearchConfig, parse_search
from posttrain.errors import RecipeInvalid
from posttrain.services.paths import MAX_PATH_BYTES, OUTPUT_HEADROOM_BYTES, check_path_lengths

#: Recipe field prefixes -> the Llama Stack request's names for them (longest prefix wins).
FIELD_NAMES = {
    "job_uuid": "job_uuid",
    "schedule": "training_config",
    "data": "training_config.data_config",
    "optimizer": "training_config.optimizer_config",
    "dtype": "training_config.dtype",
    "activation_checkpointing": "training_config.efficiency_config.enable_activation_checkpointing",
    "adapter": "algorithm_config",
    "adapter.attention": "algorithm_config.lora_attn_modules",
    "adapter.mlp": "algorithm_config.apply_lora_to_mlp",
    "adapter.output": "algorithm_config.apply_lora_to_output",
    "qat": "algorithm_config",
    "dpo": "algorithm_config",
    "tensorboard": "logger_config",
    "keep_checkpoints": "X-Posttrain-Keep-Checkpoints",
    "devices": "X-Posttrain-Devices",
}

#: Our extension beside the Llama Stack body, which is closed (additionalProperties: false): a
#: request header asking the job to keep only its newest N epoch checkpoints (at most the operator's
#: POSTTRAIN_MAX_CHECKPOINTS_PER_JOB; without it, POSTTRAIN_KEEP_CHECKPOINTS).
KEEP_CHECKPOINTS_HEADER = "X-Posttrain-Keep-Checkpoints"
#: Likewise: the devices a supervised fine-tune asks for (at most the operator's POSTTRAIN_DEVICES_PER_JOB).
DEVICES_HEADER = "X-Posttrain-Devices"

#: Llama Stack's attention module names, and the Hugging Face spelling of the output projection.
ATTENTION_MODULES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "output_proj",
                     "o_proj": "output_proj"}

NO_FSDP = ("the service picks the sharding itself: a full fine-tune on POSTTRAIN_DEVICES_PER_JOB > 1 devices is "
           "sharded with FSDP2 (no CPU offload), a LoRA job runs data parallel (DDP); leave this switch false")

#: efficiency_config switches this server refuses when true, and why.
UNSUPPORTED_EFFICIENCY = {
    "enable_activation_offloading": "activations stay on the job's device; enable_activation_checkpointing "
                                    "is how to train with less activation memory",
    "memory_efficient_fsdp_wrap": NO_FSDP,
    "fsdp_cpu_offload": NO_FSDP,
}

SFT_NAMES = SubmissionNames(model="model", dataset_id="training_config.data_config.dataset_id",
                            validation_dataset_id="training_config.data_config.validation_dataset_id")
DPO_NAMES = SFT_NAMES.model_copy(update={"model": "finetuned_model"})


def keep_checkpoints(header: str | None) -> int | None:
    """The ``X-Posttrain-Keep-Checkpoints`` header's number, None when absent; a 400 naming the
    header when it is no decimal integer (the recipe bounds the number itself)."""
    return _whole_number(header, name=KEEP_CHECKPOINTS_HEADER, what="checkpoints")


def devices_wanted(header: str | None) -> int | None:
    """The ``X-Posttrain-Devices`` header's number, None when absent (then the operator's
    POSTTRAIN_DEVICES_PER_JOB); a 400 naming the header when it is no decimal integer."""
    return _whole_number(header, name=DEVICES_HEADER, what="devices")


def _whole_number(header: str | None, *, name: str, what: str) -> int | None:
    if header is None:
        return None
    if not header.strip().isascii() or not header.strip().isdigit() or len(header.strip()) > 9:
        raise RecipeInvalid(field=name, reason=f"must be a whole number of {what}, got {header!r}")
    return int(header.strip())


def sft_submission(body: SupervisedFineTuneRequest, keep: int | None = None, devices: int | None = None) -> Submission:
    """A supervised fine-tune: LoRA, QAT, or (no algorithm_config) every weight. ``keep``: the
    ``X-Posttrain-Keep-Checkpoints`` header's number; ``devices``: the ``X-Posttrain-Devices`` header's."""
    recipe = _common_recipe(body.training_config, {}, body.logger_config, keep)
    recipe["method"] = JobKind.SFT.value
    if devices is not None:
        recipe["devices"] = devices
    algorithm = body.algorithm_config
    if isinstance(algorithm, LoraFinetuningConfig):
        recipe["adapter"] = _lora(algorithm)
    elif isinstance(algorithm, QATFinetuningConfig):
        recipe["qat"] = {"quantizer_name": algorithm.quantizer_name, "group_size": algorithm.group_size}
    return _submission(body.job_uuid, body.model, body.training_config, body.checkpoint_dir, recipe, SFT_NAMES)


def dpo_submission(body: PreferenceOptimizeRequest, keep: int | None = None, devices: int | None = None) -> Submission:
    """Preference optimization. The spec's DPO config holds only beta and loss_type, so the adapter
    is the recipe's default one. Clients 0.2.x send {reward_scale, reward_clip, epsilon, gamma}
    (an older shape with no DPO meaning): beta 0.1, sigmoid, and a note in the job's log.
    ``devices``: the ``X-Posttrain-Devices`` header's number (DPO trains data parallel too)."""
    recipe = _common_recipe(body.training_config, {}, body.logger_config, keep)  # the search: search_config
    recipe["method"] = JobKind.DPO.value
    if devices is not None:
        recipe["devices"] = devices
    recipe["adapter"] = DPO_ADAPTER.model_dump()
    algorithm = body.algorithm_config
    if isinstance(algorithm, DPOAlignmentConfig):
        recipe["dpo"] = {"beta": algorithm.beta, "loss_type": algorithm.loss_type}
    else:
        recipe["dpo"] = {}
        legacy = sorted(algorithm.model_dump())
        recipe["notes"] = [(f"the request's DPO options {legacy} have no DPO meaning; training with beta=0.1, "
                            "loss_type=sigmoid")]
    return _submission(body.job_uuid, body.finetuned_model, body.training_config, None, recipe, DPO_NAMES)


def _submission(job_uuid: str, model: str | None, training: TrainingConfig, checkpoint_dir: str | None,
                recipe: dict[str, Any], names: SubmissionNames) -> Submission:
    data = training.data_config
    assert data is not None  # _common_recipe refused its absence
    # A model id (org/name) is looked up in the cache folder as a path: bounded like one.
    if model is not None:
        check_path_lengths(model, field=names.model)
    if checkpoint_dir is not None:
        check_path_lengths(checkpoint_dir, field=names.checkpoint_dir, max_bytes=MAX_PATH_BYTES - OUTPUT_HEADROOM_BYTES)
    try:
        return build_submission({
            "job_uuid": job_uuid, "model": model, "dataset_id": data.dataset_id,
            "validation_dataset_id": data.validation_dataset_id, "checkpoint_dir": checkpoint_dir,
            "recipe": recipe, "names": names,
        })
    except RecipeInvalid as refusal:
        raise renamed(refusal) from None


def renamed(refusal: RecipeInvalid) -> RecipeInvalid:
    """The refusal with its recipe field spelled as the Llama Stack request spells it."""
    field = (refusal.field or "").removeprefix("recipe.")  # the Submission holds the recipe under "recipe"
    return RecipeInvalid(field=field or None, reason=refusal.reason).renamed(FIELD_NAMES)


def search_config(raw: dict[str, Any], submission: Submission) -> SearchConfig | None:
    """The request's ``hyperparam_search_config``, typed and checked against the recipe every
    trial starts from; None for ``{}`` (an ordinary job). Refusals are 400s naming the field."""
    return parse_search(raw, submission.recipe)


def _common_recipe(training: TrainingConfig, search: dict[str, Any], logger: dict[str, Any],
                   keep: int | None = None) -> dict[str, Any]:
    """The recipe fields SFT and DPO requests share, with the refusals of what has no home (a
    search, for the doors that do not run one: the Llama Stack door takes it with ``search_config``)."""
    if search:
        keys = ", ".join(sorted(search))
        raise RecipeInvalid(f"hyperparam_search_config: not supported on this endpoint (got keys: {keys}); send {{}}, "
                            "or send the search to /v1/post-training/supervised-fine-tune")
    if training.data_config is None:
        raise RecipeInvalid("training_config.data_config: required by this server, it names the dataset to train on")
    efficiency = training.efficiency_config
    for flag, why in UNSUPPORTED_EFFICIENCY.items():
        if efficiency is not None and getattr(efficiency, flag):
            raise RecipeInvalid(f"training_config.efficiency_config.{flag}: not supported by this server ({why}); "
                                f"send {flag}: false or leave it out")
    data = training.data_config
    recipe: dict[str, Any] = {
        "schedule": _without_none({
            "n_epochs": training.n_epochs, "max_steps_per_epoch": training.max_steps_per_epoch,
            "gradient_accumulation_steps": training.gradient_accumulation_steps,
            "max_validation_steps": training.max_validation_steps,
        }),
        "data": {"batch_size": data.batch_size, "shuffle": data.shuffle, "data_format": data.data_format,
                 "packed": data.packed, "train_on_input": data.train_on_input},
        "activation_checkpointing": bool(efficiency and efficiency.enable_activation_checkpointing),
        "tensorboard": tensorboard_wanted(logger),
    }
    if training.dtype is not None:
        recipe["dtype"] = training.dtype
    if keep is not None:
        recipe["keep_checkpoints"] = keep
    if training.optimizer_config is not None:
        recipe["optimizer"] = training.optimizer_config.model_dump()
    return recipe


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    """Clients 0.5 and later send null for what the caller left out: the recipe's default then."""
    return {key: value for key, value in values.items() if value is not None}


def _lora(algorithm: LoraFinetuningConfig) -> dict[str, Any]:
    return {
        "attention": [ATTENTION_MODULES.get(name, name) for name in algorithm.lora_attn_modules],
        "mlp": algorithm.apply_lora_to_mlp, "output": algorithm.apply_lora_to_output,
        "rank": algorithm.rank, "alpha": algorithm.alpha,
        "use_dora": algorithm.use_dora, "quantize_base": algorithm.quantize_base,
    }


def tensorboard_wanted(config: dict[str, Any]) -> bool:
    """Whether ``logger_config`` asks for the one logger this server writes: TensorBoard event
    files in the job's output folder. ``{}`` is no log; ``{"tensorboard": true}`` is taken as a
    convenience spelling; any other logger (wandb, mlflow, ...) or key is refused, never ignored."""
    if not config:
        return False
    if set(config) == {"type"} and isinstance(config["type"], str) and config["type"].strip().lower() == "tensorboard":
        return True
    if set(config) == {"tensorboard"} and isinstance(config["tensorboard"], bool):
        return config["tensorboard"]
    keys = ", ".join(sorted(config))
    described = f"type {config['type']!r}" if set(config) == {"type"} else f"keys: {keys}"
    raise RecipeInvalid(f'logger_config: only {{"type": "tensorboard"}} (a TensorBoard log in the job\'s output folder) '
                        f"or {{}} (no log) is supported (got {described})")
