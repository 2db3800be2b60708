"""LoRA adapters: the recipe's ``LoRA`` as peft target modules, a new or resumed adapter, and
activation checkpointing (which a LoRA model needs its input gradients for).
"""

from __future__ import annotations

from posttrain.domain.recipes import LoRA
from posttrain.trainer.errors import TrainerConfigError

# Llama Stack names LoRA targets after torchtune's modules; map them to the Hugging Face names,
# trying each alias until one exists in the model.
ATTENTION_ALIASES = {
    "q_proj": ("q_proj", "query", "wq"),
    "k_proj": ("k_proj", "key", "wk"),
    "v_proj": ("v_proj", "value", "wv"),
    "output_proj": ("o_proj", "out_proj", "dense", "wo"),
}
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")

def lora_target_modules(model, lora: LoRA) -> list[str]:
    """Hugging Face module names for the recipe's LoRA targets, checked against the model."""
    import torch
    from transformers.pytorch_utils import Conv1D

    # GPT-2-style models keep their projections as Conv1D, a linear layer with its weight transposed.
    linear_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                    if isinstance(module, (torch.nn.Linear, Conv1D))}
    targets = architecture_default_targets(model, linear_names) if lora.architecture_defaults else []
    for name in lora.attention:
        aliases = ATTENTION_ALIASES.get(name, (name,))
        found = next((alias for alias in aliases if alias in linear_names), None)
        if found is None:
            raise TrainerConfigError(
                f"lora_attn_modules: {name!r} matches no linear layer of this model (tried {', '.join(aliases)})"
            )
        targets.append(found)
    if lora.mlp:
        mlp = [name for name in MLP_MODULES if name in linear_names]
        if not mlp:
            raise TrainerConfigError(f"apply_lora_to_mlp: the model has none of {', '.join(MLP_MODULES)}")
        targets += mlp
    if lora.output:
        targets.append("lm_head")
    if not targets:
        raise TrainerConfigError("the LoRA config selects no modules; set lora_attn_modules or apply_lora_to_mlp")
    return list(dict.fromkeys(targets))


def architecture_default_targets(model, linear_names: set[str]) -> list[str]:
    """The attention modules an adapter targets when the recipe leaves the choice to the
    architecture: every attention projection the Llama-family aliases find (q, k, v, output) when
    the model has a query projection under one of them, else peft's defaults for the model's type
    (GPT-2's fused ``c_attn``, GPT-NeoX's ``query_key_value``, ...)."""
    found = [next((alias for alias in aliases if alias in linear_names), None) for aliases in ATTENTION_ALIASES.values()]
    if found[0] is not None:
        return [name for name in found if name]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(model.config, "model_type", None)
    defaults = DEFAULTS.get(model_type)
    if not defaults:
        raise TrainerConfigError(f"this model ({model_type}) has no attention projections under the names "
                                 "q_proj/k_proj/v_proj/o_proj and peft knows no default LoRA targets for it")
    return list(defaults)


def lora_model(base, lora: LoRA, *, resume=None):  # base: a transformers model
    """``base`` with a trainable adapter: a new one from the LoRA options, or the one saved in
    ``resume`` (a checkpoint or resume point) when the job continues."""
    if resume is None:
        model = apply_lora(base, lora)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, resume, is_trainable=True)
    _keep_adapter_inputs_as_they_come(model)
    return model


def apply_lora(model, lora: LoRA):  # model: a transformers model
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = lora_target_modules(model, lora)
    # GPT-2-style models keep their projections as Conv1D (weights stored transposed): peft needs
    # to be told, or it says so in a warning and fixes it itself.
    conv1d = any(isinstance(module, Conv1D) and name.rsplit(".", 1)[-1] in targets
                 for name, module in model.named_modules())
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=targets,
        use_dora=lora.use_dora,
        fan_in_fan_out=conv1d,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _keep_adapter_inputs_as_they_come(model) -> None:
    """peft casts each adapter layer's input to the adapter weights' dtype (fp32), and under
    autocast the adapter's matmul casts it straight back to bf16/fp16: two copies of every adapted
    layer's input in the forward and two more in the backward, for the same product (the bf16 ->
    fp32 -> bf16 round trip is exact): a few percent of a bf16 LoRA step on a CPU. Without
    autocast (fp32) the input already has the adapter's dtype. peft's own switch
    (``peft.helpers.disable_input_dtype_casting`` sets the same attribute for a block)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def enable_activation_checkpointing(model) -> None:
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
