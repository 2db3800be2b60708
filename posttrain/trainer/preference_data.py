"""Preference rows to token ids and to concatenated chosen+rejected batches for DPO.

A row's prompt is rendered with the tokenizer's chat template up to the assistant header (as
``add_generation_prompt=True`` renders it); each answer is the assistant turn that follows, ending
with the turn's end token (eos). Pieces are tokenized on their own, exactly as SFT does
(``formats.chat_segments``), so a model fine-tuned by our SFT sees the same tokens here.
"""

from __future__ import annotations

from posttrain.trainer.batching import collate
from posttrain.trainer.formats import IGNORE_INDEX, RowFormatError, chat_segments, normalize_preference_row


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prompt_and_answer(tokenizer, prompt: list[dict], answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the rendered prompt (through the assistant header) and of the answer turn."""
    segments = chat_segments(tokenizer, [*prompt, {"role": "assistant", "content": answer}])
    last = max(i for i, (_, is_assistant) in enumerate(segments) if is_assistant)
    prompt_ids = [token for text, _ in segments[:last] for token in _ids(tokenizer, text)]
    answer_ids = _ids(tokenizer, segments[last][0])
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in answer_ids:  # a template whose turn end is not eos
        answer_ids.append(eos)
    return prompt_ids, answer_ids


def tokenize_preference_row(row: dict, *, tokenizer, max_length: int | None, row_index: int) -> dict:
    """Return ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (``RowFormatError`` for a bad row).

    Over ``max_length``, the answers are cut to what is left after the prompt (but keep at least
    half of the length), then the prompt loses its oldest tokens, as TRL truncates.
    """
    prompt, chosen, rejected = normalize_preference_row(row, row_index=row_index)
    prompt_ids, chosen_ids = _prompt_and_answer(tokenizer, prompt, chosen)
    rejected_prompt_ids, rejected_ids = _prompt_and_answer(tokenizer, prompt, rejected)
    if rejected_prompt_ids != prompt_ids:  # only if the template renders the prompt by the answer
        raise RowFormatError("the chat template renders the prompt differently for chosen and rejected",
                             row_index=row_index)
    if max_length:
        answer_len = max(len(chosen_ids), len(rejected_ids))
        if len(prompt_ids) + answer_len > max_length:
            keep = max(max_length - len(prompt_ids), max_length // 2)
            chosen_ids, rejected_ids = chosen_ids[:keep], rejected_ids[:keep]
            room = max_length - max(len(chosen_ids), len(rejected_ids))
            prompt_ids = prompt_ids[len(prompt_ids) - room:] if room > 0 else []
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def encode_preference_rows(rows: list[dict], *, tokenizer, max_length: int | None) -> list[dict]:
    return [tokenize_preference_row(row, tokenizer=tokenizer, max_length=max_length, row_index=index)
            for index, row in enumerate(rows)]


def pair_length(example: dict) -> int:
    """The padded width this pair needs: prompt plus the longer answer."""
    return len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))


def collate_pairs(examples: list[dict], *, pad_id: int) -> dict:
    """One batch of 2B rows, the B chosen sequences then the B rejected ones, padded to the
    longest of all; labels only on the answer tokens. Adds ``pairs`` (B)."""
    sequences = [
        {"input_ids": e["prompt_ids"] + e[key], "labels": [IGNORE_INDEX] * len(e["prompt_ids"]) + e[key]}
        for key in ("chosen_ids", "rejected_ids")
        for e in examples
    ]
    batch = collate(sequences, pad_id=pad_id)
    batch["pairs"] = len(examples)
    return batch
