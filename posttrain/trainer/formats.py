"""Turn dataset rows, in the layouts Llama Stack users already have, into chats and token ids.

Rows arrive as whatever the user registered: instruct rows (``chat_completion_input`` +
``expected_answer``, ``input_query``/``expected_answer``, ``prompt``/``completion``,
``input``/``output``, ``question``/``answer``) or dialog rows (``messages``, or ``dialog`` as a JSON
string). We accept every layout under either ``data_format`` (the format only sets which layouts
are tried first) and fail, naming the row and the columns we expected, only when nothing fits:
a user can then fix the dataset rather than guess.
"""

from __future__ import annotations

import json
from typing import Any

IGNORE_INDEX = -100

INSTRUCT_PAIRS = (
    ("chat_completion_input", "expected_answer"),
    ("input_query", "expected_answer"),
    ("prompt", "completion"),
    ("input", "output"),
    ("question", "answer"),
)
DIALOG_COLUMNS = ("messages", "dialog")
EXPECTED_SFT = " | ".join([*DIALOG_COLUMNS, *(f"{a}+{b}" for a, b in INSTRUCT_PAIRS)])
EXPECTED_PREFERENCE = "prompt+chosen+rejected (or chosen+rejected as message lists)"


class RowFormatError(ValueError):
    """A dataset row fits none of the layouts we know."""

    def __init__(self, message: str, *, row_index: int) -> None:
        self.row_index = row_index
        super().__init__(f"row {row_index}: {message}")


def _present(row: dict, key: str) -> bool:
    return key in row and row[key] is not None


def _text(value: Any, *, row_index: int, column: str) -> str:
    """Content as text: a string, a Llama Stack content item, or a list of them."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return value["text"]
    if isinstance(value, list) and all(isinstance(item, (str, dict)) for item in value):
        return "".join(_text(item, row_index=row_index, column=column) for item in value)
    raise RowFormatError(f"column {column!r} holds {type(value).__name__}, expected text", row_index=row_index)


def _messages(value: Any, *, row_index: int, column: str) -> list[dict]:
    """A list of {role, content} from a list, or from a JSON string holding one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowFormatError(f"column {column!r} is not valid JSON ({exc.msg})", row_index=row_index) from exc
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RowFormatError(f"column {column!r} must be a non-empty list of messages", row_index=row_index)
    chat = []
    for message in value:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowFormatError(
                f"column {column!r} must hold messages with 'role' and 'content'", row_index=row_index
            )
        chat.append({"role": str(message["role"]), "content": _text(message["content"], row_index=row_index, column=column)})
    return chat


def _instruct_chat(row: dict, *, prompt_col: str, answer_col: str, row_index: int) -> list[dict]:
    answer = {"role": "assistant", "content": _text(row[answer_col], row_index=row_index, column=answer_col)}
    if prompt_col == "chat_completion_input":
        value = row[prompt_col]
        try:
            prompt = _messages(value, row_index=row_index, column=prompt_col)
        except RowFormatError:
            if not isinstance(value, str):
                raise
            prompt = [{"role": "user", "content": value}]  # a bare question, not JSON: be lenient
    else:
        prompt = [{"role": "user", "content": _text(row[prompt_col], row_index=row_index, column=prompt_col)}]
    return [*prompt, answer]


def normalize_sft_row(row: dict, *, data_format: str, row_index: int) -> list[dict]:
    """Return the row as a chat (list of {role, content}) ending in at least one assistant turn."""
    if not isinstance(row, dict):
        raise RowFormatError(f"expected a JSON object with columns {EXPECTED_SFT}", row_index=row_index)
    dialog_first = data_format == "dialog"
    chat = None
    for attempt in ("dialog", "instruct") if dialog_first else ("instruct", "dialog"):
        if attempt == "dialog":
            column = next((c for c in DIALOG_COLUMNS if _present(row, c)), None)
            if column is not None:
                chat = _messages(row[column], row_index=row_index, column=column)
        else:
            pair = next(((p, a) for p, a in INSTRUCT_PAIRS if _present(row, p) and _present(row, a)), None)
            if pair is not None:
                chat = _instruct_chat(row, prompt_col=pair[0], answer_col=pair[1], row_index=row_index)
        if chat is not None:
            break
    if chat is None:
        raise RowFormatError(
            f"no known layout fits; expected columns {EXPECTED_SFT}; found {sorted(row)}", row_index=row_index
        )
    if not any(m["role"] == "assistant" for m in chat):
        raise RowFormatError("the conversation has no assistant message to learn from", row_index=row_index)
    return chat


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _template_segments(tokenizer, chat: list[dict]) -> list[tuple[str, bool]] | None:
    """Split the rendered chat into (text, is_assistant) pieces by rendering prefixes.

    An assistant span runs from the end of the prompt rendered with the generation header to the
    end of the chat rendered through that turn (so it includes the turn's end token). Returns None
    when a template does not render prefixes as prefixes of the whole (then we use the fallback).
    """
    full = _render(tokenizer, chat, add_generation_prompt=False)
    cuts: list[tuple[int, int]] = []
    for i, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, chat[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, chat[: i + 1], add_generation_prompt=False)
        if not full.startswith(prompt) or not full.startswith(through) or len(through) < len(prompt):
            return None
        cuts.append((len(prompt), len(through)))
    segments, position = [], 0
    for start, end in cuts:
        if start < position:
            return None
        segments += [(full[position:start], False), (full[start:end], True)]
        position = end
    segments.append((full[position:], False))
    return [(text, flag) for text, flag in segments if text]


def _plain_segments(tokenizer, chat: list[dict]) -> list[tuple[str, bool]]:
    """'role: content' lines, eos after each assistant turn, for tokenizers without a template."""
    eos = tokenizer.eos_token or ""
    segments: list[tuple[str, bool]] = [(tokenizer.bos_token, False)] if tokenizer.bos_token else []
    for message in chat:
        if message["role"] == "assistant":
            segments += [("assistant: ", False), (f"{message['content']}{eos}\n", True)]
        else:
            segments.append((f"{message['role']}: {message['content']}\n", False))
    return segments


def chat_segments(tokenizer, chat: list[dict]) -> list[tuple[str, bool]]:
    """The chat as text pieces, each flagged True when it is assistant output to learn."""
    if getattr(tokenizer, "chat_template", None):
        segments = _template_segments(tokenizer, chat)
        if segments is not None:
            return segments
    return _plain_segments(tokenizer, chat)


def tokenize_sft_row(
    row: dict, *, tokenizer, data_format: str, train_on_input: bool, max_length: int | None, row_index: int
) -> dict:
    """Return ``{"input_ids", "labels"}``; labels are -100 outside assistant turns unless train_on_input.

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


def normalize_preference_row(row: dict, *, row_index: int) -> tuple[list[dict], str, str]:
    """Return ``(prompt_messages, chosen_text, rejected_text)`` for a DPO row.

    ``prompt`` may be a string or messages; ``chosen``/``rejected`` a string, messages (the last
    assistant message is the answer) or, with no ``prompt``, whole conversations whose leading
    messages are the prompt (TRL's implicit-prompt layout).
    """
    if not isinstance(row, dict) or not (_present(row, "chosen") and _present(row, "rejected")):
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise RowFormatError(f"expected columns {EXPECTED_PREFERENCE}; found {found}", row_index=row_index)

    def answer(column: str) -> tuple[list[dict], str]:
        value = row[column]
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                return [], value
            if not isinstance(parsed, list):
                return [], value
            value = parsed
        if isinstance(value, (list, dict)):
            messages = _messages(value, row_index=row_index, column=column)
            return messages[:-1], messages[-1]["content"]
        return [], _text(value, row_index=row_index, column=column)

    implicit_prompt, chosen = answer("chosen")
    _, rejected = answer("rejected")
    if _present(row, "prompt"):
        value = row["prompt"]
        if isinstance(value, (list, dict)):
            prompt = _messages(value, row_index=row_index, column="prompt")
        else:
            prompt = [{"role": "user", "content": _text(value, row_index=row_index, column="prompt")}]
    elif implicit_prompt:
        prompt = implicit_prompt
    else:
        raise RowFormatError(f"no prompt found; expected columns {EXPECTED_PREFERENCE}", row_index=row_index)
    return prompt, chosen, rejected
