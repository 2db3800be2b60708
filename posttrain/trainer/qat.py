"""Quantization-aware training (the spec's ``QATFinetuningConfig``) with torchao.

A QAT job is a full fine-tune in which every linear layer whose input size the group size divides
computes with *fake* quantization: int8 per-token dynamic activations and int4 per-group symmetric
weights, rounded on the fly in the forward pass while the weights stay in full precision for the
optimizer (the scheme of torchao's ``Int8DynActInt4WeightQATQuantizer``, the quantizer torchtune's QAT
recipe and so Llama Stack's QAT config name). The weights learn to survive that rounding. A checkpoint holds
the trained full-precision weights as a plain Hugging Face model; quantizing it for serving is a
separate step with the same scheme (``posttrain.trainer.qat.convert`` does it with torchao),
which the log tells the user. The quantizer is torchao's ``QATConfig`` around
``Int8DynamicActivationIntxWeightConfig(int4, PerGroup(group_size))``: the same scheme as the
deprecated ``Int8DynActInt4WeightQATQuantizer``, whose fake and real forward passes agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from posttrain.domain.recipes import QAT
from posttrain.trainer.errors import TrainerConfigError


def _qat(config: QAT | Mapping[str, Any]) -> QAT:
    """The recipe's QAT options; a Llama Stack ``algorithm_config`` dict (``{type, quantizer_name,
    group_size}``, what a user has at hand for ``convert``) is read as one."""
    if isinstance(config, QAT):
        return config
    return QAT(quantizer_name=config["quantizer_name"], group_size=config["group_size"])


def _base_config(config: QAT):
    """torchao's post-training config that QAT simulates and ``convert`` applies."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup

    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(config.group_size))


def _eligible(model, group_size: int):
    """Linear layers whose input size the group size divides; not an output head tied to the input
    embeddings (quantizing it would untie the two)."""
    import torch

    tied_head = model.get_output_embeddings() if getattr(model.config, "tie_word_embeddings", False) else None

    def eligible(module, _name: str) -> bool:
        return (isinstance(module, torch.nn.Linear) and module is not tied_head
                and module.in_features % group_size == 0)

    return eligible


def prepare(model, config: QAT | Mapping[str, Any]) -> int:  # model: a transformers model
    """Swap the model's eligible linear layers for fake-quantized ones in place; return how many."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    config = _qat(config)
    quantize_(model, QATConfig(_base_config(config), step="prepare"), filter_fn=_eligible(model, config.group_size))
    swapped = sum(1 for module in model.modules() if isinstance(module, FakeQuantizedLinear))
    if swapped == 0:
        raise TrainerConfigError(f"algorithm_config.group_size {config.group_size} divides the input size of "
                                 "no linear layer of this model: nothing would be quantization-aware")
    return swapped


def convert(model, config: QAT | Mapping[str, Any]):
    """Quantize a QAT-trained model (loaded from its checkpoint, plain linear layers) for real, as
    training simulated: torchao's post-training quantization with the same config (the recipe's
    ``QAT``, or the job's Llama Stack ``algorithm_config``)."""
    from torchao.quantization import quantize_

    config = _qat(config)
    quantize_(model, _base_config(config), filter_fn=_eligible(model, config.group_size))
    return model
