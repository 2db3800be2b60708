"""A batch whose rows use different LoRA adapters of one base, as two gathered matmuls per layer.

peft's own mixed batches (``adapter_names``) split each LoRA layer's input by adapter: for every
adapter of the batch, in every LoRA layer, an index of its rows, two small matmuls and an
``index_put`` back. At decode a row is one token, so those calls, not their arithmetic, are the
step: on the bench model a decode step of 8 rows took 62 ms on one adapter and 83 ms split 4 + 4
over two. Here every adapter loaded on the base has a slot in one stack per LoRA layer (A as
``[slots, rank, in]``, B times its scaling as ``[slots, out, rank]``, smaller ranks zero-padded,
a zero slot for base rows and for adapters that do not touch the layer), and a forward hook adds
``B[slot] @ A[slot] @ x`` for all rows with one gather and two batched matmuls, while peft's
adapters are switched off so the layer computes its base alone: the way vLLM's punica kernels
serve mixed LoRA batches on a GPU, in plain torch.

Only plain LoRA on linear layers is stacked. A base with anything else (DoRA or another variant, a
LoRA bias, LoRA on embeddings, ``modules_to_save``) has no stacks, and its mixed batches go through
peft's ``adapter_names`` as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class _Layer:
    module: Any
    a: Any  #: [slots, rank, in]
    b: Any  #: [slots, out, rank], each adapter's scaling folded in


class MixedLora:
    """The stacks of every adapter loaded on one base, and the hooks that apply them per row.

    The hooks stay on the LoRA layers while the stacks live (``close`` takes them off) and add
    nothing outside ``applied``: entering and leaving peft's own switches every step cost a decode
    step of the bench model ~15 ms (they walk every module), so a mixed batch instead turns peft's
    adapters off once (``silence_peft``) and the engine's single-adapter path turns its adapter back
    on when it next runs (``Base.active_adapter``).
    """

    def __init__(self, layers: list[_Layer], slots: dict[str, int]) -> None:
        self.layers = layers
        #: peft adapter name -> its slot; any other name (the base's rows) gets slot 0, all zeros.
        self.slots = slots
        self._index: Any = None  #: the rows' slots while ``applied``
        self._handles = [layer.module.register_forward_hook(self._hook(layer)) for layer in layers]

    @classmethod
    def of(cls, model: Any, names: list[str]) -> MixedLora | None:
        """Stacks for the adapters ``names`` of ``model`` (a PeftModel), or None when one of its
        LoRA layers is not plain LoRA on a linear layer."""
        import torch
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        if any(getattr(config, "modules_to_save", None) for config in model.peft_config.values()):
            return None
        slots = {name: index + 1 for index, name in enumerate(names)}
        layers: list[_Layer] = []
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            present = [name for name in names if name in module.lora_A]
            if not present:
                continue
            if (type(module) is not LoraLinear or any(name in module.lora_variant for name in present)
                    or any(module.lora_B[name].bias is not None for name in present)):
                return None
            a_weights = [module.lora_A[name].weight for name in present]
            rank = max(w.shape[0] for w in a_weights)
            dtype, device = a_weights[0].dtype, a_weights[0].device
            fan_in, fan_out = module.in_features, module.out_features
            a = torch.zeros((len(names) + 1, rank, fan_in), dtype=dtype, device=device)
            b = torch.zeros((len(names) + 1, fan_out, rank), dtype=dtype, device=device)
            for name in present:
                r = module.lora_A[name].weight.shape[0]
                a[slots[name], :r] = module.lora_A[name].weight
                b[slots[name], :, :r] = module.lora_B[name].weight * module.scaling[name]
            layers.append(_Layer(module=module, a=a, b=b))
        return cls(layers, slots)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.a, layer.b))

    def silence_peft(self) -> None:
        """peft's LoRA layers compute their base alone (no active adapter), until its ``set_adapter``."""
        for layer in self.layers:
            layer.module.set_adapter([])

    @contextlib.contextmanager
    def applied(self, adapters: list[str]) -> Iterator[None]:
        """Inside: row ``i`` gets adapter ``adapters[i]`` (a peft name, or any other name for the
        base alone) added by the hooks; peft's adapters must be silenced (``silence_peft``)."""
        import torch

        device = self.layers[0].a.device if self.layers else None
        self._index = torch.tensor([self.slots.get(name, 0) for name in adapters], dtype=torch.long, device=device)
        try:
            yield
        finally:
            self._index = None

    def close(self) -> None:
        """Take the hooks off the layers (the stacks are then garbage)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, layer: _Layer) -> Callable[[Any, tuple[Any, ...], Any], Any]:
        def add_delta(_module: Any, args: tuple[Any, ...], output: Any) -> Any:
            index = self._index
            if index is None:
                return None  # outside ``applied``: the layer's own output stands
            import torch

            x = args[0]
            rows = x.reshape(index.shape[0], -1, x.shape[-1]).to(layer.a.dtype)
            low = torch.bmm(rows, layer.a.index_select(0, index).transpose(1, 2))
            delta = torch.bmm(low, layer.b.index_select(0, index).transpose(1, 2))
            return output + delta.reshape(output.shape).to(output.dtype)
        return add_delta
