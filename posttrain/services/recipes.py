"""Turning a submitted training request into a runnable plan, refusing at submit time whatever
this server would otherwise accept and ignore, or fail on minutes into training.

Requests arrive here already shaped by the API schemas (types, enums, required keys); the rules
below are the ones a schema cannot say.
"""

from __future__ import annotations

from typing import Any

from posttrain.errors import RecipeInvalid

#: Llama Stack's attention module names -> the Hugging Face Llama-family names.
LORA_ATTN_MODULES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj", "o_proj": "o_proj"}

DEFAULT_OPTIMIZER = {"optimizer_type": "adamw", "lr": 1e-4, "weight_decay": 0.0, "num_warmup_steps": 0}
SUPPORTED_DTYPES = ("bf16", "fp16", "fp32")


def _positive(value: Any, field: str, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise RecipeInvalid(f"{field}: must be {'zero or more' if allow_zero else 'at least 1'}, got {value}")


def _no_unsupported_options(name: str, config: dict[str, Any] | None) -> None:
    """hyperparam_search_config: refuse any non-empty value rather than ignore it."""
    if config:
        keys = ", ".join(sorted(config))
        raise RecipeInvalid(f"{name}: not supported by this server yet (got keys: {keys}); send {{}}")


#: The one logger this server implements: TensorBoard event files in the job's output folder.
TENSORBOARD_LOGGER = {"type": "tensorboard"}


def check_logger_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """Return the logger the trainer should run ({"type": "tensorboard"}) or None for no log.

    Only a TensorBoard log is cheap to offer (a folder of event files next to the checkpoints);
    any other logger (wandb, mlflow, ...) or unknown key is refused, never accepted and ignored.
    ``{"tensorboard": true}`` is taken as a convenience spelling; the plan always holds the one
    normalized form, so the trainer reads a single shape.
    """
    if not config:
        return None
    if set(config) == {"type"} and isinstance(config["type"], str) and config["type"].strip().lower() == "tensorboard":
        return dict(TENSORBOARD_LOGGER)
    if set(config) == {"tensorboard"} and isinstance(config["tensorboard"], bool):
        return dict(TENSORBOARD_LOGGER) if config["tensorboard"] else None
    keys = ", ".join(sorted(config))
    described = f"type {config['type']!r}" if set(config) == {"type"} else f"keys: {keys}"
    raise RecipeInvalid(f'logger_config: only {{"type": "tensorboard"}} (a TensorBoard log in the job\'s output folder) '
                        f"or {{}} (no log) is supported (got {described})")


#: efficiency_config switches this server refuses when true, and why.
UNSUPPORTED_EFFICIENCY = {
    "enable_activation_offloading": "activations stay on the job's device; enable_activation_checkpointing "
                                    "is how to train with less activation memory",
    "memory_efficient_fsdp_wrap": "a job runs on one device, without FSDP",
    "fsdp_cpu_offload": "a job runs on one device, without FSDP",
}


def check_training_config(training: dict[str, Any]) -> dict[str, Any]:
    """Validate the TrainingConfig and return it with this server's defaults filled in."""
    _positive(training.get("n_epochs"), "training_config.n_epochs")
    _positive(training.get("max_steps_per_epoch"), "training_config.max_steps_per_epoch")
    _positive(training.get("gradient_accumulation_steps"), "training_config.gradient_accumulation_steps")
    _positive(training.get("max_validation_steps"), "training_config.max_validation_steps")
    data = training.get("data_config")
    if not data:
        raise RecipeInvalid("training_config.data_config: required by this server, it names the dataset to train on")
    _positive(data.get("batch_size"), "training_config.data_config.batch_size")
    dtype = training.get("dtype") or "bf16"
    if dtype not in SUPPORTED_DTYPES:
        raise RecipeInvalid(f"training_config.dtype: '{dtype}' is not one of {', '.join(SUPPORTED_DTYPES)}")
    efficiency = training.get("efficiency_config") or {}
    _refuse_switched_on(efficiency, UNSUPPORTED_EFFICIENCY, field="training_config.efficiency_config",
                        by="by this server")
    optimizer = {**DEFAULT_OPTIMIZER, **(training.get("optimizer_config") or {})}
    if not optimizer["lr"] > 0:
        raise RecipeInvalid(f"training_config.optimizer_config.lr: must be greater than 0, got {optimizer['lr']}")
    _positive(optimizer["weight_decay"], "training_config.optimizer_config.weight_decay", allow_zero=True)
    _positive(optimizer["num_warmup_steps"], "training_config.optimizer_config.num_warmup_steps", allow_zero=True)
    return {
        "n_epochs": training["n_epochs"],
        "max_steps_per_epoch": training.get("max_steps_per_epoch") or 1,
        "gradient_accumulation_steps": training.get("gradient_accumulation_steps") or 1,
        "max_validation_steps": training.get("max_validation_steps") or 1,
        "data_config": {"packed": False, "train_on_input": False, **data},
        "optimizer_config": optimizer,
        "efficiency_config": {"enable_activation_checkpointing": False, **efficiency},
        "dtype": dtype,
    }


def check_lora(algorithm: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate an SFT algorithm_config: LoRA, or QAT (a full fine-tune, quantization-aware).
    None means a plain full fine-tune."""
    if algorithm is None:
        return None
    if algorithm.get("type") == "QAT":
        return check_qat(algorithm)
    unknown = [m for m in algorithm.get("lora_attn_modules", []) if m not in LORA_ATTN_MODULES]
    if unknown:
        raise RecipeInvalid(
            f"algorithm_config.lora_attn_modules: unknown module(s) {unknown}; expected some of q_proj, k_proj, v_proj, output_proj"
        )
    if not (algorithm.get("lora_attn_modules") or algorithm.get("apply_lora_to_mlp") or algorithm.get("apply_lora_to_output")):
        raise RecipeInvalid(
            "algorithm_config: LoRA needs at least one target: list lora_attn_modules or set apply_lora_to_mlp/apply_lora_to_output"
        )
    _positive(algorithm.get("rank"), "algorithm_config.rank")
    _positive(algorithm.get("alpha"), "algorithm_config.alpha")
    return {"use_dora": False, "quantize_base": False, **algorithm}


#: QAT quantizers this server runs (torchao's class name as torchtune's QAT recipe names it, and its short name).
QAT_QUANTIZERS = ("Int8DynActInt4WeightQATQuantizer", "8da4w")


def check_qat(algorithm: dict[str, Any]) -> dict[str, Any]:
    """A QAT algorithm_config: a full fine-tune with fake-quantized linear layers (torchao)."""
    if algorithm.get("quantizer_name") not in QAT_QUANTIZERS:
        raise RecipeInvalid(f"algorithm_config.quantizer_name: QAT supports {' or '.join(QAT_QUANTIZERS)} "
                            f"(int8 dynamic activations, int4 grouped weights), not {algorithm.get('quantizer_name')!r}")
    group_size = algorithm.get("group_size")
    if not isinstance(group_size, int) or group_size < 1 or group_size & (group_size - 1):
        raise RecipeInvalid(f"algorithm_config.group_size: QAT needs a power of two (e.g. 32 or 256), got {group_size!r}")
    return {"type": "QAT", "quantizer_name": algorithm["quantizer_name"], "group_size": group_size}


def check_common(request: dict[str, Any]) -> dict[str, Any] | None:
    """Validate what SFT and DPO requests share; return the normalized logger_config (or None)."""
    job_uuid = request.get("job_uuid", "")
    if not job_uuid or len(job_uuid) > 255 or any(ord(c) < 32 for c in job_uuid):
        raise RecipeInvalid("job_uuid: must be 1 to 255 printable characters")
    _no_unsupported_options("hyperparam_search_config", request.get("hyperparam_search_config"))
    return check_logger_config(request.get("logger_config"))


#: The adapter a DPO job trains. The request has no LoRA options (the spec's DPOAlignmentConfig
#: holds only beta and loss_type), so DPO always trains this adapter: the reference model is then
#: the same weights with the adapter switched off, with no second copy in memory.
#: ``default_targets``: the attention layers are a preference; a model without them (GPT-2's
#: ``c_attn``) gets peft's default LoRA targets for its model type (the trainer's
#: ``lora_target_modules``); ``models.check_default_lora_targets`` refuses at submit what has neither.
DPO_LORA = {"type": "LoRA", "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
            "apply_lora_to_mlp": False, "apply_lora_to_output": False, "rank": 8, "alpha": 16,
            "use_dora": False, "quantize_base": False, "default_targets": True}
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "kto_pair")


#: data_config switches DPO refuses when true, and why.
UNSUPPORTED_DPO_DATA = {
    "packed": "this server does not pack preference pairs",
    "train_on_input": "DPO compares the answers' log-probabilities; the prompt is never trained on",
}


def _refuse_switched_on(section: dict[str, Any], unsupported: dict[str, str], *, field: str, by: str) -> None:
    """A 400 for the first of ``unsupported``'s switches that ``section`` turns on, saying why."""
    for flag, why in unsupported.items():
        if section.get(flag):
            raise RecipeInvalid(f"{field}.{flag}: not supported {by} ({why}); send {flag}: false or leave it out")


def check_dpo_data(training: dict[str, Any]) -> None:
    """What of a (validated) data_config DPO cannot do: its rows are preference pairs, trained on
    as whole prompt/answer pairs, so there is nothing to pack and no input to train on."""
    _refuse_switched_on(training["data_config"], UNSUPPORTED_DPO_DATA, field="training_config.data_config",
                        by="for preference optimization")


def check_dpo(algorithm: dict[str, Any]) -> dict[str, Any]:
    """Validate a DPO algorithm_config. Clients 0.2.x send {reward_scale, reward_clip, epsilon,
    gamma} (an older shape with no DPO meaning); it gets the defaults beta=0.1, loss sigmoid."""
    if "beta" not in algorithm:
        return {"beta": 0.1, "loss_type": "sigmoid", "lora": DPO_LORA, "legacy_config": algorithm}
    beta = algorithm["beta"]
    if not beta > 0:
        raise RecipeInvalid(f"algorithm_config.beta: must be greater than 0, got {beta}")
    loss_type = algorithm.get("loss_type", "sigmoid")
    if loss_type not in DPO_LOSS_TYPES:
        raise RecipeInvalid(f"algorithm_config.loss_type: '{loss_type}' is not one of {', '.join(DPO_LOSS_TYPES)}")
    return {"beta": beta, "loss_type": loss_type, "lora": DPO_LORA}
