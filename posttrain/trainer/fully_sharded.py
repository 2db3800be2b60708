"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for a full fine-tune on several ranks.

A full fine-tune keeps weights, gradients and two Adam moments per parameter: on N ranks FSDP2
keeps 1/N of each on every rank (its parameters become ``DTensor`` shards), gathering a decoder
layer's weights only for that layer's forward and backward. Each decoder layer is its own group,
and the root (embeddings, final norm, output head: tied weights stay in one group) is the module
whose ``forward`` is the loop's (``data_parallel``'s ``LabelLogits``), so its hooks gather the
root's weights around every forward the loop makes.

Checkpoints stay ordinary Hugging Face folders: every rank takes part in gathering the full state
dict (``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` leaves it on rank 0 only),
and rank 0 writes it with ``save_pretrained``. The optimizer state is gathered the same way, keyed
by parameter names, so a resumed job loads it into its own shards (``set_optimizer_state_dict``).
A resumed job loads the full weights from the checkpoint folder like any job, before sharding.
"""

from __future__ import annotations

from typing import Any


def shard(wrapper, model) -> None:
    """``fully_shard`` each decoder layer of ``model`` (the transformers model inside ``wrapper``),
    then ``wrapper`` itself as the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(wrapper)


def decoder_layers(model) -> list:
    """The model body's repeated blocks (``model.model.layers`` for Llama-like models), or none."""
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    return list(layers) if layers is not None else []


def _options(**more: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **more)


def full_model_state(model) -> dict[str, Any]:
    """The model's full state dict on rank 0 (empty on the others); a collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def full_optimizer_state(model, optimizer) -> dict[str, Any]:
    """The optimizer's full state, keyed by parameter names, on rank 0; a collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_optimizer_state(model, optimizer, state: dict[str, Any]) -> bool:
    """Load a full optimizer state saved by ``full_optimizer_state`` into this rank's shards;
    False (nothing loaded) for a state keyed by parameter index, a one-process job's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    groups = state.get("param_groups") or [{}]
    if not all(isinstance(name, str) for group in groups for name in group.get("params", [])):
        return False
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    return True


class GatheredOptimizer:
    """Stands in for the optimizer where a checkpoint asks for ``state_dict()``: the gathered one."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state
