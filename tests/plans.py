"""A small valid ``JobPlan`` for store and worker tests that need a job but train nothing."""

from __future__ import annotations

from posttrain.domain.recipes import DPO_ADAPTER, JobPlan, build_recipe


def a_plan(method: str = "sft", *, folder: str = "/nowhere/job") -> JobPlan:
    recipe = build_recipe({"method": method, **({"dpo": {}, "adapter": DPO_ADAPTER.model_dump()} if method == "dpo" else {})})
    return JobPlan(recipe=recipe, model="/nowhere/model", output_dir=f"{folder}/checkpoints",
                   train_rows_path=f"{folder}/train.jsonl")
