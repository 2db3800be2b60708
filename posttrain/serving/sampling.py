"""Choosing each row's next token with its own temperature, top_p and random generator.

Each row draws from its own ``torch.Generator``, once per token, so a seeded request gets the same
text whatever else shares its batch. Log-probabilities are the model's own (before temperature and
top_p), as OpenAI reports them.
"""

from __future__ import annotations

from typing import Any


def next_tokens(logits: Any, rows: list[Any]) -> list[int]:
    """One token per row of ``logits`` (rows x vocabulary): greedy at temperature 0, else sampled."""
    import torch

    if all(row.temperature == 0 for row in rows):
        return [int(t) for t in logits.argmax(-1).tolist()]
    chosen: list[int] = []
    for i, row in enumerate(rows):
        if row.temperature == 0:
            chosen.append(int(logits[i].argmax()))
            continue
        probs = torch.softmax(logits[i] / row.temperature, dim=-1)
        if row.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            before = ordered.cumsum(-1) - ordered  # mass of the tokens ranked above each one
            ordered = ordered.masked_fill(before >= row.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, ordered)
        chosen.append(int(torch.multinomial(probs, 1, generator=row.generator)))
    return chosen


def log_probabilities(logits: Any) -> Any:
    import torch

    return torch.log_softmax(logits, dim=-1)
