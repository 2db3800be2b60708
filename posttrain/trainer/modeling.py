"""Loading the model for training: device, dtype, LoRA targets, optimizer and schedule.

Kept apart from the SFT loop so another method's trainer (DPO) can build its model the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

# Llama Stack names LoRA targets after torchtune's modules; map them to the Hugging Face names,
# trying each alias until one exists in the model.
ATTENTION_ALIASES = {
    "q_proj": ("q_proj", "query", "wq"),
    "k_proj": ("k_proj", "key", "wk"),
    "v_proj": ("v_proj", "value", "wv"),
    "output_proj": ("o_proj", "out_proj", "dense", "wo"),
}
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


class TrainerConfigError(ValueError):
    """The training or algorithm config cannot be applied to this model."""


@dataclass(frozen=True)
class Precision:
    """Where and how we compute: ``dtype`` is what we actually use, ``requested`` what was asked."""

    device: str
    dtype: str  # "fp32" | "bf16" | "fp16"
    requested: str

    @property
    def autocast(self) -> bool:
        return self.dtype != "fp32"

    def autocast_context(self):
        """Mixed precision for the forward pass (and so the backward): a no-op in fp32."""
        import contextlib

        import torch

        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=self.torch_dtype())

    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]

    def memory_fields(self) -> dict[str, float]:
        """The GPU memory peak so far, for each step's metric: what a user sizes batch and model by
        on a GPU (the worker's RSS figure says nothing of it). Nothing on a CPU."""
        if self.device != "cuda":
            return {}
        import torch

        return {"gpu_memory_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def resolve_precision(*, device: str, requested_dtype: str | None, cpu_bf16: bool = True) -> Precision:
    """What a job computes in. On a CPU: bf16 when asked for and the CPU has it natively (and the
    operator left ``cpu_bf16`` on), else fp32 (emulated bf16 and CPU fp16 are several times slower
    than fp32). On CUDA: as asked, with fp16 for bf16 on GPUs without bf16."""
    import torch

    requested = (requested_dtype or "bf16").lower()
    if requested not in {"bf16", "fp16", "fp32"}:
        raise TrainerConfigError(f"training_config.dtype must be bf16, fp16 or fp32, not {requested_dtype!r}")
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainerConfigError("device 'cuda' was asked for but no CUDA device is available")
    if device == "cpu":
        native = cpu_bf16 and requested == "bf16" and cpu_has_native_bf16()
        return Precision(device="cpu", dtype="bf16" if native else "fp32", requested=requested)
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        return Precision(device=device, dtype="fp16", requested=requested)
    return Precision(device=device, dtype=requested, requested=requested)


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there bf16 matmuls run
    about twice as fast as fp32 ones. Elsewhere bf16 is emulated and several times slower than fp32."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def set_threads(threads: int | None) -> int:
    import torch

    count = int(threads or os.cpu_count() or 1)
    torch.set_num_threads(count)
    return count


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def load_model(*, path: str, precision: Precision, lora: bool, trust_remote_code: bool, quantize_base: bool = False):
    """Full fine-tunes keep fp32 master weights (autocast does the rest); LoRA bases load in the
    compute dtype, since they are frozen and only the adapters need fp32.

    ``quantize_base`` (LoRA only, the spec's QLoRA switch): the base's linear layers load as 4-bit
    NF4 with double quantization (bitsandbytes, which runs on CUDA and, since 0.48, on CPUs),
    dequantized to the compute dtype on the fly; about a quarter of the bf16 memory for those
    weights. The norms, embeddings and output head stay in the compute dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = precision.torch_dtype() if lora else torch.float32
    if not quantize_base:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        return model.to(precision.device)
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    # A quantized model cannot be moved after loading: place it while loading. On CUDA the job sees
    # only its own GPU (CUDA_VISIBLE_DEVICES), which is device 0.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quantization,
                                                 device_map={"": 0 if precision.device == "cuda" else precision.device},
                                                 trust_remote_code=trust_remote_code)
    for layer in _quantized_layers(model):
        # bitsandbytes 0.50 repacks a layer's weight for its AVX512-BF16 CPU kernel at the first
        # no-grad forward (our validation); that fails for layers whose input size is not a
        # multiple of the block size (e.g. 1376), and the repacked weight is an inference format.
        # The generic dequantizing path serves training and validation alike.
        layer.support_avx512bf16_for_cpu = False
    return model


#: How ``quantize_base`` stores the base (``resources_allocated.base_quantization.scheme``).
BASE_QUANTIZATION = "nf4 4-bit, double quantization (bitsandbytes)"


def quantized_layers(model) -> int:
    """How many of the model's linear layers are bitsandbytes 4-bit layers (a check that the
    quantization happened, reported beside the scheme)."""
    return len(_quantized_layers(model))


def _quantized_layers(model) -> list:
    """bitsandbytes' own 4-bit layers (not peft's LoRA wrappers around them, which share the name)."""
    return [module for module in model.modules()
            if type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")]


def load_merge_base(*, path: str, adapter: str | None = None, trust_remote_code: bool):
    """The model a merged checkpoint is made from: the base as stored (its own dtype, on the CPU),
    with a starting adapter merged in when the job began from one (DPO on an SFT adapter)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", trust_remote_code=trust_remote_code)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model


def load_tokenizer(*, path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id will do
    return tokenizer


def lora_target_modules(model, algorithm_config: dict[str, Any]) -> list[str]:
    """Hugging Face module names for the Llama Stack LoRA options, checked against the model.

    ``default_targets`` (set by the DPO recipe, whose request names no layers) makes
    ``lora_attn_modules`` a preference: a model that lacks any of them (GPT-2's fused ``c_attn``)
    gets peft's default LoRA targets for its ``model_type`` instead."""
    linear_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _linear_like(module)}
    wanted = algorithm_config.get("lora_attn_modules") or []
    found = {name: next((a for a in ATTENTION_ALIASES.get(name, (name,)) if a in linear_names), None) for name in wanted}
    missing = [name for name, alias in found.items() if alias is None]
    if missing and algorithm_config.get("default_targets"):
        targets = _architecture_default_targets(model, linear_names, missing)
    elif missing:
        aliases = ATTENTION_ALIASES.get(missing[0], (missing[0],))
        raise TrainerConfigError(
            f"lora_attn_modules: {missing[0]!r} matches no linear layer of this model (tried {', '.join(aliases)})"
        )
    else:
        targets = list(found.values())
    if algorithm_config.get("apply_lora_to_mlp"):
        mlp = [name for name in MLP_MODULES if name in linear_names]
        if not mlp:
            raise TrainerConfigError(f"apply_lora_to_mlp: the model has none of {', '.join(MLP_MODULES)}")
        targets += mlp
    if algorithm_config.get("apply_lora_to_output"):
        targets.append("lm_head")
    if not targets:
        raise TrainerConfigError("the LoRA config selects no modules; set lora_attn_modules or apply_lora_to_mlp")
    return list(dict.fromkeys(targets))


def _linear_like(module) -> bool:
    """A layer LoRA can adapt as a linear one: ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2's
    transposed linear layer, which peft adapts with ``fan_in_fan_out``)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def _architecture_default_targets(model, linear_names: set[str], missing: list[str]) -> list[str]:
    """peft's default LoRA targets for the model's ``model_type`` that the model has."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    defaults = DEFAULTS.get(model_type)
    present = [name for name in defaults if name in linear_names] if isinstance(defaults, list) else []
    if not present:
        raise TrainerConfigError(
            f"lora_attn_modules: this {model_type!r} model has no {', '.join(missing)} layer and peft names no "
            f"default LoRA targets for model type {model_type!r} that it has"
        )
    return present


def lora_model(base, algorithm_config: dict[str, Any], *, resume=None):
    """``base`` with a trainable adapter: a new one from the LoRA options, or the one saved in
    ``resume`` (a checkpoint or resume point) when the job continues."""
    if resume is None:
        model = apply_lora(base, algorithm_config)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, resume, is_trainable=True)
    _keep_adapter_inputs_as_they_come(model)
    return model


def apply_lora(model, algorithm_config: dict[str, Any]):
    """A new adapter on ``model``. ``fan_in_fan_out`` when the targets are ``Conv1D`` layers, whose
    weights are stored transposed (peft would otherwise warn and switch it on itself)."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = lora_target_modules(model, algorithm_config)
    targeted = [module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in targets]
    config = LoraConfig(
        r=int(algorithm_config.get("rank") or 8),
        lora_alpha=int(algorithm_config.get("alpha") or 16),
        target_modules=targets,
        fan_in_fan_out=bool(targeted) and all(isinstance(module, Conv1D) for module in targeted),
        use_dora=bool(algorithm_config.get("use_dora")),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _keep_adapter_inputs_as_they_come(model) -> None:
    """peft casts each adapter layer's input to the adapter weights' dtype (fp32), and under
    autocast the adapter's matmul casts it straight back to bf16/fp16: two copies of every adapted
    layer's input in the forward and two more in the backward, for the same product (the bf16 ->
    fp32 -> bf16 round trip is exact). Measured 4-8% of a bf16 LoRA step on a CPU. Without
    autocast (fp32) the input already has the adapter's dtype. peft's own switch
    (``peft.helpers.disable_input_dtype_casting`` sets the same attribute for a block)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def enable_activation_checkpointing(model) -> None:  # noqa: ANN001
    """The spec's ``enable_activation_checkpointing``: each decoder layer's activations are
    recomputed in the backward instead of kept. Non-reentrant checkpoints whose recompute uses the
    forward's attention (``forward.same_attention_on_recompute``); the embeddings'
    output requires grad, so a LoRA model with frozen embeddings still gets gradients through the
    checkpointed layers."""
    from posttrain.trainer.forward import same_attention_on_recompute

    settings = {"use_reentrant": False, "context_fn": same_attention_on_recompute(model)}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=settings)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)
    model.enable_input_require_grads()


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def build_optimizer(model, optimizer_config: dict[str, Any]):
    import torch

    kind = (optimizer_config.get("optimizer_type") or "adamw").lower()
    lr = float(optimizer_config.get("lr") or 2e-5)
    weight_decay = float(optimizer_config.get("weight_decay") or 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    if kind in ("adamw", "adam"):
        adam = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        # torch's fused kernel does a parameter's whole update in one pass instead of a dozen tensor
        # ops: the same update, measured 8x less optimizer time for a full fine-tune on a CPU, 4x for
        # LoRA. Plain Adam where this device or dtype has no fused kernel.
        try:
            return adam(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError, TypeError):
            return adam(params, lr=lr, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise TrainerConfigError(f"optimizer_config.optimizer_type must be adam, adamw or sgd, not {kind!r}")


def build_scheduler(optimizer, *, warmup_steps: int, total_steps: int):
    """Linear warmup, then linear decay to zero over the planned steps."""
    from transformers import get_scheduler

    return get_scheduler("linear", optimizer, num_warmup_steps=max(0, warmup_steps),
                         num_training_steps=max(total_steps, 1))


def replan_scheduler(optimizer, scheduler) -> None:
    """After loading a saved schedule, set the learning rates from *this* run's plan.

    The saved optimizer carries the rate of the old plan (zero at the end of a finished run), and
    a resumed job may plan more epochs; without this, the first resumed step would use it.
    """
    rates = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates


@dataclass
class Optimization:
    """What a training loop steps: optimizer, schedule, fp16 scaler, and where the count stands."""

    optimizer: Any
    scheduler: Any
    scaler: Any
    total_steps: int
    steps_per_epoch: int
    global_step: int = 0
    start_epoch: int = 1
    #: Resuming mid-epoch (from a resume point): optimizer steps of ``start_epoch`` already done, and their losses.
    steps_done_in_epoch: int = 0
    epoch_losses: list[float] = field(default_factory=list)


def prepare_optimization(model, *, optimizer_config: dict[str, Any], micro_batches: int, plan, precision,
                         resume_folder=None) -> Optimization:  # noqa: ANN001 - plan: SFTPlan, precision: Precision
    """Plan the steps (``max_steps_per_epoch`` optimizer steps an epoch at most), build the optimizer,
    the warmup+decay schedule and, for fp16 on CUDA, a grad scaler; restore them from a checkpoint."""
    import math

    import torch

    from posttrain.trainer.checkpoints import resume_training

    steps_per_epoch = max(1, min(plan.max_steps_per_epoch, math.ceil(micro_batches / plan.gradient_accumulation_steps)))
    total_steps = plan.n_epochs * steps_per_epoch
    optimizer = build_optimizer(model, optimizer_config)
    scheduler = build_scheduler(optimizer, warmup_steps=plan.warmup_steps, total_steps=total_steps)
    scaler = torch.amp.GradScaler("cuda") if precision.autocast and precision.dtype == "fp16" else None
    run = Optimization(optimizer=optimizer, scheduler=scheduler, scaler=scaler, total_steps=total_steps,
                       steps_per_epoch=steps_per_epoch)
    if resume_folder is not None:
        run.global_step, run.start_epoch, run.steps_done_in_epoch, run.epoch_losses = resume_training(
            folder=resume_folder, optimizer=optimizer, scheduler=scheduler)
    return run


def base_resources(model, *, precision, threads: int) -> dict[str, Any]:  # noqa: ANN001
    """What the ``started`` event reports about the job's device and model, for every method."""
    import torch

    parameters, trainable = count_parameters(model)
    return {"device": precision.device, "dtype": precision.dtype, "requested_dtype": precision.requested,
            "threads": threads, "parameters": parameters, "trainable_parameters": trainable,
            "torch": torch.__version__,
            **({"cuda_visible_devices": os.environ["CUDA_VISIBLE_DEVICES"]} if "CUDA_VISIBLE_DEVICES" in os.environ else {})}


MAX_LENGTH_CAP = 4096  # no max sequence length in the Llama Stack config; keep memory bounded


def model_max_length(*, model_path: str, tokenizer, trust_remote_code: bool) -> int:  # noqa: ANN001
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length, MAX_LENGTH_CAP]
    return min(int(limit) for limit in limits if limit and limit < 10**8)


@dataclass
class RunSetup:
    """What every training method settles before it reads a batch."""

    job_uuid: str
    seed: int
    trust_remote_code: bool
    output_dir: Any  # pathlib.Path
    threads: int
    precision: Any  # Precision
    tokenizer: Any
    max_length: int


def set_up_run(spec: dict[str, Any], *, requested_dtype: str | None) -> RunSetup:
    """Output folder, threads, seeds, precision, tokenizer and max sequence length, from the spec."""
    from pathlib import Path

    trust = bool(spec.get("trust_remote_code"))
    seed = int(spec.get("seed") or 0)
    output_dir = Path(spec["output_dir"]).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    threads = set_threads(spec.get("threads"))
    seed_everything(seed)
    precision = resolve_precision(device=spec.get("device") or "auto", requested_dtype=requested_dtype,
                                  cpu_bf16=bool(spec.get("cpu_bf16", True)))
    tokenizer = load_tokenizer(path=spec["model"], trust_remote_code=trust)
    max_length = model_max_length(model_path=spec["model"], tokenizer=tokenizer, trust_remote_code=trust)
    return RunSetup(job_uuid=spec["job_uuid"], seed=seed, trust_remote_code=trust, output_dir=output_dir,
                    threads=threads, precision=precision, tokenizer=tokenizer, max_length=max_length)
