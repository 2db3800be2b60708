"""OpenAI fine-tuning files (JSON lines) checked and turned into the rows our trainer reads.

OpenAI's fine-tuning API takes a JSONL file whose layout depends on the method: supervised lines
are ``{"messages": [...]}`` chats, DPO lines are ``{"input": {"messages": [...]}, "preferred_output":
[...], "non_preferred_output": [...]}``. ``check_fine_tuning_lines`` checks a whole file the way
OpenAI's validator does (the first broken line fails the file, naming the line and what is wrong)
and returns the rows in the layouts of ``domain.rows``, so the trainer needs nothing new:

- supervised: ``{"messages": [{"role", "content"[, "weight": 0]}]}`` (a dialog row). An assistant
  message with ``"weight": 0`` is kept in the text but not trained on (its tokens get no label).
- dpo: ``{"prompt": [{"role", "content"}], "chosen": str, "rejected": str}`` (a preference row).
- reinforcement: ``{"messages": [{"role", "content"}], <reference fields>}`` as OpenAI's reinforcement
  lines are: the chat the model answers (its last message the user's or developer's: the model
  writes the answer, so none is given) and any further top-level fields the grader reads as
  ``{{item.<field>}}`` (kept as they are). The GRPO trainer reads these rows directly.

Choices, and why:

- **Tool and function calling is refused** (``tools``, ``functions``, ``parallel_tool_calls``,
  ``tool_calls``, ``function_call``, ``tool``/``function`` messages), code ``unsupported_feature``:
  the trainer's chat formatting renders role and text only, so a tool call would silently become
  something else than what the user asked to teach. Refused with a reason, never half-trained.
- **A closed layout**: a key this format does not define (at the top level or in a message) is
  refused (``unrecognized_key``), so a typo (``"mesages"``, ``"wieght"``) does not train on less
  than the user thinks.
- ``name`` on a message is accepted and dropped (the chat text has no place for it).
- Image or audio content parts are refused (``unsupported_feature``): text models only.
- **At least ``min_examples`` examples, default 1.** OpenAI asks for 10, a rule about what is worth
  training rather than about the file; the caller may pass ``min_examples=10`` to insist.
- Blank lines (a trailing newline) are skipped but counted, so line numbers match an editor's.
  A file-wide problem (no examples) is reported on line 0.

Pure functions: no tokenizer, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Literal

#: The fewest examples a file may hold (see the module docstring for why not OpenAI's 10).
MIN_EXAMPLES = 1

ROLES = ("system", "user", "assistant", "tool", "function", "developer")
_TEXT_ROLES = frozenset({"system", "user", "assistant", "developer"})
_SFT_KEYS = frozenset({"messages", "tools", "functions", "parallel_tool_calls"})
_DPO_KEYS = frozenset({"input", "preferred_output", "non_preferred_output"})
_DPO_INPUT_KEYS = frozenset({"messages", "tools", "functions", "parallel_tool_calls"})
_MESSAGE_KEYS = frozenset({"role", "content", "name", "weight", "tool_calls", "function_call", "tool_call_id",
                           "refusal"})
_TOOL_KEYS = ("tools", "functions", "parallel_tool_calls")


class FineTuningFileInvalid(ValueError):
    """A fine-tuning file OpenAI's validator would refuse: which line (1-based; 0 for the file as a
    whole), which parameter (a JSON path in the line such as ``messages[2].weight``, or None), a
    stable ``code`` and a message that begins with the line."""

    def __init__(self, line_number: int, param: str | None, code: str, message: str) -> None:
        self.line_number = line_number
        self.param = param
        self.code = code
        self.message = message
        super().__init__(message)


class _Bad(Exception):
    """A problem inside one line, before its line number is attached."""

    def __init__(self, param: str | None, code: str, message: str) -> None:
        self.param, self.code, self.message = param, code, message
        super().__init__(message)


def _unsupported(param: str, what: str) -> _Bad:
    return _Bad(param, "unsupported_feature",
                f"{what} are not supported here: the trainer renders each message's role and text only")


def _content(value: Any, *, param: str, allow_empty: bool) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list):
        pieces = []
        for index, part in enumerate(value):
            where = f"{param}[{index}]"
            if not isinstance(part, dict):
                raise _Bad(where, "invalid_content", f"'{where}' must be an object with 'type' and 'text'")
            if part.get("type") != "text":
                if isinstance(part.get("type"), str):
                    raise _unsupported(where, f"content parts of type {str(part['type'])[:40]!r}")
                raise _Bad(where, "invalid_content", f"'{where}.type' must be 'text'")
            if not isinstance(part.get("text"), str):
                raise _Bad(f"{where}.text", "invalid_content", f"'{where}.text' must be a string")
            pieces.append(part["text"])
        text = "".join(pieces)
    else:
        raise _Bad(param, "invalid_content", f"'{param}' must be a string or a list of text parts")
    if not allow_empty and not text:
        raise _Bad(param, "missing_content", f"'{param}' is empty")
    return text


def _message(value: Any, *, param: str, weighted: bool) -> dict[str, Any]:
    """One message as ``{"role", "content"[, "weight": 0]}``; ``weighted``: may carry ``weight``."""
    if not isinstance(value, dict):
        raise _Bad(param, "invalid_message", f"'{param}' must be an object")
    unknown = sorted(str(key) for key in value if key not in _MESSAGE_KEYS)
    if unknown:
        raise _Bad(f"{param}.{unknown[0]}", "unrecognized_key", f"'{param}' has an unrecognized key {unknown[0]!r}")
    if "role" not in value:
        raise _Bad(f"{param}.role", "missing_role", f"'{param}' has no 'role'")
    role = value["role"]
    if not isinstance(role, str) or role not in ROLES:
        raise _Bad(f"{param}.role", "invalid_role",
                   f"'{param}.role' must be one of {', '.join(ROLES)}; got {str(role)[:40]!r}")
    if role not in _TEXT_ROLES:
        raise _unsupported(f"{param}.role", f"{role!r} messages (tool and function results)")
    for key in ("tool_calls", "function_call"):
        if value.get(key) is not None:
            raise _unsupported(f"{param}.{key}", "tool and function calls")
    if "content" not in value or value["content"] is None:
        raise _Bad(f"{param}.content", "missing_content", f"'{param}' has no 'content'")
    if "name" in value and not isinstance(value["name"], str):
        raise _Bad(f"{param}.name", "invalid_name", f"'{param}.name' must be a string")
    message: dict[str, Any] = {
        "role": "system" if role == "developer" else role,
        "content": _content(value["content"], param=f"{param}.content", allow_empty=role != "assistant"),
    }
    if "weight" in value:
        weight = value["weight"]
        if not weighted or role != "assistant":
            raise _Bad(f"{param}.weight", "invalid_weight", f"'{param}.weight' is only allowed on assistant messages"
                       + ("" if weighted else " of supervised examples"))
        if isinstance(weight, bool) or weight not in (0, 1):
            raise _Bad(f"{param}.weight", "invalid_weight", f"'{param}.weight' must be 0 or 1")
        if weight == 0:
            message["weight"] = 0
    return message


def _messages(value: Any, *, param: str, weighted: bool) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _Bad(param, "invalid_messages", f"'{param}' must be a list")
    if not value:
        raise _Bad(param, "empty_messages", f"'{param}' must not be empty")
    return [_message(item, param=f"{param}[{index}]", weighted=weighted) for index, item in enumerate(value)]


def _closed(example: dict[str, Any], allowed: frozenset[str], *, prefix: str = "") -> None:
    unknown = sorted(str(key) for key in example if key not in allowed)
    if unknown:
        raise _Bad(prefix + unknown[0], "unrecognized_key",
                   f"unrecognized key {prefix + unknown[0]!r}; expected {', '.join(sorted(allowed))}")
    for key in _TOOL_KEYS:
        if example.get(key) is not None:
            raise _unsupported(prefix + key, "tools and functions")


def _supervised(example: dict[str, Any]) -> dict[str, Any]:
    if "messages" not in example:  # before the unknown keys: a line of another format lacks this first
        raise _Bad("messages", "missing_messages", "'messages' is missing")
    _closed(example, _SFT_KEYS)
    messages = _messages(example["messages"], param="messages", weighted=True)
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        raise _Bad("messages", "missing_assistant_message", "'messages' has no assistant message to learn from")
    if all(m.get("weight") == 0 for m in answers):
        raise _Bad("messages", "all_weights_zero",
                   "every assistant message has weight 0: there is nothing to learn from this example")
    return {"messages": messages}


def _answer(example: dict[str, Any], key: str) -> str:
    """The one assistant message of ``preferred_output``/``non_preferred_output``, as text."""
    if key not in example:
        raise _Bad(key, "missing_output", f"'{key}' is missing")
    value = example[key]
    if not isinstance(value, list) or len(value) != 1:
        raise _Bad(key, "invalid_output", f"'{key}' must be a list holding exactly one assistant message")
    message = _message(value[0], param=f"{key}[0]", weighted=False)
    if message["role"] != "assistant":
        raise _Bad(f"{key}[0].role", "invalid_output", f"'{key}[0].role' must be 'assistant'")
    return str(message["content"])


def _preference(example: dict[str, Any]) -> dict[str, Any]:
    if "input" not in example:  # before the unknown keys, as for supervised lines
        raise _Bad("input", "missing_input", "'input' is missing")
    _closed(example, _DPO_KEYS)
    prompt_input = example["input"]
    if not isinstance(prompt_input, dict):
        raise _Bad("input", "invalid_input", "'input' must be an object with 'messages'")
    _closed(prompt_input, _DPO_INPUT_KEYS, prefix="input.")
    if "messages" not in prompt_input:
        raise _Bad("input.messages", "missing_messages", "'input.messages' is missing")
    prompt = _messages(prompt_input["messages"], param="input.messages", weighted=False)
    chosen = _answer(example, "preferred_output")
    rejected = _answer(example, "non_preferred_output")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _reinforcement(example: dict[str, Any]) -> dict[str, Any]:
    if "messages" not in example:
        raise _Bad("messages", "missing_messages", "'messages' is missing")
    for key in _TOOL_KEYS:
        if example.get(key) is not None:
            raise _unsupported(key, "tools and functions")
    last_role = example["messages"][-1].get("role") if isinstance(example["messages"], list) and \
        example["messages"] and isinstance(example["messages"][-1], dict) else None
    messages = _messages(example["messages"], param="messages", weighted=False)
    if last_role not in ("user", "developer"):
        raise _Bad(f"messages[{len(messages) - 1}].role", "invalid_last_message",
                   "the last message must be the user's (or developer's): the model writes the answer, which "
                   "the grader scores; put the reference answer in a field of its own")
    return {**{k: v for k, v in example.items() if k not in _TOOL_KEYS}, "messages": messages}


Method = Literal["supervised", "dpo", "reinforcement"]
_CONVERTERS = {"supervised": _supervised, "dpo": _preference, "reinforcement": _reinforcement}


def check_fine_tuning_lines(lines: Iterable[str], method: Method, *,
                            min_examples: int = MIN_EXAMPLES) -> list[dict[str, Any]]:
    """The examples of an OpenAI fine-tuning JSONL file as our trainer's rows, in file order.

    ``lines`` are the file's lines (with or without their newlines). Supervised rows come back as
    ``{"messages": [{"role", "content"[, "weight": 0]}]}``, DPO rows as ``{"prompt": [messages],
    "chosen": str, "rejected": str}``, reinforcement rows as ``{"messages": [...], <fields>}``.
    Raises ``FineTuningFileInvalid`` for the first broken line
    (and for a file with fewer than ``min_examples`` examples, on line 0); never another exception.
    """
    if method not in _CONVERTERS:
        raise ValueError(f"unknown fine-tuning method {method!r}")
    convert = _CONVERTERS[method]
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            try:
                example = json.loads(line)
            except ValueError as exc:  # JSONDecodeError, or a number too long to convert
                raise _Bad(None, "invalid_json", f"not valid JSON ({getattr(exc, 'msg', exc)})") from None
            except RecursionError:
                raise _Bad(None, "invalid_json", "not valid JSON (nested too deeply)") from None
            if not isinstance(example, dict):
                raise _Bad(None, "invalid_file_format", f"must be a JSON object, not a {_json_type(example)}")
            rows.append(convert(example))
        except _Bad as bad:
            raise FineTuningFileInvalid(number, bad.param, bad.code, f"Line {number}: {bad.message}") from None
    if len(rows) < min_examples:
        found = "no examples" if not rows else f"{len(rows)} example{'s' if len(rows) != 1 else ''}"
        raise FineTuningFileInvalid(0, None, "invalid_file_format" if not rows else "too_few_examples",
                                    f"the file holds {found}; at least {min_examples} required")
    return rows


def _json_type(value: Any) -> str:
    names = {list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


__all__ = ["MIN_EXAMPLES", "ROLES", "FineTuningFileInvalid", "check_fine_tuning_lines"]
