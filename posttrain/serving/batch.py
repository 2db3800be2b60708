"""One running batch: its rows, their KV cache, and the tensor work of a step (prefill, decode, join, leave).

Rows are left-padded to a common length with an attention mask, and each row carries its own
position ids, so padding changes nothing a row sees. Rows that finish (or whose reader went away)
leave the cache at once; rows admitted while a batch runs are prefilled on their own and joined to
it by left-padding the shorter cache, so a new request does not wait for the batch to drain.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from posttrain.serving.models import BASE_ROWS, MIXED_ROWS, Base
from posttrain.serving.text import TextStream


@dataclass
class Row:
    """One choice of one request: what it samples with and how far it got."""

    ticket: Any  #: the engine's Ticket (the request and where its events go)
    index: int  #: the choice index (0..n-1)
    prompt_ids: list[int]
    adapter: str  #: the peft adapter name, or BASE_ROWS
    temperature: float
    top_p: float
    seed: int
    max_tokens: int
    text: TextStream
    eos_ids: frozenset[int]
    generator: Any = None  #: a torch.Generator seeded with ``seed``: the row's draws depend on nothing else
    position: int = 0  #: the position id of the next token fed
    generated: int = 0

    def make_generator(self, device: Any) -> None:
        import torch

        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)


def row_seed(seed: int | None, index: int) -> int:
    """Choice ``index`` of a seeded request draws from seed + index; an unseeded one from a fresh seed."""
    return (seed + index) % (2**63) if seed is not None else random.getrandbits(63)


@dataclass
class Batch:
    """Rows of one base, decoded together; ``mask`` and the cache's tensors have one row per ``rows`` entry."""

    base: Base
    rows: list[Row]
    cache: Any
    mask: Any  #: (rows, cached length) 1 for real tokens, 0 for left padding
    last: Any = None  #: (rows,) the token each row feeds next
    pad_id: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def forward(self, input_ids: Any, positions: Any) -> Any:
        """Logits of the last position of each row, for ``input_ids`` fed after the cache."""
        kwargs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=self.mask, position_ids=positions,
                                      use_cache=True, logits_to_keep=1)
        kwargs[self.base.cache_argument] = self.cache
        model = self.base.model
        names = {row.adapter for row in self.rows}
        if not self.base.is_peft:
            out = model(**kwargs)
        elif names == {BASE_ROWS}:
            with model.disable_adapter():
                out = model(**kwargs)
        elif len(names) == 1:  # one adapter for every row: peft's plain path, no per-row split
            name = names.pop()
            if self.base.active_adapter != name:
                model.set_adapter(name)
                self.base.active_adapter = name
            out = model(**kwargs)
        else:  # several adapters: stacked (mixed_lora), or through peft's per-adapter split
            adapters = [row.adapter for row in self.rows]
            stacks = self.base.mixed_lora()
            if stacks is None:
                out = model(**kwargs, adapter_names=adapters)
            else:
                if self.base.active_adapter != MIXED_ROWS:
                    stacks.silence_peft()
                    self.base.active_adapter = MIXED_ROWS  # the one-adapter path sets its adapter again
                with stacks.applied(adapters):
                    out = model(**kwargs)
        return out.logits[:, -1, :].float()


def prefill(base: Base, rows: list[Row], pad_id: int) -> tuple[Batch, Any]:
    """A new batch of ``rows`` with their prompts run through the model; returns it and the next-token logits."""
    import torch
    from transformers import DynamicCache

    device = next(base.model.parameters()).device
    length = max(len(row.prompt_ids) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, length - len(row.prompt_ids):] = torch.tensor(row.prompt_ids, dtype=torch.long)
        mask[i, length - len(row.prompt_ids):] = 1
        row.position = len(row.prompt_ids)
        if row.generator is None:
            row.make_generator(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    config = base.model.config
    batch = Batch(base=base, rows=rows, cache=DynamicCache(config=config), mask=mask, pad_id=pad_id)
    return batch, batch.forward(ids, positions)


def decode_step(batch: Batch) -> Any:
    """Feed each row its last token; returns the next-token logits."""
    import torch

    device = batch.mask.device
    batch.mask = torch.cat([batch.mask, torch.ones((len(batch.rows), 1), dtype=batch.mask.dtype, device=device)], 1)
    positions = torch.tensor([[row.position] for row in batch.rows], dtype=torch.long, device=device)
    logits = batch.forward(batch.last.unsqueeze(1), positions)
    for row in batch.rows:
        row.position += 1
    return logits


def _layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "layers", []))


def can_join(cache: Any) -> bool:
    """Only plain growing caches (every layer a DynamicLayer) can be re-padded and joined."""
    from transformers.cache_utils import DynamicLayer

    layers = _layers(cache)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def join(batch: Batch, new: Batch) -> None:
    """Append ``new``'s rows to ``batch``: the shorter cache is left-padded to the longer one's length."""
    import torch
    import torch.nn.functional as F

    length = max(batch.mask.shape[1], new.mask.shape[1])

    def pad(tensor: Any, seq_dim_from_end: int) -> Any:
        missing = length - tensor.shape[-seq_dim_from_end]
        if missing == 0:
            return tensor
        widths = [0, 0] * (seq_dim_from_end - 1) + [missing, 0]
        return F.pad(tensor, widths)

    for old_layer, new_layer in zip(_layers(batch.cache), _layers(new.cache), strict=True):
        old_layer.keys = torch.cat([pad(old_layer.keys, 2), pad(new_layer.keys, 2)], 0)
        old_layer.values = torch.cat([pad(old_layer.values, 2), pad(new_layer.values, 2)], 0)
    batch.mask = torch.cat([pad(batch.mask, 1), pad(new.mask, 1)], 0)
    batch.last = torch.cat([batch.last, new.last], 0)
    batch.rows.extend(new.rows)


def keep_rows(batch: Batch, keep: list[int]) -> None:
    """Only rows ``keep`` stay; columns that are padding in every remaining row are cut off the cache."""
    import torch

    if len(keep) == len(batch.rows):
        return
    index = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
    batch.rows = [batch.rows[i] for i in keep]
    batch.mask = batch.mask.index_select(0, index)
    batch.last = batch.last.index_select(0, index)
    used = batch.mask.sum(0).nonzero()
    first = int(used[0]) if used.numel() and can_join(batch.cache) else 0
    batch.mask = batch.mask[:, first:]
    for layer in _layers(batch.cache):
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.index_select(0, index)[:, :, first:, :]
            layer.values = layer.values.index_select(0, index)[:, :, first:, :]


def adapter_name(name: str | None) -> str:
    return name if name is not None else BASE_ROWS
