"""Rows to padded tensors: reading JSON lines, tokenizing, and length-grouped batches.

Rows of similar length are batched together and each batch is padded only to its own longest
row, so little compute is spent on padding (on a CPU that is most of the speed-up available).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from posttrain.trainer.formats import IGNORE_INDEX, RowFormatError, tokenize_sft_row

MEGABATCH_FACTOR = 32  # with shuffle, rows are length-sorted within windows of this many batches


def read_rows(path: str | Path) -> list[dict]:
    """Read a JSON-lines file; the row index of an error is the 0-based line number."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RowFormatError(f"not a valid JSON line ({exc.msg})", row_index=index) from exc
    return rows


def encode_rows(rows: list[dict], *, tokenizer, data_format: str, train_on_input: bool, max_length: int) -> list[dict]:
    """Tokenize every row (raising ``RowFormatError`` for the first that fits no layout)."""
    return [
        tokenize_sft_row(row, tokenizer=tokenizer, data_format=data_format, train_on_input=train_on_input,
                         max_length=max_length, row_index=index)
        for index, row in enumerate(rows)
    ]


def length_grouped_batches(
    lengths: list[int], *, batch_size: int, shuffle: bool, rng: random.Random
) -> list[list[int]]:
    """Group row indices into batches of similar length.

    Without shuffle: one global sort by length, batches in that order (deterministic). With
    shuffle: rows are shuffled, sorted by length inside windows of ``MEGABATCH_FACTOR`` batches
    (so batch contents vary between epochs) and the batch order is shuffled.
    """
    order = list(range(len(lengths)))
    if not shuffle:
        order.sort(key=lambda i: lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(order)
    window = batch_size * MEGABATCH_FACTOR
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[dict], *, pad_id: int):
    """Right-pad a batch to its longest row; returns tensors plus real/label token counts."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    # Label tokens that count toward the loss: the first position predicts nothing.
    label_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "real_tokens": int(attention_mask.sum()),
        "label_tokens": label_tokens,
    }
