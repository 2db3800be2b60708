"""The dataset row layouts this server knows: their one home, used by the server and the trainer.

Rows arrive as whatever the user registered: instruct rows (``chat_completion_input`` +
``expected_answer``, ``input_query``/``expected_answer``, ``prompt``/``completion``,
``input``/``output``, ``question``/``answer``), dialog rows (``messages``, or ``dialog`` as a JSON
string; an assistant message may carry OpenAI's ``weight``, 0 or 1, where 0 means "context, not
trained on") or preference rows (``prompt``/``chosen``/``rejected``). Every supervised layout is
accepted under either ``data_format`` (the format only sets which layouts are tried first).

The server refuses, at registration and append, a row that fits none of them
(``require_known_layouts``), so a user fixes the dataset instead of watching a job fail; the
trainer checks again with ``normalize_sft_row`` / ``normalize_preference_row``, which also refuse a
row that fits a layout but holds nothing to learn (a conversation with no assistant turn: Llama
Stack's ``eval/messages-answer`` rows look like that and must still register).
Pure functions on JSON values: no tokenizer, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

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
EXPECTED_ANY = f"{EXPECTED_SFT} (supervised) or {EXPECTED_PREFERENCE} (preference)"
_SHOWN_COLUMNS = 10  # a refusal names at most this many of a row's columns


class RowFormatError(ValueError):
    """A dataset row fits none of the layouts we know."""

    def __init__(self, message: str, *, row_index: int) -> None:
        self.row_index = row_index
        self.reason = message
        super().__init__(f"row {row_index}: {message}")


def _present(row: dict[str, Any], key: str) -> bool:
    return key in row and row[key] is not None


def _text(value: Any, *, row_index: int, column: str) -> str:
    """Content as text: a string, a Llama Stack content item, or a list of them."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    if isinstance(value, dict) and isinstance(text := value.get("text"), str):
        return text
    if isinstance(value, list) and all(isinstance(item, (str, dict)) for item in value):
        return "".join(_text(item, row_index=row_index, column=column) for item in value)
    raise RowFormatError(f"column {column!r} holds {type(value).__name__}, expected text", row_index=row_index)


def _messages(value: Any, *, row_index: int, column: str) -> list[dict[str, Any]]:
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
        content = _text(message["content"], row_index=row_index, column=column)
        turn: dict[str, Any] = {"role": str(message["role"]), "content": content}
        if "weight" in message:
            turn["weight"] = _weight(message, row_index=row_index, column=column)
        chat.append(turn)
    return chat


def _weight(message: dict[str, Any], *, row_index: int, column: str) -> int:
    """An assistant message's ``weight``: 1 (train on it, the default) or 0 (context only)."""
    weight = message["weight"]
    if message["role"] != "assistant" or isinstance(weight, bool) or weight not in (0, 1):
        raise RowFormatError(f"column {column!r}: 'weight' must be 0 or 1, and only on assistant messages",
                             row_index=row_index)
    return int(weight)


def trained(message: dict[str, Any]) -> bool:
    """Whether a chat message is one the model learns to say: an assistant turn not weighted 0."""
    return bool(message["role"] == "assistant" and message.get("weight", 1) != 0)


def _instruct_chat(row: dict[str, Any], *, prompt_col: str, answer_col: str, row_index: int) -> list[dict[str, Any]]:
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


def _sft_chat(row: dict[str, Any], *, data_format: str, row_index: int) -> list[dict[str, Any]]:
    """The row as a chat in the first supervised layout that fits (no check that it teaches anything)."""
    dialog_first = data_format == "dialog"
    for attempt in ("dialog", "instruct") if dialog_first else ("instruct", "dialog"):
        if attempt == "dialog":
            column = next((c for c in DIALOG_COLUMNS if _present(row, c)), None)
            if column is not None:
                return _messages(row[column], row_index=row_index, column=column)
        else:
            pair = next(((p, a) for p, a in INSTRUCT_PAIRS if _present(row, p) and _present(row, a)), None)
            if pair is not None:
                return _instruct_chat(row, prompt_col=pair[0], answer_col=pair[1], row_index=row_index)
    raise RowFormatError(
        f"no known layout fits; expected columns {EXPECTED_SFT}; found {sorted(row)}", row_index=row_index
    )


def normalize_sft_row(row: Any, *, data_format: str, row_index: int) -> list[dict[str, Any]]:
    """Return the row as a chat (list of {role, content}, and ``weight`` on an assistant message that
    had one: 0 keeps the turn as context but not as something to learn) with at least one assistant
    turn to learn from."""
    if not isinstance(row, dict):
        raise RowFormatError(f"expected a JSON object with columns {EXPECTED_SFT}", row_index=row_index)
    chat = _sft_chat(row, data_format=data_format, row_index=row_index)
    if not any(m["role"] == "assistant" for m in chat):
        raise RowFormatError("the conversation has no assistant message to learn from", row_index=row_index)
    if not any(trained(m) for m in chat):
        raise RowFormatError("every assistant message has weight 0: there is nothing to learn from",
                             row_index=row_index)
    return chat


def normalize_preference_row(row: Any, *, row_index: int) -> tuple[list[dict[str, Any]], str, str]:
    """Return ``(prompt_messages, chosen_text, rejected_text)`` for a DPO row.

    ``prompt`` may be a string or messages; ``chosen``/``rejected`` a string, messages (the last
    assistant message is the answer) or, with no ``prompt``, whole conversations whose leading
    messages are the prompt (TRL's implicit-prompt layout).
    """
    if not isinstance(row, dict) or not (_present(row, "chosen") and _present(row, "rejected")):
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise RowFormatError(f"expected columns {EXPECTED_PREFERENCE}; found {found}", row_index=row_index)

    def answer(column: str) -> tuple[list[dict[str, Any]], str]:
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


def _shown_columns(row: dict[str, Any]) -> str:
    names = sorted(str(name) for name in row)
    shown = ", ".join(repr(name if len(name) <= 40 else name[:40] + "…") for name in names[:_SHOWN_COLUMNS])
    more = f", … ({len(names) - _SHOWN_COLUMNS} more)" if len(names) > _SHOWN_COLUMNS else ""
    return f"[{shown}{more}]"


def _sft_fits(row: dict[str, Any], row_index: int) -> str | None:
    """None when some supervised layout fits under either data_format, else why the first try failed."""
    try:
        _sft_chat(row, data_format="instruct", row_index=row_index)
        return None
    except RowFormatError as first:
        try:
            _sft_chat(row, data_format="dialog", row_index=row_index)
            return None
        except RowFormatError:
            return first.reason


def _fits_plainly(row: dict[str, Any]) -> bool:
    """True when the row is one of the plain, common shapes that certainly parse (all text, no JSON
    inside a string): checked by looking, so a large dataset of them costs a few lookups a row.

    False means only "look closer": each test mirrors which columns the parsers above pick first.
    """
    get = row.get
    for prompt_col, answer_col in INSTRUCT_PAIRS:
        question, answer = get(prompt_col), get(answer_col)
        if question is not None and answer is not None:
            if isinstance(question, str) and isinstance(answer, str):
                return True  # even chat_completion_input: a string that is not messages is the question
            break
    for column in DIALOG_COLUMNS:
        chat = get(column)
        if chat is not None:
            if isinstance(chat, list) and chat and all(
                isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) and "weight" not in m
                for m in chat
            ):
                return True
            break
    chosen, rejected, prompt = get("chosen"), get("rejected"), get("prompt")
    # A string answer is read as JSON only when it holds a list, which must start with "[".
    return (
        isinstance(prompt, str)
        and isinstance(chosen, str)
        and isinstance(rejected, str)
        and not chosen.lstrip().startswith("[")
        and not rejected.lstrip().startswith("[")
    )


def layout_problem(row: Any, *, row_index: int) -> str | None:
    """Why ``row`` fits no known layout, or None when one fits.

    Plain rows are recognised by looking (``_fits_plainly``); any other row is parsed as the trainer
    parses it, choosing by its columns which layout to try first, so a well-formed row raises
    nothing. The trainer's own further checks (an assistant turn to learn, token limits) are left to it.
    """
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not a JSON object"
    if _fits_plainly(row):
        return None
    preference = _present(row, "chosen") and _present(row, "rejected")
    supervised = any(_present(row, c) for c in DIALOG_COLUMNS) or any(
        _present(row, p) and _present(row, a) for p, a in INSTRUCT_PAIRS
    )
    if not preference and not supervised:
        return f"no known layout fits the columns {_shown_columns(row)}"
    reason = None
    if preference:
        try:
            normalize_preference_row(row, row_index=row_index)
            return None
        except RowFormatError as exc:
            reason = exc.reason
    if supervised:
        problem = _sft_fits(row, row_index)
        if problem is None:
            return None
        reason = reason or problem
    return reason


def require_known_layouts(rows: Iterable[Any]) -> None:
    """Raise ``RowFormatError`` for the first row that fits no supervised or preference layout.

    The message names the row (0-based, as the trainer's do, counted in ``rows`` as given) and
    every layout, so the user knows what to change.
    """
    for index, row in enumerate(rows):
        problem = layout_problem(row, row_index=index)
        if problem is not None:
            raise RowFormatError(f"{problem}; expected one of: {EXPECTED_ANY}", row_index=index)


#: What a reinforcement (GRPO) job's rows hold, for refusals.
EXPECTED_PROMPT = ('{"messages": [...], <reference fields>}, the last message not the assistant\'s (the model '
                   "writes that answer, the grader scores it)")


def normalize_prompt_row(row: Any, *, row_index: int) -> list[dict[str, str]]:
    """The chat a reinforcement job's row asks the model to continue: its ``messages`` (each with a
    string role and content), the last not the assistant's. The row's other fields are the
    reference fields a grader reads (``{{item.<field>}}``) and are not looked at here.

    A dialog row that ends with the answer fits the supervised layouts (``require_known_layouts``
    lets it register) but is no prompt: a GRPO job refuses it at submit, naming the row."""
    if not isinstance(row, dict):
        raise RowFormatError(f"is a {type(row).__name__}, not a JSON object", row_index=row_index)
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RowFormatError(f"needs a non-empty 'messages' list; expected {EXPECTED_PROMPT}", row_index=row_index)
    chat = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise RowFormatError("each message needs a string 'role' and 'content'", row_index=row_index)
        chat.append({"role": message["role"], "content": message["content"]})
    if chat[-1]["role"] == "assistant":
        raise RowFormatError(f"the last message is the assistant's; expected {EXPECTED_PROMPT}", row_index=row_index)
    return chat
