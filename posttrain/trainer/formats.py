"""Turn dataset rows into token ids, with labels that cover exactly the assistant's answers.

Which columns a row may have, and how each layout becomes a chat, is ``posttrain.domain.rows``
(the server checks rows against the same layouts when they are registered); this module adds what
needs a tokenizer. Its names are re-exported here so the trainer reads rows from one place.
"""

from __future__ import annotations

from posttrain.domain.rows import (  # the layouts live in domain, where the server checks rows too
    DIALOG_COLUMNS,
    EXPECTED_PREFERENCE,
    EXPECTED_SFT,
    INSTRUCT_PAIRS,
    RowFormatError,
    normalize_preference_row,
    normalize_sft_row,
    trained,
)

__all__ = [
    "DIALOG_COLUMNS", "EXPECTED_PREFERENCE", "EXPECTED_SFT", "IGNORE_INDEX", "INSTRUCT_PAIRS", "RowFormatError",
    "chat_segments", "normalize_preference_row", "normalize_sft_row", "tokenize_sft_row",
]  # fmt: skip

IGNORE_INDEX = -100


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]  # no "weight" for the template
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)


def _template_segments(tokenizer, chat: list[dict]) -> list[tuple[str, bool]] | None:
    """Split the rendered chat into (text, is_assistant) pieces by rendering prefixes; an assistant
    turn weighted 0 is flagged False (context, not learned).

    An assistant span runs from the end of the prompt rendered with the generation header to the
    end of the chat rendered through that turn (so it includes the turn's end token). Returns None
    when a template does not render prefixes as prefixes of the whole (then we use the fallback).
    """
    full = _render(tokenizer, chat, add_generation_prompt=False)
    cuts: list[tuple[int, int, bool]] = []
    for i, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, chat[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, chat[: i + 1], add_generation_prompt=False)
        if not full.startswith(prompt) or not full.startswith(through) or len(through) < len(prompt):
            return None
        cuts.append((len(prompt), len(through), trained(message)))
    segments, position = [], 0
    for start, end, learned in cuts:
        if start < position:
            return None
        segments += [(full[position:start], False), (full[start:end], learned)]
        position = end
    segments.append((full[position:], False))
    return [(text, flag) for text, flag in segments if text]


def _plain_segments(tokenizer, chat: list[dict]) -> list[tuple[str, bool]]:
    """'role: content' lines, eos after each assistant turn, for tokenizers without a template."""
    eos = tokenizer.eos_token or ""
    segments: list[tuple[str, bool]] = [(tokenizer.bos_token, False)] if tokenizer.bos_token else []
    for message in chat:
        if message["role"] == "assistant":
            segments += [("assistant: ", False), (f"{message['content']}{eos}\n", trained(message))]
        else:
            segments.append((f"{message['role']}: {message['content']}\n", False))
    return segments


def chat_segments(tokenizer, chat: list[dict]) -> list[tuple[str, bool]]:
    """The chat as text pieces, each flagged True when it is assistant output to learn (an
    assistant turn with ``weight`` 0 is not)."""
    if getattr(tokenizer, "chat_template", None):
        segments = _template_segments(tokenizer, chat)
        if segments is not None:
            return segments
    return _plain_segments(tokenizer, chat)


def tokenize_sft_row(
    row: dict, *, tokenizer, data_format: str, train_on_input: bool, max_length: int | None, row_index: int
) -> dict:
    """Return ``{"input_ids", "labels"}``; labels are -100 outside the assistant turns to learn (those
    not weighted 0) unless train_on_input, which labels every token.

    Each piece is tokenized on its own, as at inference time, where the prompt is encoded before
    the answer exists; so the label span is exactly the answer's tokens.
    """
    chat = normalize_sft_row(row, data_format=data_format, row_index=row_index)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_assistant in chat_segments(tokenizer, chat):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if (is_assistant or train_on_input) else [IGNORE_INDEX] * len(ids)
    if max_length and len(input_ids) > max_length:
        # Truncation keeps the start; if that leaves no answer token to learn from, the row is
        # useless (and would make a step with nothing to average): say so instead.
        if all(label == IGNORE_INDEX for label in labels[:max_length]):
            raise RowFormatError(
                f"{len(input_ids)} tokens, and the answer starts after the first {max_length} "
                "(the most this model takes); shorten the prompt",
                row_index=row_index,
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if not any(label != IGNORE_INDEX for label in labels):
        raise RowFormatError("the answer is empty; there is nothing to learn from this row",
                             row_index=row_index)
    return {"input_ids": input_ids, "labels": labels}
