"""A score_model grader's shape and how its judge's answer becomes a reward (domain, no model):
the messages it renders, the sampling parameters honoured or refused, the first number read,
clamped to ``range`` and mapped onto [0, 1]."""

from __future__ import annotations

import pytest

from posttrain.domain.graders import (
    GraderInvalid,
    TemplateError,
    grader_to_json,
    judge_messages,
    judge_score,
    parse_grader,
)
from posttrain.trainer.grading.judge import generation_settings

JUDGE = {"type": "score_model", "name": "judge", "model": "tiny-llama", "range": [0, 10],
         "input": [{"role": "developer", "content": "Rate answers from 0 to 10."},
                   {"role": "user", "content": [{"type": "input_text", "text": "Q: {{item.q}} A: "},
                                                {"type": "input_text", "text": "{{sample.output_text}}"}]}]}


def test_the_messages_are_filled_and_developer_is_system():
    grader = parse_grader(JUDGE)
    assert grader_to_json(grader) == {**JUDGE, "range": [0, 10]}
    chat = judge_messages(grader, {"output_text": "red"}, {"q": "colour?"})
    assert chat == [{"role": "system", "content": "Rate answers from 0 to 10."},
                    {"role": "user", "content": "Q: colour? A: red"}]
    with pytest.raises(TemplateError, match="item has no field 'q'"):
        judge_messages(grader, {"output_text": "red"}, {})


@pytest.mark.parametrize(("answer", "bounds", "expected"), [
    ("7", (0, 10), 0.7),
    ("Score: 3.5 out of 10", (0, 10), 0.35),
    ("12", (0, 10), 1.0),          # clamped to the range
    ("-4", (0, 10), 0.0),
    ("4", (1, 7), 0.5),            # (4 - 1) / (7 - 1)
    ("0.25", (0, 1), 0.25),
    ("1e400 then 2", (0, 10), 0.2),  # not a finite number: the next one
    ("no idea", (0, 10), None),
    ("", (0, 1), None),
])
def test_the_first_number_is_clamped_and_normalised(answer, bounds, expected):
    value = judge_score(answer, bounds)
    assert value == pytest.approx(expected) if expected is not None else value is None


@pytest.mark.parametrize(("change", "param", "words"), [
    ({"sampling_params": {"reasoning_effort": "high"}}, "grader.sampling_params.reasoning_effort", "reasoning"),
    ({"sampling_params": {"top_k": 5}}, "grader.sampling_params.top_k", "honours"),
    ({"sampling_params": {"temperature": 3}}, "grader.sampling_params.temperature", "0 to 2"),
    ({"sampling_params": {"top_p": 0}}, "grader.sampling_params.top_p", "above 0"),
    ({"sampling_params": {"max_completions_tokens": 0}}, "grader.sampling_params.max_completions_tokens", "1 to"),
    ({"sampling_params": {"seed": 1.5}}, "grader.sampling_params.seed", "integer"),
    ({"input": [{"role": "tool", "content": "x"}]}, "grader.input[0].role", "role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "grader.input[0].content[0]", "text only"),
    ({"input": [{"role": "user", "content": "{{ answer }}"}]}, "grader.input[0].content", "sample"),
    ({"input": [{"role": "user", "content": "x", "name": "n"}]}, "grader.input[0].name", "unknown field"),
])
def test_what_the_judge_cannot_honour_is_refused_naming_the_field(change, param, words):
    with pytest.raises(GraderInvalid) as caught:
        parse_grader({**JUDGE, **change})
    assert caught.value.param == param and words in caught.value.message


def test_sampling_params_become_generate_settings():
    assert generation_settings(None) == {"max_new_tokens": 16, "do_sample": False}
    assert generation_settings({"temperature": 0, "seed": 3, "max_completions_tokens": 4}) == {
        "max_new_tokens": 4, "do_sample": False}
    assert generation_settings({"temperature": 0.7, "top_p": 0.9, "reasoning_effort": None}) == {
        "max_new_tokens": 16, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0}
