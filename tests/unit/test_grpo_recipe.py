"""The GRPO recipe's checks: every knob refused out of range, naming the recipe's field."""

from __future__ import annotations

import pytest

from posttrain.domain.recipes import JobKind, build_recipe
from posttrain.errors import RecipeInvalid

GRADER = {"type": "string_check", "name": "colour", "input": "{{sample.output_text}}",
          "reference": "{{item.answer}}", "operation": "eq"}


def _grpo(**grpo) -> dict:
    return {"method": "grpo", "adapter": {"architecture_defaults": True},
            "grpo": {"grader": GRADER, **grpo}}


def test_defaults_round_trip():
    recipe = build_recipe(_grpo())
    assert recipe.method is JobKind.GRPO and recipe.grpo is not None
    assert recipe.grpo.num_generations == 4 and recipe.grpo.upper_epsilon == 0.2
    assert build_recipe(recipe.model_dump(mode="json")) == recipe


@pytest.mark.parametrize(("knob", "value", "field"), [
    ("num_generations", 1, "grpo.num_generations"),
    ("num_generations", 10_000, "grpo.num_generations"),
    ("beta", -0.1, "grpo.beta"),
    ("epsilon", 0, "grpo.epsilon"),
    ("epsilon", 1.5, "grpo.epsilon"),
    ("epsilon_high", -1, "grpo.epsilon_high"),
    ("loss_type", "ppo", "grpo.loss_type"),
    ("scale_rewards", "yes", "grpo.scale_rewards"),
    ("temperature", 0, "grpo.temperature"),
    ("temperature", float("nan"), "grpo.temperature"),
    ("top_p", 0, "grpo.top_p"),
    ("max_completion_length", 0, "grpo.max_completion_length"),
    ("max_completion_length", 10**9, "grpo.max_completion_length"),
    ("eval_interval", 0, "grpo.eval_interval"),
    ("eval_samples", 0, "grpo.eval_samples"),
    ("grader", {"type": "telepathy"}, "grpo.grader.type"),
    ("grader", {}, "grpo.grader.type"),
    ("bogus", 1, "grpo.bogus"),
])
def test_bad_knob_refused_naming_its_field(knob, value, field):
    with pytest.raises(RecipeInvalid) as caught:
        build_recipe(_grpo(**{knob: value}))
    assert caught.value.field == field


def test_method_and_options_must_agree():
    with pytest.raises(RecipeInvalid) as caught:
        build_recipe({"method": "grpo"})
    assert caught.value.field == "grpo"
    with pytest.raises(RecipeInvalid) as caught:
        build_recipe({"method": "sft", "grpo": {"grader": GRADER}})
    assert caught.value.field == "grpo"


def test_full_fine_tune_with_a_kl_refused_on_memory_grounds():
    build_recipe({"method": "grpo", "grpo": {"grader": GRADER, "beta": 0.0}})  # full, no reference: fine
    with pytest.raises(RecipeInvalid) as caught:
        build_recipe({"method": "grpo", "grpo": {"grader": GRADER, "beta": 0.04}})
    assert caught.value.field == "grpo.beta" and "second" in caught.value.detail


@pytest.mark.parametrize(("extra", "field"), [
    ({"data": {"packed": True}}, "data.packed"),
    ({"data": {"train_on_input": True}}, "data.train_on_input"),
    ({"data": {"batch_size": 60_000}}, "data.batch_size"),
])
def test_data_options_grpo_cannot_honour_refused(extra, field):
    with pytest.raises(RecipeInvalid) as caught:
        build_recipe({**_grpo(), **extra})
    assert caught.value.field == field
