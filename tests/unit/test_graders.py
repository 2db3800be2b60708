"""Graders: OpenAI's grader objects parsed and refused with the field named, the templating, each
string_check operation and text_similarity metric (checked against the library that computes it),
calculate_output's whitelist, and the submit-time policy (python graders, score_model)."""

from __future__ import annotations

import math
import time

import pytest

from posttrain.domain.graders import (
    FormulaError,
    GraderInvalid,
    MultiGrader,
    StringCheckGrader,
    TemplateError,
    evaluate_formula,
    grader_to_json,
    make_sample,
    parse_grader,
    render_template,
)
from posttrain.services.graders import check_grader_allowed
from posttrain.settings import Settings
from posttrain.trainer.grading import score, score_batch


def _check(operation: str, reference: str = "{{item.label}}") -> dict:
    return {"type": "string_check", "name": "answer", "input": "{{sample.output_text}}",
            "reference": reference, "operation": operation}


def _similarity(metric: str) -> dict:
    return {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}",
            "reference": "{{item.label}}", "evaluation_metric": metric}


PYTHON = {"type": "python", "name": "py", "image_tag": "2025-05-08",
          "source": "def grade(sample, item):\n    return 1.0 if sample['output_text'] == item['label'] else 0.0\n"}
SCORE_MODEL = {"type": "score_model", "name": "judge", "model": "some-model", "range": [0, 10],
               "input": [{"role": "user", "content": "Score {{sample.output_text}} against {{item.label}}"}],
               "sampling_params": {"temperature": 0.0, "seed": 1}, "pass_threshold": 5}
MULTI = {"type": "multi", "name": "both", "calculate_output": "0.5 * answer + 0.5 * close",
         "graders": {"answer": _check("eq"), "close": _similarity("fuzzy_match")}}


# ---------------------------------------------------------------- parsing and round trip

@pytest.mark.parametrize("obj", [_check("ilike"), _similarity("rouge_l"), PYTHON, SCORE_MODEL, MULTI,
                                 {**_similarity("bleu"), "pass_threshold": 0.8}])
def test_each_grader_round_trips_through_its_json(obj):
    grader = parse_grader(obj)
    assert grader_to_json(grader) == grader_to_json(parse_grader(grader_to_json(grader)))
    assert parse_grader(grader_to_json(grader)) == grader


def test_multi_graders_given_as_a_list_are_named_by_their_name():
    grader = parse_grader({**MULTI, "graders": [{**_check("eq"), "name": "answer"},
                                                {**_similarity("bleu"), "name": "close"}]})
    assert isinstance(grader, MultiGrader) and set(grader.graders) == {"answer", "close"}


@pytest.mark.parametrize(("obj", "param", "words"), [
    ("nope", "grader", "JSON object"),
    ({"type": "regex", "name": "x"}, "grader.type", "unknown grader type"),
    ({**_check("eq"), "operation": "contains"}, "grader.operation", "eq, ne, like, ilike"),
    ({**_check("eq"), "input": 3}, "grader.input", "must be a string"),
    ({**_check("eq"), "name": ""}, "grader.name", "1-200"),
    ({**_check("eq"), "extra": 1}, "grader.extra", "unknown field"),
    ({**_check("eq"), "reference": "{{ answer }}"}, "grader.reference", "sample.<field>"),
    ({**_check("eq"), "reference": "{{ output.answer }}"}, "grader.reference", "item.<field>"),
    ({**_check("eq"), "input": "x" * 100_001}, "grader.input", "over 100000"),
    ({**_similarity("bleu"), "evaluation_metric": "jaccard"}, "grader.evaluation_metric", "fuzzy_match"),
    (_similarity("cosine"), "grader.evaluation_metric", "embedding model"),
    ({**_similarity("bleu"), "pass_threshold": "high"}, "grader.pass_threshold", "finite number"),
    ({**_similarity("bleu"), "pass_threshold": 10**400}, "grader.pass_threshold", "finite number"),
    ({**SCORE_MODEL, "range": [0, 10**400]}, "grader.range", "finite numbers"),
    ({**SCORE_MODEL, "range": [0, 1, 2]}, "grader.range", "low < high"),
    ({**PYTHON, "source": "-" * 200_000 + "1\ndef grade(sample, item):\n    return 1\n"}, "grader.source", "too deep"),
    ({**PYTHON, "source": PYTHON["source"] + "\x00"}, "grader.source", "not valid Python"),
    ({**PYTHON, "source": "def grade(sample, item):\n  return (\n"}, "grader.source", "not valid Python"),
    ({**PYTHON, "source": "def score(sample, item):\n    return 1\n"}, "grader.source", "grade(sample, item)"),
    ({**PYTHON, "source": "x = 1\n" * 50_000}, "grader.source", "bytes"),
    ({**SCORE_MODEL, "range": [1, 0]}, "grader.range", "low < high"),
    ({**SCORE_MODEL, "input": []}, "grader.input", "message objects"),
    ({**SCORE_MODEL, "model": " "}, "grader.model", "judge model"),
    ({"type": "label_model", "name": "l"}, "grader.type", "not supported"),
    ({**MULTI, "graders": {}}, "grader.graders", "1-16"),
    ({**MULTI, "graders": {"a-b": _check("eq")}}, "grader.graders.a-b", "identifier"),
    ({**MULTI, "graders": {"max": _check("eq")}}, "grader.graders.max", "function name"),
    ({**MULTI, "graders": {"inner": MULTI}}, "grader.graders.inner.type", "another multi"),
    ({**MULTI, "graders": {"answer": {**_check("eq"), "operation": "x"}}}, "grader.graders.answer.operation", "eq"),
    ({**MULTI, "calculate_output": "answer + style"}, "grader.calculate_output", "'style'"),
    ({**MULTI, "calculate_output": "__import__('os')"}, "grader.calculate_output", "may call only"),
    ({**MULTI, "calculate_output": "answer.real"}, "grader.calculate_output", "Attribute"),
    ({**MULTI, "calculate_output": "answer if close else 1"}, "grader.calculate_output", "IfExp"),
    ({**MULTI, "calculate_output": "answer % 2"}, "grader.calculate_output", "+ - * / ^ only"),
    ({**MULTI, "calculate_output": "'1' + answer"}, "grader.calculate_output", "only numbers"),
    ({**MULTI, "calculate_output": "[answer][0]"}, "grader.calculate_output", "does not allow"),
    ({**MULTI, "calculate_output": "max(answer, key=close)"}, "grader.calculate_output", "positional"),
    ({**MULTI, "calculate_output": "abs(answer, close)"}, "grader.calculate_output", "takes 1"),
    ({**MULTI, "calculate_output": "(answer"}, "grader.calculate_output", "not an arithmetic expression"),
    ({**MULTI, "calculate_output": "answer + " * 200}, "grader.calculate_output", "over 1000"),
    ({**MULTI, "calculate_output": "-" * 900 + "answer"}, "grader.calculate_output", "deeper than 64"),
    ({**MULTI, "calculate_output": "answer ** " * 90 + "close"}, "grader.calculate_output", "deeper than 64"),
])
def test_a_bad_grader_is_refused_naming_the_field(obj, param, words):
    with pytest.raises(GraderInvalid) as caught:
        parse_grader(obj)
    assert caught.value.param == param
    assert words in caught.value.message


def test_the_param_prefix_is_the_callers():
    with pytest.raises(GraderInvalid) as caught:
        parse_grader({**_check("eq"), "operation": "x"}, param="method.reinforcement.grader")
    assert caught.value.param == "method.reinforcement.grader.operation"


# ---------------------------------------------------------------- templating

def test_templates_fill_sample_and_nested_item_fields():
    item = {"label": "Paris", "meta": {"tags": ["a", "b"], "n": 3}}
    sample = {"output_text": "it is Paris"}
    assert render_template("{{sample.output_text}}|{{ item.label }}", sample, item) == "it is Paris|Paris"
    assert render_template("{{item.meta.tags[1]}} {{item.meta.tags.0}}", sample, item) == "b a"
    assert render_template("{{item.meta.n}} {{item.meta.tags}}", sample, item) == '3 ["a", "b"]'
    assert render_template("no templates {here}", sample, item) == "no templates {here}"


@pytest.mark.parametrize(("template", "words"), [
    ("{{item.answer}}", "item has no field 'answer'"),
    ("{{item.meta.tags[5]}}", "item.meta.tags has no field '5'"),
    ("{{sample.output_json.x}}", "sample has no field 'output_json'"),
    ("{{item.meta.n.deeper}}", "item.meta.n has no field 'deeper'"),
])
def test_a_missing_field_is_a_clear_template_error(template, words):
    with pytest.raises(TemplateError) as caught:
        render_template(template, {"output_text": "x"}, {"meta": {"tags": ["a"], "n": 3}})
    assert words in str(caught.value)


def test_a_sample_holds_output_json_when_the_text_is_a_json_object():
    assert make_sample("plain") == {"output_text": "plain"}
    assert make_sample("[1, 2]") == {"output_text": "[1, 2]"}
    sample = make_sample('{"answer": "blue", "why": ["sky"]}')
    assert render_template("{{sample.output_json.answer}} {{sample.output_json.why[0]}}", sample, {}) == "blue sky"


def test_a_template_of_many_open_braces_is_checked_in_linear_time():
    started = time.monotonic()
    parse_grader(_check("eq", "{{" * 49_000))
    assert time.monotonic() - started < 2


def test_a_field_json_cannot_write_scores_zero_with_the_reason():
    result = score(parse_grader(_check("eq", "{{item.when}}")), {"output_text": "x"}, {"when": object()})
    assert result.score == 0.0 and "could not be filled" in (result.error or "")


def test_a_missing_field_scores_zero_with_the_reason():
    result = score(parse_grader(_check("eq", "{{item.answer}}")), {"output_text": "x"}, {"label": "x"})
    assert result.score == 0.0 and "no field 'answer'" in (result.error or "")


# ---------------------------------------------------------------- string_check

@pytest.mark.parametrize(("operation", "output", "label", "expected"), [
    ("eq", "Paris", "Paris", 1.0), ("eq", "paris", "Paris", 0.0), ("eq", "Paris ", "Paris", 0.0),
    ("ne", "Lyon", "Paris", 1.0), ("ne", "Paris", "Paris", 0.0),
    ("like", "I say Paris.", "Paris", 1.0), ("like", "I say paris.", "Paris", 0.0),
    ("ilike", "I SAY PARIS.", "Paris", 1.0), ("ilike", "I say Lyon.", "Paris", 0.0),
])
def test_each_string_check_operation(operation, output, label, expected):
    result = score(parse_grader(_check(operation)), {"output_text": output}, {"label": label})
    assert result.score == expected and result.error is None and result.per_grader == {"answer": expected}


# ---------------------------------------------------------------- text_similarity

def _metric(metric: str, output: str, label: str) -> float:
    result = score(parse_grader(_similarity(metric)), {"output_text": output}, {"label": label})
    assert result.error is None
    return result.score


def test_each_metric_is_its_librarys_number():
    import sacrebleu
    from nltk.translate.gleu_score import sentence_gleu
    from rapidfuzz import fuzz
    from rouge_score import rouge_scorer

    out, ref = "the cat sat on the mat today", "the cat sat on the red mat"
    assert _metric("fuzzy_match", out, ref) == pytest.approx(fuzz.ratio(out, ref) / 100)
    assert _metric("bleu", out, ref) == pytest.approx(sacrebleu.sentence_bleu(out, [ref]).score / 100)
    assert _metric("gleu", out, ref) == pytest.approx(sentence_gleu([ref.split()], out.split()))
    for n in range(1, 6):
        expected = rouge_scorer.RougeScorer([f"rouge{n}"]).score(ref, out)[f"rouge{n}"].fmeasure
        assert _metric(f"rouge_{n}", out, ref) == pytest.approx(expected)
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(ref, out)["rougeL"].fmeasure
    assert _metric("rouge_l", out, ref) == pytest.approx(expected)


@pytest.mark.parametrize("metric", ["fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3",
                                    "rouge_4", "rouge_5", "rouge_l"])
def test_each_metric_is_one_for_equal_texts_and_lower_for_others(metric):
    text = "the quick brown fox jumps over the lazy dog"
    # METEOR's fragmentation penalty keeps even equal texts just under 1 (0.9993 here): nltk's number.
    assert _metric(metric, text, text) == pytest.approx(1.0, abs=1e-3 if metric == "meteor" else 1e-9)
    other = _metric(metric, "a slow green turtle crawls under the busy bridge", text)
    assert 0.0 <= other < 0.6
    assert _metric(metric, "", "") == 1.0


def test_meteor_counts_stem_matches():
    assert _metric("meteor", "the cats jumped", "the cat jumps") > _metric("meteor", "the dog ran", "the cat jumps")


# ---------------------------------------------------------------- multi and calculate_output

def test_multi_combines_named_scores_with_calculate_output():
    grader = parse_grader({**MULTI, "calculate_output": "0.25 * answer + 0.75 * close"})
    results = score_batch(grader, [{"output_text": "Paris"}, {"output_text": "Parix"}], [{"label": "Paris"}] * 2)
    assert results[0].score == pytest.approx(1.0) and results[0].per_grader == {"answer": 1.0, "close": 1.0}
    assert results[1].per_grader["answer"] == 0.0
    assert results[1].score == pytest.approx(0.75 * results[1].per_grader["close"])


@pytest.mark.parametrize(("formula", "expected"), [
    ("a + b * 2", 5.0), ("(a + b) * 2", 6.0), ("a ^ 2 * b", 2.0), ("a ** 3", 1.0), ("-a + +b", 1.0),
    ("min(a, b, 0.5)", 0.5), ("max(a, b)", 2.0), ("abs(a - b)", 1.0), ("floor(b / 3 + 1.5)", 2.0),
    ("ceil(0.2)", 1.0), ("exp(0)", 1.0), ("sqrt(b * 8)", 4.0), ("log(exp(b))", 2.0), ("b / 4", 0.5),
])
def test_calculate_output_arithmetic(formula, expected):
    assert evaluate_formula(formula, {"a": 1.0, "b": 2.0}) == pytest.approx(expected)


@pytest.mark.parametrize(("formula", "words"), [
    ("a / (b - 2)", "ZeroDivisionError"), ("10.0 ^ 400", "OverflowError"), ("sqrt(a - 5)", "ValueError"),
    ("(a - 5) ^ 0.5", "TypeError"), ("log(0)", "ValueError"),
])
def test_calculate_output_math_errors_are_formula_errors(formula, words):
    with pytest.raises(FormulaError) as caught:
        evaluate_formula(formula, {"a": 1.0, "b": 2.0})
    assert words in str(caught.value)


@pytest.mark.parametrize("formula", ["__import__('os').system('true')", "open('/etc/passwd')", "a.__class__",
                                     "lambda: 1", "[x for x in (1,)]", "a < b", "a and b", "b[0]", "globals()"])
def test_calculate_output_refuses_anything_outside_the_whitelist(formula):
    with pytest.raises(FormulaError):
        evaluate_formula(formula, {"a": 1.0, "b": 2.0})


def test_a_formula_failing_at_run_time_scores_zero_with_the_reason():
    grader = parse_grader({**MULTI, "calculate_output": "answer / (close - close)"})
    result = score(grader, {"output_text": "Paris"}, {"label": "Paris"})
    assert result.score == 0.0 and "ZeroDivisionError" in (result.error or "")
    assert result.per_grader == {"answer": 1.0, "close": 1.0}


def test_score_model_without_a_judge_scores_zero_saying_so():
    result = score(parse_grader(SCORE_MODEL), {"output_text": "x"}, {"label": "x"})
    assert result.score == 0.0 and "no judge model" in (result.error or "")
    from posttrain.trainer.grading import JudgePool

    result = score(parse_grader(SCORE_MODEL), {"output_text": "x"}, {"label": "x"}, judges=JudgePool())
    assert result.score == 0.0 and "no judge was resolved for model 'some-model'" in (result.error or "")


# ---------------------------------------------------------------- submit-time policy

def test_python_graders_are_off_on_a_keyed_server_unless_allowed(tmp_path):
    python, multi = parse_grader(PYTHON), parse_grader({**MULTI, "calculate_output": "answer * py",
                                                      "graders": {"answer": _check("eq"), "py": PYTHON}})
    default = Settings(home=tmp_path)
    check_grader_allowed(python, default, keys_on=False)
    for grader, param in ((python, "grader.type"), (multi, "grader.graders.py.type")):
        with pytest.raises(GraderInvalid) as caught:
            check_grader_allowed(grader, default, keys_on=True)
        assert caught.value.param == param and "POSTTRAIN_ALLOW_PYTHON_GRADERS=true" in caught.value.message
    check_grader_allowed(multi, Settings(home=tmp_path, allow_python_graders=True), keys_on=True)
    with pytest.raises(GraderInvalid, match="turned off"):
        check_grader_allowed(python, Settings(home=tmp_path, allow_python_graders=False), keys_on=False)


def test_score_model_needs_a_door_that_looks_its_judge_up_and_the_others_pass(tmp_path):
    settings = Settings(home=tmp_path)
    with pytest.raises(GraderInvalid) as caught:
        check_grader_allowed(parse_grader(SCORE_MODEL), settings, keys_on=False)
    assert caught.value.param == "grader.type" and "judge model" in caught.value.message
    for obj in (_check("eq"), _similarity("bleu"), MULTI):
        check_grader_allowed(parse_grader(obj), settings, keys_on=True)


def test_the_env_variable_sets_it(monkeypatch, tmp_path):
    monkeypatch.setenv("POSTTRAIN_ALLOW_PYTHON_GRADERS", "true")
    assert Settings(home=tmp_path).allow_python_graders is True
    assert isinstance(parse_grader(_check("eq")), StringCheckGrader)
    assert math.isfinite(evaluate_formula("1", {}))


def test_the_sandbox_hides_the_data_folder_the_file_roots_and_a_sqlite_store_elsewhere(tmp_path):
    settings = Settings(home=tmp_path / "home", file_roots=[tmp_path / "files"], shared_file_roots=[tmp_path / "ro"],
                        database_url=f"sqlite:///{tmp_path / 'db' / 'store.db'}")
    hidden = settings.grader_hidden_paths
    for path in ("home", "files", "ro", "db"):
        assert str((tmp_path / path).resolve()) in hidden


# ---------------------------------------------------------------- any JSON: a GraderInvalid, never a crash

def _json_values():
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30) | st.sampled_from(
        ["string_check", "text_similarity", "python", "score_model", "multi", "eq", "bleu", "{{item.x}}",
         "{{ sample.output_text }}", "a + b", "def grade(sample, item):\n    return 1\n", 10**400])
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.sampled_from(["type", "name", "input", "reference", "operation",
                                                           "evaluation_metric", "source", "graders", "model",
                                                           "range", "calculate_output", "pass_threshold", "a", "b"]),
                                          inner, max_size=8), max_leaves=20)


def test_any_json_is_parsed_or_refused_with_a_param_never_a_crash():
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_json_values())
    def check(obj):
        try:
            grader = parse_grader(obj)
        except GraderInvalid as error:
            refusal = error
        else:
            assert parse_grader(grader_to_json(grader)) == grader
            return
        assert refusal.param.startswith("grader") and refusal.message

    check()
