"""Every row layout Llama Stack users have becomes a chat; labels cover exactly the answers."""

from __future__ import annotations

import json

import pytest

from posttrain.trainer.formats import (
    IGNORE_INDEX,
    RowFormatError,
    normalize_preference_row,
    normalize_sft_row,
    tokenize_sft_row,
)
from tests.fixtures_tiny import build_tiny_model

USER_ASSISTANT = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_model(tmp_path_factory))


@pytest.mark.parametrize(
    "row",
    [
        {"chat_completion_input": json.dumps([{"role": "user", "content": "Q?"}]), "expected_answer": "A."},
        {"chat_completion_input": [{"role": "user", "content": "Q?"}], "expected_answer": "A."},
        {"chat_completion_input": "Q?", "expected_answer": "A."},
        {"input_query": "Q?", "expected_answer": "A.", "generated_answer": "ignored"},
        {"prompt": "Q?", "completion": "A."},
        {"input": "Q?", "output": "A."},
        {"question": "Q?", "answer": "A."},
        {"messages": USER_ASSISTANT},
        {"dialog": json.dumps(USER_ASSISTANT)},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Q?"}]},
                      {"role": "assistant", "content": {"type": "text", "text": "A."}}]},
    ],
)
@pytest.mark.parametrize("data_format", ["instruct", "dialog"])
def test_every_layout_normalizes_under_either_format(row, data_format):
    assert normalize_sft_row(row, data_format=data_format, row_index=0) == USER_ASSISTANT


def test_data_format_sets_which_layout_wins():
    row = {"messages": [*USER_ASSISTANT, {"role": "user", "content": "more"}, {"role": "assistant", "content": "B"}],
           "question": "X?", "answer": "Y"}
    assert len(normalize_sft_row(row, data_format="dialog", row_index=0)) == 4
    assert normalize_sft_row(row, data_format="instruct", row_index=0)[0]["content"] == "X?"


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"text": "hello"}, "expected columns"),
        ({"question": "only half"}, "expected columns"),
        ({"dialog": "[{not json"}, "not valid JSON"),
        ({"messages": [{"role": "user"}]}, "'role' and 'content'"),
        ({"messages": [{"role": "user", "content": "no answer"}]}, "no assistant"),
        ({"messages": []}, "non-empty"),
    ],
)
def test_bad_rows_name_the_row_and_columns(row, needle):
    with pytest.raises(RowFormatError) as info:
        normalize_sft_row(row, data_format="instruct", row_index=7)
    assert info.value.row_index == 7
    assert str(info.value).startswith("row 7:")
    assert needle in str(info.value)


def test_missing_columns_error_lists_layouts():
    with pytest.raises(RowFormatError, match=r"chat_completion_input\+expected_answer.*found \['text'\]"):
        normalize_sft_row({"text": "x"}, data_format="dialog", row_index=3)


def _answer_text(tokenizer, encoded):
    pairs = zip(encoded["input_ids"], encoded["labels"], strict=True)
    return tokenizer.decode([t for t, label in pairs if label != IGNORE_INDEX])


def test_labels_cover_only_assistant_turns_with_eos(tokenizer):
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the colour of grass?"},
        {"role": "assistant", "content": "It is green."},
        {"role": "user", "content": "And the sky?"},
        {"role": "assistant", "content": "It is blue."},
    ]}
    encoded = tokenize_sft_row(row, tokenizer=tokenizer, data_format="dialog", train_on_input=False,
                               max_length=None, row_index=0)
    assert len(encoded["input_ids"]) == len(encoded["labels"])
    eos = tokenizer.eos_token
    assert _answer_text(tokenizer, encoded) == f"It is green.{eos}It is blue.{eos}"
    assert tokenizer.decode(encoded["input_ids"]) == tokenizer.apply_chat_template(row["messages"], tokenize=False)


def test_prompt_tokens_match_generation_prompt(tokenizer):
    """The masked prefix is exactly what the model sees at inference before it answers."""
    encoded = tokenize_sft_row({"question": "Where is the box?", "answer": "It is here."}, tokenizer=tokenizer,
                               data_format="instruct", train_on_input=False, max_length=None, row_index=0)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Where is the box?"}], tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert encoded["input_ids"][: len(prompt_ids)] == prompt_ids
    assert encoded["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert IGNORE_INDEX not in encoded["labels"][len(prompt_ids):]


def test_train_on_input_and_truncation(tokenizer):
    row = {"prompt": "Tell me about the blue sea.", "completion": "It is blue."}
    full = tokenize_sft_row(row, tokenizer=tokenizer, data_format="instruct", train_on_input=True,
                            max_length=None, row_index=0)
    assert full["labels"] == full["input_ids"]
    short = tokenize_sft_row(row, tokenizer=tokenizer, data_format="instruct", train_on_input=True,
                             max_length=5, row_index=0)
    assert short["input_ids"] == full["input_ids"][:5] and short["labels"] == full["labels"][:5]


def test_plain_fallback_without_chat_template(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    encoded = tokenize_sft_row({"input": "Q?", "output": "A."}, tokenizer=plain, data_format="instruct",
                               train_on_input=False, max_length=None, row_index=0)
    assert tokenizer.decode(encoded["input_ids"]).endswith(f"user: Q?\nassistant: A.{tokenizer.eos_token}\n")
    assert _answer_text(tokenizer, encoded) == f"A.{tokenizer.eos_token}\n"


def test_preference_rows():
    assert normalize_preference_row({"prompt": "Q?", "chosen": "good", "rejected": "bad"}, row_index=0) == (
        [{"role": "user", "content": "Q?"}], "good", "bad")
    conversational = {
        "prompt": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    assert normalize_preference_row(conversational, row_index=0) == ([{"role": "user", "content": "Q?"}], "good", "bad")
    implicit = {"chosen": USER_ASSISTANT, "rejected": [USER_ASSISTANT[0], {"role": "assistant", "content": "no"}]}
    assert normalize_preference_row(implicit, row_index=0) == ([USER_ASSISTANT[0]], "A.", "no")
    with pytest.raises(RowFormatError, match="row 4: expected columns prompt\\+chosen\\+rejected"):
        normalize_preference_row({"prompt": "Q?", "chosen": "x"}, row_index=4)
    with pytest.raises(RowFormatError, match="row 2: no prompt"):
        normalize_preference_row({"chosen": "x", "rejected": "y"}, row_index=2)


def test_a_row_whose_answer_is_cut_away_is_refused(tokenizer):
    long_prompt = {"input_query": "word " * 400, "expected_answer": "short"}
    with pytest.raises(RowFormatError, match=r"row 3: \d+ tokens.*shorten the prompt"):
        tokenize_sft_row(long_prompt, tokenizer=tokenizer, data_format="instruct", train_on_input=False,
                         max_length=64, row_index=3)
    # With the loss on the input too, the kept start still teaches something.
    kept = tokenize_sft_row(long_prompt, tokenizer=tokenizer, data_format="instruct", train_on_input=True,
                            max_length=64, row_index=3)
    assert len(kept["input_ids"]) == 64
