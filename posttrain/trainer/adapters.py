"""LoRA adapters: the Llama Stack LoRA options as peft target modules, a new or resumed adapter,
and activation checkpointing (which a LoRA model needs its input gradients for).
"""

from __future__ import annotations

from typing import Any

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



def lora_target_modules(model, algorithm_config: dict[str, Any]) -> list[str]:
    """Hugging Face module names for the Llama Stack LoRA options, checked against the model."""
    import torch

    linear_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear)}
    targets = []
    for name in algorithm_config.get("lora_attn_modules") or []:
        aliases = ATTENTION_ALIASES.get(name, (name,))
        found = next((alias for alias in aliases if alias in linear_names), None)
        if found is None:
            raise TrainerConfigError(
                f"lora_attn_modules: {name!r} matches no linear layer of this model (tried {', '.join(aliases)})"
            )
        targets.append(found)
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
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=int(algorithm_config.get("rank") or 8),
        lora_alpha=int(algorithm_config.get("alpha") or 16),
        target_modules=lora_target_modules(model, algorithm_config),
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
