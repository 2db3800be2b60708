"""The typed recipe on its own: each default lives once, each check refuses with the field it is
about, and a recipe survives the JSON round trip through the store and the spec file unchanged."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from posttrain.domain.recipes import (
    DEFAULT_LEARNING_RATE,
    DPO_ADAPTER,
    JobKind,
    JobPlan,
    Recipe,
    TrainerSpec,
    build_recipe,
    build_submission,
)
from posttrain.errors import RecipeInvalid

DPO = {"method": "dpo", "dpo": {}, "adapter": DPO_ADAPTER.model_dump()}


def refusal(data: dict) -> RecipeInvalid:
    with pytest.raises(RecipeInvalid) as caught:
        build_recipe(data)
    return caught.value


def test_an_empty_sft_recipe_takes_the_one_set_of_defaults():
    recipe = build_recipe({"method": "sft"})
    assert recipe.optimizer.lr == DEFAULT_LEARNING_RATE and recipe.optimizer.optimizer_type == "adamw"
    assert recipe.schedule.n_epochs == recipe.schedule.max_steps_per_epoch == 1
    assert recipe.data.batch_size == 1 and recipe.data.shuffle and recipe.dtype == "bf16"
    assert recipe.adapter is None and recipe.qat is None and recipe.dpo is None and not recipe.is_lora


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"optimizer": {"lr": 0}}, "optimizer.lr", "greater than 0"),
        ({"optimizer": {"weight_decay": -1}}, "optimizer.weight_decay", "greater than or equal to 0"),
        ({"schedule": {"n_epochs": 0}}, "schedule.n_epochs", "greater than or equal to 1"),
        ({"schedule": {"gradient_accumulation_steps": 0}}, "schedule.gradient_accumulation_steps", "1"),
        ({"data": {"batch_size": 0}}, "data.batch_size", "1"),
        ({"dtype": "fp8"}, "dtype", "'bf16', 'fp16' or 'fp32'"),
        ({"adapter": {"rank": 4}}, "adapter", "at least one target"),
        ({"adapter": {"attention": ["wq"]}}, "adapter.attention.0", "q_proj"),
        ({"adapter": {"mlp": True, "rank": 0}}, "adapter.rank", "1"),
        ({"qat": {"quantizer_name": "int2", "group_size": 32}}, "qat.quantizer_name", "Int8DynActInt4WeightQATQuantizer"),
        ({"qat": {"quantizer_name": "8da4w", "group_size": 48}}, "qat.group_size", "power of two"),
        ({"qat": {"quantizer_name": "8da4w", "group_size": 32}, "adapter": {"mlp": True}}, "qat", "full fine-tune"),
        ({"dpo": {"beta": 0.1}}, "dpo", "only a DPO job"),
        ({"surprise": 1}, "surprise", "Extra inputs"),
    ],
)
def test_sft_checks_name_their_field(data, field, words):
    error = refusal({"method": "sft", **data})
    assert error.field == field and words in error.reason and error.detail.startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"dpo": {"beta": 0}}, "dpo.beta", "greater than 0"),
        ({"dpo": {"loss_type": "nonsense"}}, "dpo.loss_type", "kto_pair"),
        ({"data": {"packed": True}}, "data.packed", "preference"),
        ({"data": {"train_on_input": True}}, "data.train_on_input", "preference"),
        ({"adapter": None}, "adapter", "LoRA adapter"),
        ({"dpo": None}, "dpo", "DPO options"),
    ],
)
def test_dpo_checks_name_their_field(data, field, words):
    error = refusal({**DPO, **data})
    assert error.field == field and words in error.reason


def test_a_dpo_recipe_trains_the_architectures_default_adapter():
    recipe = build_recipe(DPO)
    assert recipe.method is JobKind.DPO and recipe.adapter.architecture_defaults and recipe.dpo.beta == 0.1


def test_job_uuids_must_be_printable():
    base = {"model": "m", "dataset_id": "d", "recipe": {"method": "sft"}}
    assert build_submission({**base, "job_uuid": "ok-1"}).job_uuid == "ok-1"
    for bad in ("", "x" * 256, "tab\there"):
        with pytest.raises(RecipeInvalid) as caught:
            build_submission({**base, "job_uuid": bad})
        assert caught.value.field == "job_uuid"


def test_renaming_keeps_the_reason():
    error = refusal({"method": "sft", "optimizer": {"lr": -1}})
    renamed = error.renamed({"optimizer.lr": "training_config.optimizer_config.lr"})
    assert renamed.detail == f"training_config.optimizer_config.lr: {error.reason}"


recipes = st.builds(
    lambda method, epochs, lr, batch, lora, rank, tensorboard, dtype: build_recipe({
        "method": method, "schedule": {"n_epochs": epochs}, "optimizer": {"lr": lr}, "data": {"batch_size": batch},
        "adapter": ({"attention": ["q_proj"], "rank": rank} if lora or method == "dpo" else None),
        "dpo": {} if method == "dpo" else None, "tensorboard": tensorboard, "dtype": dtype,
    }),
    st.sampled_from(["sft", "dpo"]), st.integers(1, 50), st.floats(1e-8, 1.0), st.integers(1, 64), st.booleans(),
    st.integers(1, 256), st.booleans(), st.sampled_from(["bf16", "fp16", "fp32"]),
)


@given(recipes)
def test_a_recipe_survives_the_store_and_the_spec_file(recipe: Recipe):
    plan = JobPlan(recipe=recipe, model="/m", output_dir="/o", train_rows_path="/t.jsonl")
    spec = TrainerSpec(job_uuid="j", plan=plan, device="cpu", threads=1)
    assert TrainerSpec.model_validate_json(spec.model_dump_json()) == spec
    assert JobPlan.model_validate(plan.model_dump(mode="json")) == plan
    assert spec.recipe is spec.plan.recipe
