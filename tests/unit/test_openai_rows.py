"""OpenAI fine-tuning files: valid ones become our trainer's rows, each broken kind is refused
naming its line, and nothing else ever escapes (a property test over generated files)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain.domain.openai_rows import FineTuningFileInvalid, check_fine_tuning_lines
from posttrain.domain.rows import normalize_preference_row, normalize_sft_row

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"},
                     {"role": "assistant", "content": "A."}]}
PAIR = {"input": {"messages": [{"role": "user", "content": "Q?"}]},
        "preferred_output": [{"role": "assistant", "content": "Good."}],
        "non_preferred_output": [{"role": "assistant", "content": "Bad."}]}


def lines(*examples: Any) -> list[str]:
    return [e if isinstance(e, str) else json.dumps(e) for e in examples]


def refusal(examples: list[str], method: str = "supervised") -> FineTuningFileInvalid:
    with pytest.raises(FineTuningFileInvalid) as caught:
        check_fine_tuning_lines(examples, method)  # type: ignore[arg-type]
    return caught.value


def test_a_supervised_file_becomes_dialog_rows_the_trainer_reads():
    weighted = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "draft", "weight": 0},
                             {"role": "user", "content": [{"type": "text", "text": "again"}]},
                             {"role": "assistant", "content": "A.", "weight": 1, "name": "bot"}]}
    rows = check_fine_tuning_lines(lines(CHAT, weighted, ""), "supervised")
    assert rows[0] == CHAT
    assert rows[1] == {"messages": [{"role": "user", "content": "Q?"},
                                    {"role": "assistant", "content": "draft", "weight": 0},
                                    {"role": "user", "content": "again"}, {"role": "assistant", "content": "A."}]}
    for index, row in enumerate(rows):
        assert normalize_sft_row(row, data_format="dialog", row_index=index) == row["messages"]


def test_a_dpo_file_becomes_preference_rows_the_trainer_reads():
    rows = check_fine_tuning_lines(lines(PAIR), "dpo")
    assert rows == [{"prompt": [{"role": "user", "content": "Q?"}], "chosen": "Good.", "rejected": "Bad."}]
    assert normalize_preference_row(rows[0], row_index=0) == ([{"role": "user", "content": "Q?"}], "Good.", "Bad.")


def test_the_message_names_the_line_as_openai_does():
    error = refusal(lines(CHAT, CHAT, "", {"messages": "hello"}))
    assert (error.line_number, error.param, error.code) == (4, "messages", "invalid_messages")
    assert error.message == "Line 4: 'messages' must be a list"


def test_an_empty_file_and_too_few_examples():
    assert refusal(["", "\n"]).line_number == 0
    with pytest.raises(FineTuningFileInvalid) as caught:
        check_fine_tuning_lines(lines(CHAT, CHAT), "supervised", min_examples=10)
    assert caught.value.code == "too_few_examples" and "at least 10" in caught.value.message


def test_tool_calling_is_refused_with_its_reason():
    for example in ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
                    {"messages": [*CHAT["messages"], {"role": "tool", "content": "42", "tool_call_id": "c"}]},
                    {"messages": [{"role": "user", "content": "Q?"},
                                  {"role": "assistant", "tool_calls": [{"id": "c"}], "content": None}]}):
        error = refusal(lines(example))
        assert error.code == "unsupported_feature" and "not supported" in error.message


def _set(path: list[Any], value: Any) -> Callable[[dict], dict]:
    def mutate(example: dict) -> dict:
        target = example
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return example
    return mutate


def _drop(path: list[Any]) -> Callable[[dict], dict]:
    def mutate(example: dict) -> dict:
        target = example
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return example
    return mutate


def _assistants(example: dict, **changes: Any) -> dict:
    for message in example["messages"]:
        if message["role"] == "assistant":
            message.update(changes)
    return example


#: Each broken kind: (name, method, mutation of a valid example or a raw line, expected code).
BROKEN: list[tuple[str, str, Callable[[dict], Any], str]] = [
    ("not JSON", "supervised", lambda e: '{"messages": [', "invalid_json"),
    ("not an object", "supervised", lambda e: [e], "invalid_file_format"),
    ("missing messages", "supervised", _drop(["messages"]), "missing_messages"),
    ("messages not a list", "supervised", _set(["messages"], "hi"), "invalid_messages"),
    ("empty messages", "supervised", _set(["messages"], []), "empty_messages"),
    ("no role", "supervised", _drop(["messages", 0, "role"]), "missing_role"),
    ("unknown role", "supervised", _set(["messages", 0, "role"], "robot"), "invalid_role"),
    ("content a number", "supervised", _set(["messages", 0, "content"], 7), "invalid_content"),
    ("no content", "supervised", _drop(["messages", 0, "content"]), "missing_content"),
    ("no assistant", "supervised", lambda e: {"messages": [m for m in e["messages"] if m["role"] != "assistant"]},
     "missing_assistant_message"),
    ("weight 2", "supervised", lambda e: _assistants(e, weight=2), "invalid_weight"),
    ("weight on user", "supervised",
     lambda e: {"messages": [{"role": "user", "content": "x", "weight": 1}, *e["messages"]]}, "invalid_weight"),
    ("all weights 0", "supervised", lambda e: _assistants(e, weight=0), "all_weights_zero"),
    ("unknown top-level key", "supervised", _set(["mesages"], []), "unrecognized_key"),
    ("unknown message key", "supervised", _set(["messages", 0, "wieght"], 1), "unrecognized_key"),
    ("dpo missing preferred", "dpo", _drop(["preferred_output"]), "missing_output"),
    ("dpo missing non-preferred", "dpo", _drop(["non_preferred_output"]), "missing_output"),
    ("dpo two outputs", "dpo", lambda e: {**e, "preferred_output": e["preferred_output"] * 2}, "invalid_output"),
    ("dpo output from the user", "dpo", _set(["preferred_output", 0, "role"], "user"), "invalid_output"),
    ("dpo input not an object", "dpo", _set(["input"], "Q?"), "invalid_input"),
    ("dpo weight", "dpo", _set(["preferred_output", 0, "weight"], 1), "invalid_weight"),
]


@pytest.mark.parametrize(("name", "method", "mutate", "code"), BROKEN, ids=[b[0] for b in BROKEN])
def test_each_broken_kind_has_its_code(name, method, mutate, code):
    base = json.loads(json.dumps(CHAT if method == "supervised" else PAIR))
    broken = mutate(base)
    error = refusal(lines(CHAT if method == "supervised" else PAIR, broken), method)
    assert (error.line_number, error.code) == (2, code), error.message
    assert error.message.startswith("Line 2: ")


text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
content = st.one_of(text, st.lists(st.builds(lambda t: {"type": "text", "text": t}, text), max_size=3))
answer_content = st.one_of(text.filter(bool), st.builds(lambda t: [{"type": "text", "text": t}], text.filter(bool)))
context_message = st.builds(lambda role, c: {"role": role, "content": c},
                            st.sampled_from(["system", "user", "developer"]), content)
assistant = st.builds(lambda c, w: {"role": "assistant", "content": c, **({"weight": w} if w is not None else {})},
                      answer_content, st.sampled_from([None, 0, 1]))


@st.composite
def supervised_example(draw) -> dict:
    turns = draw(st.lists(st.one_of(context_message, assistant), max_size=5))
    last = draw(assistant.map(lambda m: {**m, "weight": 1}))
    return {"messages": [*turns, last]}


@st.composite
def dpo_example(draw) -> dict:
    prompt = draw(st.lists(st.one_of(context_message, assistant.map(lambda m: {k: v for k, v in m.items()
                                                                              if k != "weight"})),
                           min_size=1, max_size=4))
    return {"input": {"messages": prompt},
            "preferred_output": [{"role": "assistant", "content": draw(answer_content)}],
            "non_preferred_output": [{"role": "assistant", "content": draw(answer_content)}]}


PROPERTY = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(method=st.sampled_from(["supervised", "dpo"]), data=st.data())
def test_any_valid_file_converts(method, data):
    examples = data.draw(st.lists(supervised_example() if method == "supervised" else dpo_example(),
                                  min_size=1, max_size=6))
    rows = check_fine_tuning_lines(lines(*examples), method)
    assert len(rows) == len(examples)
    for index, row in enumerate(rows):
        if method == "supervised":
            chat = normalize_sft_row(row, data_format="dialog", row_index=index)
            assert [m["role"] for m in chat] == [
                "system" if m["role"] == "developer" else m["role"] for m in examples[index]["messages"]]
        else:
            normalize_preference_row(row, row_index=index)


@PROPERTY
@given(method=st.sampled_from(["supervised", "dpo"]), data=st.data())
def test_any_broken_line_is_refused_on_its_line(method, data):
    examples = data.draw(st.lists(supervised_example() if method == "supervised" else dpo_example(),
                                  min_size=1, max_size=6))
    _, _, mutate, code = data.draw(st.sampled_from([b for b in BROKEN if b[1] == method]))
    where = data.draw(st.integers(0, len(examples) - 1))
    broken = mutate(json.loads(json.dumps(examples[where])))
    file = lines(*examples[:where], broken, *examples[where + 1:])
    with pytest.raises(FineTuningFileInvalid) as caught:
        check_fine_tuning_lines(file, method)
    assert caught.value.line_number == where + 1, code
    assert caught.value.message.startswith(f"Line {where + 1}: ")


@PROPERTY
@given(line=st.one_of(st.text(max_size=40), st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(
        st.sampled_from(["messages", "role", "content", "weight", "input", "preferred_output",
                         "non_preferred_output", "x"]), inner, max_size=4)), max_leaves=12).map(json.dumps)),
    method=st.sampled_from(["supervised", "dpo"]))
def test_arbitrary_lines_never_raise_another_exception(line, method):
    try:
        rows = check_fine_tuning_lines([line], method)
    except FineTuningFileInvalid as error:
        rows = [error.line_number]
    assert len(rows) == 1


@pytest.mark.parametrize(("messages", "needle"), [
    ([{"role": "user", "content": "Q?", "weight": 1}, {"role": "assistant", "content": "A."}], "'weight' must be 0 or 1"),
    ([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A.", "weight": 2}], "'weight' must be 0 or 1"),
    ([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A.", "weight": True}], "'weight' must be"),
    ([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A.", "weight": 0}], "weight 0"),
])
def test_the_internal_dialog_layout_checks_weights_too(messages, needle):
    """Rows registered through the Llama Stack door may carry weights as well: the server refuses
    a bad one at registration (``layout_problem``) and the trainer at its start."""
    from posttrain.domain.rows import RowFormatError, layout_problem

    with pytest.raises(RowFormatError, match=needle):
        normalize_sft_row({"messages": messages}, data_format="dialog", row_index=0)
    if "must be" in needle:
        assert needle in (layout_problem({"messages": messages}, row_index=0) or "")
