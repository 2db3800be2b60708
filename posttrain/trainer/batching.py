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
    """Group row indices into batches.

    Without shuffle: the dataset's own order, ``batch_size`` consecutive rows per batch, every
    epoch the same (what ``shuffle: false`` asks for, as Llama Stack's own trainer did; rows of
    different lengths then share batches, so there is more padding). With shuffle: rows are
    shuffled, sorted by length inside windows of ``MEGABATCH_FACTOR`` batches (so batches hold rows
    of similar length, and their contents vary between epochs) and the batch order is shuffled.
    """
    order = list(range(len(lengths)))
    if not shuffle:
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
        "total_tokens": input_ids.numel(),
    }


# --- Packing (``data_config.packed``) -------------------------------------------------------------
#
# Several tokenized rows share one sequence of up to ``max_length`` tokens. Each row keeps its own
# positions (0, 1, ...) and attends only to itself: the attention mask is block-diagonal and causal,
# and the first token of every row is a -100 label, so no row learns to predict the next row's
# first token. The loss over a packed batch is then exactly the token-weighted loss of its rows.


def pack_rows(lengths: list[int], *, max_length: int, keep_order: bool = False) -> list[list[int]]:
    """Group row indices into packs of total length <= ``max_length`` (first-fit decreasing).

    Rows are taken longest first (ties by index) and each goes into the first pack, in creation
    order, with room left; a segment tree over the packs' free room makes that O(n log n). A row
    longer than ``max_length`` gets a pack of its own. Deterministic for the same lengths.

    ``keep_order`` (for ``shuffle: false``): consecutive rows fill a pack until the next one does
    not fit, so the packs hold the rows in the dataset's order (more packs, each less full).
    """
    if keep_order:
        return _pack_in_order(lengths, max_length=max_length)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    room = [-1] * (2 * size)  # leaves: free room of pack k (-1: not opened yet); inner: max of children
    packs: list[list[int]] = []
    for index in order:
        need = lengths[index]
        if packs and room[1] >= need:
            node = 1
            while node < size:  # leftmost leaf with enough room
                node = 2 * node if room[2 * node] >= need else 2 * node + 1
            pack = node - size
        else:
            pack, node = len(packs), size + len(packs)
            packs.append([])
            room[node] = max_length
        packs[pack].append(index)
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return packs


def _pack_in_order(lengths: list[int], *, max_length: int) -> list[list[int]]:
    packs: list[list[int]] = []
    used = 0
    for index, length in enumerate(lengths):
        if packs and used + length <= max_length:
            packs[-1].append(index)
            used += length
        else:
            packs.append([index])
            used = length
    return packs


def collate_packed(packs: list[list[dict]], *, pad_id: int):
    """Right-pad a batch of packs (each a list of tokenized rows) to the longest pack.

    Returns ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 for every row) and
    ``segment_ids`` (1, 2, ... per row, 0 for the padding tail), plus token counts like ``collate``.
    Build the attention mask for a given model with ``packed_attention_mask``.
    """
    import torch

    width = max(sum(len(e["input_ids"]) for e in pack) for pack in packs)
    input_ids = torch.full((len(packs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(packs), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(packs), width), dtype=torch.long)
    segment_ids = torch.zeros((len(packs), width), dtype=torch.long)
    real = 0
    for row, pack in enumerate(packs):
        start = 0
        for segment, example in enumerate(pack, start=1):
            n = len(example["input_ids"])
            end = start + n
            input_ids[row, start:end] = torch.tensor(example["input_ids"], dtype=torch.long)
            labels[row, start:end] = torch.tensor(example["labels"], dtype=torch.long)
            labels[row, start] = IGNORE_INDEX  # the row's first token is predicted by nothing of its own
            position_ids[row, start:end] = torch.arange(n)
            segment_ids[row, start:end] = segment
            start = end
        real += start
        position_ids[row, start:] = torch.arange(width - start)  # the padding tail: a segment of its own
    label_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "real_tokens": real,
        "label_tokens": label_tokens,
        "total_tokens": input_ids.numel(),
    }


def packed_attention_mask(segment_ids, *, dtype=None):
    """The 4D ``[batch, 1, seq, seq]`` block-diagonal causal mask for ``segment_ids``.

    Boolean (True = may attend) when ``dtype`` is None or torch.bool, as SDPA takes it; otherwise
    additive in ``dtype`` (0 or the dtype's minimum), as eager attention adds it to the scores.
    transformers passes a 4D mask through to the attention function unchanged. Padding positions
    form a segment of their own, so no query row is fully masked (which would give NaN).
    """
    import torch

    width = segment_ids.shape[-1]
    causal = torch.ones((width, width), dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, None, :, None] == segment_ids[:, None, None, :]) & causal
    if dtype is None or dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)
