"""The one list of row layouts: every layout a user has passes the registration check, a row that
fits none is refused naming the row and the layouts, and the check is never stricter than the trainer."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.domain.rows import (
    EXPECTED_ANY,
    EXPECTED_PREFERENCE,
    EXPECTED_SFT,
    RowFormatError,
    layout_problem,
    normalize_preference_row,
    normalize_sft_row,
    require_known_layouts,
)

CHAT = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]

SUPERVISED = [
    {"chat_completion_input": json.dumps(CHAT[:1]), "expected_answer": "A."},
    {"chat_completion_input": CHAT[:1], "expected_answer": "A."},
    {"chat_completion_input": "Q?", "expected_answer": "A."},
    {"input_query": "Q?", "expected_answer": "A.", "generated_answer": "ignored"},
    {"prompt": "Q?", "completion": "A."},
    {"input": "Q?", "output": "A."},
    {"question": "Q?", "answer": 42},
    {"messages": CHAT},
    {"dialog": json.dumps(CHAT)},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Q?"}]},
                  {"role": "assistant", "content": {"type": "text", "text": "A."}}]},
    # Llama Stack's own eval/messages-answer rows: a layout, though only the user speaks.
    {"messages": [{"role": "user", "content": "What is the capital of France?"}], "answer": "Paris"},
    # llamastack/simpleqa and Llama Stack's test_dataset.csv: every cell a string.
    {"input_query": "Q?", "generated_answer": "", "expected_answer": "A.", "chat_completion_input": json.dumps(CHAT[:1])},
    # One layout's columns broken, another's whole: some layout fits.
    {"messages": "not json", "question": "Q?", "answer": "A."},
    {"input_query": "Q?", "expected_answer": None, "messages": CHAT},
]
PREFERENCE = [
    {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
    {"prompt": CHAT[:1], "chosen": CHAT[1:], "rejected": [{"role": "assistant", "content": "no"}]},
    {"chosen": CHAT, "rejected": [CHAT[0], {"role": "assistant", "content": "no"}]},
    {"chosen": json.dumps(CHAT), "rejected": json.dumps([CHAT[0], {"role": "assistant", "content": "no"}])},
]


@pytest.mark.parametrize("row", SUPERVISED + PREFERENCE)
def test_every_known_layout_is_accepted(row):
    assert layout_problem(row, row_index=0) is None
    require_known_layouts([row] * 3)


def test_no_rows_is_no_problem():
    require_known_layouts([])


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"text": "hello"}, "no known layout fits the columns ['text']"),
        ({"question": "only half"}, "no known layout fits the columns ['question']"),
        ({"instruction": "Say hi", "output": "hi"}, "no known layout fits the columns ['instruction', 'output']"),
        ({"prompt": "Q?", "chosen": "only one"}, "no known layout fits the columns ['chosen', 'prompt']"),
        ({"messages": None, "answer": "A."}, "no known layout fits the columns ['answer', 'messages']"),
        ({}, "no known layout fits the columns []"),
        ({"dialog": "[{not json"}, "column 'dialog' is not valid JSON"),
        ({"messages": [{"role": "user"}]}, "column 'messages' must hold messages with 'role' and 'content'"),
        ({"messages": []}, "column 'messages' must be a non-empty list of messages"),
        ({"input_query": "Q?", "expected_answer": {"no": "text"}}, "column 'expected_answer' holds dict, expected text"),
        ({"chosen": "x", "rejected": "y"}, "no prompt found"),
        (["a", "list"], "is a list, not a JSON object"),
    ],
)
def test_a_row_that_fits_nothing_is_refused_naming_it_and_the_layouts(row, reason):
    rows = [*SUPERVISED[:3], row, *PREFERENCE]
    with pytest.raises(RowFormatError) as info:
        require_known_layouts(rows)
    assert info.value.row_index == 3
    message = str(info.value)
    assert message.startswith(f"row 3: {reason}"), message
    assert message.endswith(f"; expected one of: {EXPECTED_SFT} (supervised) or {EXPECTED_PREFERENCE} (preference)")


def test_the_refusal_names_the_first_bad_row_exactly():
    with pytest.raises(RowFormatError) as info:
        require_known_layouts([{"prompt": "Q?", "completion": "A."}, {"text": "x"}, {"text": "y"}])
    assert str(info.value) == f"row 1: no known layout fits the columns ['text']; expected one of: {EXPECTED_ANY}"


def test_a_row_with_many_or_long_columns_gets_a_short_message():
    row = {f"column_{i:03d}" + "x" * 100: i for i in range(500)}
    with pytest.raises(RowFormatError) as info:
        require_known_layouts([row])
    message = str(info.value)
    assert "(490 more)" in message and len(message) < 1200, message


# -- never stricter than the trainer, and strict where it must be --------------------------------

_TEXT = st.one_of(st.text(max_size=5), st.sampled_from(["[", " [1]", "[]", "{}", "null", '"x"']), st.integers(),
                  st.none(), st.booleans())  # fmt: skip
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": _TEXT})
_VALUE = st.one_of(
    _TEXT,
    st.lists(_MESSAGE, max_size=3),
    st.lists(_MESSAGE, max_size=3).map(json.dumps),
    st.dictionaries(st.sampled_from(["role", "content", "text"]), _TEXT, max_size=2),
    st.lists(st.one_of(_TEXT, st.dictionaries(st.sampled_from(["role", "content"]), _TEXT)), max_size=2),
)
_COLUMNS = ["messages", "dialog", "chat_completion_input", "expected_answer", "input_query", "prompt", "completion",
            "input", "output", "question", "answer", "chosen", "rejected", "text"]  # fmt: skip
_ROW = st.dictionaries(st.sampled_from(_COLUMNS), _VALUE, max_size=4)


def _trainer_accepts(row: dict) -> bool:
    for attempt in (lambda: normalize_sft_row(row, data_format="instruct", row_index=0),
                    lambda: normalize_sft_row(row, data_format="dialog", row_index=0),
                    lambda: normalize_preference_row(row, row_index=0)):  # fmt: skip
        try:
            attempt()
            return True
        except RowFormatError:
            pass
    return False


def _only_lacks_an_assistant_turn(row: dict) -> bool:
    with_answer = dict(row)
    for column in ("messages", "dialog"):
        if column in row:
            try:
                messages = json.loads(row[column]) if isinstance(row[column], str) else row[column]
            except ValueError:
                continue
            messages = [messages] if isinstance(messages, dict) else messages  # one message alone
            if isinstance(messages, list):
                with_answer[column] = [*messages, {"role": "assistant", "content": "A."}]
    return _trainer_accepts(with_answer)


@settings(max_examples=400, deadline=None)
@given(_ROW)
def test_registration_refuses_only_what_the_trainer_refuses(row):
    problem = layout_problem(row, row_index=0)
    if _trainer_accepts(row):
        assert problem is None, (row, problem)
    elif problem is None:
        # The one row the trainer refuses yet registration keeps: a conversation with no assistant
        # turn (Llama Stack's eval rows), which is a layout, though nothing to learn from.
        assert _only_lacks_an_assistant_turn(row), row
