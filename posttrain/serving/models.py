"""The models the worker holds: one copy of each base, LoRA adapters loaded onto it by name, within a budget.

A base is loaded once, however many adapters of it are served: peft's ``load_adapter`` adds each
adapter's LoRA layers to the same base under its own name, and a batch picks per row which one to
apply (one adapter: peft's own path; several: ``mixed_lora``'s stacks, or peft's ``adapter_names``).
The stacks copy the adapters' LoRA weights and count in the budget. A full fine-tune is a folder of
complete weights, so it is a base of its own. What is used least recently goes first when something
new would exceed the budget (bytes of parameters); what a running batch uses is pinned and never
evicted.
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.domain.serving import MODEL_UNLOADABLE
from posttrain.serving.mixed_lora import MixedLora

log = logging.getLogger("posttrain.serving")

BASE_ROWS = "__base__"  #: peft's adapter name for rows that use the base alone
#: ``Base.active_adapter`` while peft's adapters are silenced for stacked mixed batches (``mixed_lora``).
MIXED_ROWS = "__mixed__"


class ModelUnloadable(Exception):
    """The model cannot be loaded: a broken folder, or larger than the whole budget."""

    code = MODEL_UNLOADABLE  #: the protocol's error code for the request that needed it


class NoRoom(Exception):
    """It would fit, but what a running batch uses leaves no room now: try again when the batch ends."""


@dataclass
class Base:
    path: str
    model: Any  #: the transformers model, or the PeftModel wrapping it once an adapter is loaded
    bytes: int
    loads: int
    adapters: dict[str, str] = field(default_factory=dict)  #: adapter folder -> peft adapter name
    adapter_bytes: dict[str, int] = field(default_factory=dict)
    max_positions: int | None = None
    eos_ids: frozenset[int] = frozenset()
    active_adapter: str | None = None  #: the peft adapter set active (used when a batch has one adapter only)
    cache_argument: str = "cache"  #: what the model's forward calls its KV cache (older models: past_key_values)
    #: The stacked LoRA weights of the adapters named in ``_stacked_for`` (``mixed_lora``), or None.
    _stacks: MixedLora | None = None
    _stacked_for: tuple[str, ...] | None = None

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    def mixed_lora(self) -> MixedLora | None:
        """Every loaded adapter's LoRA weights stacked for mixed-adapter batches (built on the
        first mixed batch after an adapter came or went), or None where peft's own path serves."""
        names = tuple(self.adapters.values())
        if self._stacked_for != names:
            self.drop_stacks()  # the old stacks go before the new ones are built
            self._stacks = MixedLora.of(self.model, list(names)) if self.is_peft else None
            self._stacked_for = names
        return self._stacks

    def drop_stacks(self) -> None:
        if self._stacks is not None:
            self._stacks.close()
        self._stacks, self._stacked_for = None, None

    @property
    def stack_bytes(self) -> int:
        return self._stacks.bytes if self._stacks is not None else 0


def _parameter_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def folder_weight_bytes(path: str) -> int:
    """What loading a folder will take, before loading it: the size of its weight files."""
    folder = Path(path)
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())


def max_positions(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class ModelStore:
    """Bases and adapters in memory, least recently used first (used only from the engine thread)."""

    def __init__(self, budget_bytes: int, device: str = "cpu") -> None:
        self.budget = budget_bytes
        self.device = device
        self._bases: OrderedDict[str, Base] = OrderedDict()
        self._adapter_lru: dict[str, str] = {}  #: adapter folder -> base folder
        self._order: OrderedDict[str, None] = OrderedDict()  #: bases and adapters, least recently used first
        self._loads: dict[str, int] = {}
        self.base_loads_total = 0
        self._next_name = 0

    # -- accounting -------------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return sum(b.bytes + sum(b.adapter_bytes.values()) + b.stack_bytes for b in self._bases.values())

    def stats(self) -> dict[str, Any]:
        return {
            "bases": [{"path": b.path, "bytes": b.bytes, "loads": b.loads, "stack_bytes": b.stack_bytes}
                      for b in self._bases.values()],
            "adapters": [{"path": a, "base_path": b.path, "bytes": b.adapter_bytes[a]}
                         for b in self._bases.values() for a in b.adapters],
            "base_loads_total": self.base_loads_total,
            "memory_bytes": self.used_bytes,
            "memory_budget": self.budget,
        }

    # -- use --------------------------------------------------------------------------------------
    def get(self, base_path: str, adapter_path: str | None, pinned: set[str]) -> tuple[Base, str | None]:
        """The base (loaded if needed) and the peft name of the adapter (loaded onto it if needed).

        ``pinned`` holds the folders a running batch uses: they are never evicted to make room.
        """
        base = self._bases.get(base_path)
        if base is None:
            base = self._load_base(base_path, pinned | ({adapter_path} if adapter_path else set()))
        self._touch(base_path)
        if adapter_path is None:
            return base, None
        name = base.adapters.get(adapter_path)
        if name is None:
            name = self._load_adapter(base, adapter_path, pinned | {base_path})
        self._adapter_lru[adapter_path] = base_path
        self._touch(adapter_path)
        return base, name

    def _touch(self, path: str) -> None:
        self._order[path] = None
        self._order.move_to_end(path)

    def forget(self, path: str) -> bool:
        """Drop a base (with its adapters) or an adapter; False when it was not loaded."""
        if path in self._bases:
            self._drop_base(path)
            return True
        if path in self._adapter_lru:
            self._drop_adapter(path)
            return True
        return False

    def holds(self, path: str) -> bool:
        return path in self._bases or path in self._adapter_lru

    # -- loading ----------------------------------------------------------------------------------
    def _load_base(self, path: str, pinned: set[str]) -> Base:
        import torch
        from transformers import AutoModelForCausalLM

        try:
            expected = folder_weight_bytes(path)
        except OSError as exc:
            raise ModelUnloadable(f"cannot read the model folder {path}: {exc}") from exc
        self._make_room(expected, pinned)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        except Exception as exc:  # any loader failure is the model's, reported to the client
            raise ModelUnloadable(f"cannot load the model at {path}: {exc}") from exc
        model.to(self.device).eval()
        size = _parameter_bytes(model.parameters()) + _parameter_bytes(model.buffers())
        if size > self.budget:
            del model
            raise ModelUnloadable(f"the model at {path} takes {size} bytes, more than the serving memory budget "
                                  f"({self.budget} bytes, POSTTRAIN_SERVE_MEMORY_BYTES)")
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self._loads[path] = self._loads.get(path, 0) + 1
        self.base_loads_total += 1
        accepted = inspect.signature(model.forward).parameters
        base = Base(path=path, model=model, bytes=size, loads=self._loads[path],
                    max_positions=max_positions(model.config), eos_ids=eos_ids,
                    cache_argument="cache" if "cache" in accepted else "past_key_values")
        self._bases[path] = base
        torch.set_grad_enabled(False)
        log.info("base loaded", extra={"action": "serve_base_loaded", "path": path, "bytes": size})
        return base

    def _load_adapter(self, base: Base, path: str, pinned: set[str]) -> str:
        from peft import PeftModel

        try:
            expected = folder_weight_bytes(path)
        except OSError as exc:
            raise ModelUnloadable(f"cannot read the adapter folder {path}: {exc}") from exc
        self._make_room(expected, pinned)
        name = f"adapter{self._next_name}"
        self._next_name += 1
        try:
            if base.is_peft:
                base.model.load_adapter(path, adapter_name=name, is_trainable=False)
            else:
                base.model = PeftModel.from_pretrained(base.model, path, adapter_name=name, is_trainable=False)
        except Exception as exc:  # a broken adapter is the client's error, not the worker's
            raise ModelUnloadable(f"cannot load the adapter at {path} onto {base.path}: {exc}") from exc
        base.model.eval()
        base.drop_stacks()
        base.active_adapter = None  # loading may change which adapter is active
        size = _parameter_bytes(p for n, p in base.model.named_parameters() if f".{name}." in n)
        base.adapters[path] = name
        base.adapter_bytes[path] = size
        log.info("adapter loaded", extra={"action": "serve_adapter_loaded", "path": path, "base": base.path})
        return name

    # -- eviction ---------------------------------------------------------------------------------
    def _make_room(self, incoming: int, pinned: set[str]) -> None:
        if incoming > self.budget:
            raise ModelUnloadable(f"it takes {incoming} bytes, more than the serving memory budget ({self.budget} bytes)")
        while self.used_bytes + incoming > self.budget:
            victim = self._least_recent(pinned)
            if victim is None:
                raise NoRoom("the models in use leave no room")
            self.forget(victim)

    def _least_recent(self, pinned: set[str]) -> str | None:
        """The least recently used adapter or base that no running batch needs."""
        for path in self._order:
            if path in pinned:
                continue
            base = self._bases.get(path)
            if base is not None and any(a in pinned for a in base.adapters):
                continue
            return path
        return None

    def _drop_adapter(self, path: str) -> None:
        base_path = self._adapter_lru.pop(path)
        self._order.pop(path, None)
        base = self._bases[base_path]
        name = base.adapters.pop(path)
        base.adapter_bytes.pop(path, None)
        base.drop_stacks()
        base.active_adapter = None
        if base.adapters:
            base.model.delete_adapter(name)
        else:  # the last adapter: unwrap, so the base runs as a plain model again
            base.model = base.model.unload()
            base.model.eval()
        log.info("adapter dropped", extra={"action": "serve_adapter_dropped", "path": path})

    def _drop_base(self, path: str) -> None:
        base = self._bases.pop(path)
        self._order.pop(path, None)
        for adapter in base.adapters:
            self._adapter_lru.pop(adapter, None)
            self._order.pop(adapter, None)
        base.model = None
        log.info("base dropped", extra={"action": "serve_base_dropped", "path": path})
