"""The "sample" primitive of reinforcement fine-tuning: a batch of prompts, ``num_generations``
completions each, in one ``model.generate`` call (transformers' KV cache, so each new token costs
one position's forward, not the whole sequence's).

Prompts are left-padded, so every row's completion starts at the same column; the completion mask
covers each completion's tokens up to and including its first end-of-sequence token (what the
loss scores), nothing after. Rows come out grouped: the ``num_generations`` completions of prompt
0, then of prompt 1, ..., the layout ``grpo_loss.group_advantages`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from posttrain.trainer.forward import contiguous_head_input


@dataclass
class Samples:
    """One sampled batch: ``[R, P]`` prompt ids and mask (left-padded), ``[R, T]`` completion ids and
    mask, with ``R = prompts x num_generations``; ``texts`` the decoded completions (no special tokens)."""

    prompt_ids: Any
    prompt_mask: Any
    completion_ids: Any
    completion_mask: Any
    texts: list[str]

    @property
    def completion_tokens(self) -> int:
        return int(self.completion_mask.sum())

    def input_ids(self):
        import torch

        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    def attention_mask(self):
        import torch

        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


def completion_mask(completion_ids, *, eos_ids: set[int]):
    """1 for each token up to and including the row's first end-of-sequence token, 0 after."""
    import torch

    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= completion_ids == eos
    # Tokens strictly after the first eos: the running count of eos tokens before this one is > 0.
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (before == 0).long()


def eos_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end a completion: the tokenizer's eos and the generation config's."""
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def sample(model, tokenizer, prompts: list[str], *, num_generations: int, temperature: float, top_p: float,
           max_new_tokens: int, device: str) -> Samples:
    """``num_generations`` sampled completions of each prompt (rendered text, special tokens
    included), the model in eval mode and without gradients for the generation."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    prompt_ids = encoded["input_ids"].to(device)
    prompt_mask = encoded["attention_mask"].to(device)
    eos = eos_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), contiguous_head_input(model):
            generated = model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, temperature=temperature,
                top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, num_return_sequences=num_generations,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos) or None, use_cache=True)
    finally:
        model.train(was_training)
    width = prompt_ids.shape[1]
    completion_ids = generated[:, width:]
    mask = completion_mask(completion_ids, eos_ids=eos)
    if tokenizer.pad_token_id is not None:
        completion_ids = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id or 0),
                                   skip_special_tokens=True)
    return Samples(prompt_ids=prompt_ids.repeat_interleave(num_generations, dim=0),
                   prompt_mask=prompt_mask.repeat_interleave(num_generations, dim=0),
                   completion_ids=completion_ids, completion_mask=mask, texts=texts)
