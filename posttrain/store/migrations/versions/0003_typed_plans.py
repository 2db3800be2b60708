"""Job plans hold the typed recipe (``domain.recipes.JobPlan``) instead of Llama Stack-shaped dicts.

Until 0002 a plan kept the request's ``training_config`` and ``algorithm_config`` (defaults filled
in) and ``logger_config``; now it keeps ``recipe``. Every stored plan is rewritten, so a job queued
or running before the upgrade trains afterwards exactly as it would have: its DPO adapter keeps
the q/k/v/o targets it was planned with. The conversion is spelled out here rather than imported,
so this revision keeps doing what it did when the code around it changes. A plan that is not in
the old shape (already converted, or empty) is left as it is.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

PLAN_PATHS = ("model", "adapter", "output_dir", "train_rows_path", "validation_rows_path")
SCHEDULE = ("n_epochs", "max_steps_per_epoch", "gradient_accumulation_steps", "max_validation_steps")
DATA = ("batch_size", "shuffle", "data_format", "packed", "train_on_input")
OPTIMIZER = ("optimizer_type", "lr", "weight_decay", "num_warmup_steps")
ATTENTION = {"o_proj": "output_proj"}


def _adapter(lora: dict[str, Any]) -> dict[str, Any]:
    return {"attention": [ATTENTION.get(m, m) for m in lora.get("lora_attn_modules") or []],
            "architecture_defaults": False, "mlp": bool(lora.get("apply_lora_to_mlp")),
            "output": bool(lora.get("apply_lora_to_output")), "rank": int(lora.get("rank") or 8),
            "alpha": int(lora.get("alpha") or 16), "use_dora": bool(lora.get("use_dora")),
            "quantize_base": bool(lora.get("quantize_base"))}


def typed_plan(old: dict[str, Any]) -> dict[str, Any]:
    """A 0002-era plan as a ``JobPlan`` dict."""
    training = old["training_config"]
    algorithm: Any = old.get("algorithm_config")  # None only for a full fine-tune; a DPO plan always holds one
    data = training.get("data_config") or {}
    optimizer = training.get("optimizer_config") or {}
    recipe: dict[str, Any] = {
        "method": old["method"],
        "schedule": {key: training[key] for key in SCHEDULE if training.get(key) is not None},
        "data": {key: data[key] for key in DATA if data.get(key) is not None},
        "optimizer": {key: optimizer[key] for key in OPTIMIZER if optimizer.get(key) is not None},
        "dtype": training.get("dtype") or "bf16",
        "activation_checkpointing": bool((training.get("efficiency_config") or {}).get("enable_activation_checkpointing")),
        "adapter": None, "qat": None, "dpo": None,
        "tensorboard": bool(old.get("logger_config")),
        "seed": int(old.get("seed", 42)),
        "notes": [],
    }
    if old["method"] == "dpo":
        recipe["dpo"] = {"beta": algorithm["beta"], "loss_type": algorithm["loss_type"]}
        recipe["adapter"] = _adapter(algorithm["lora"])
        if algorithm.get("legacy_config") is not None:
            recipe["notes"] = [(f"the request's DPO options {sorted(algorithm['legacy_config'])} have no DPO meaning; "
                                f"training with beta={algorithm['beta']}, loss_type={algorithm['loss_type']}")]
    elif algorithm is not None and algorithm.get("type") == "QAT":
        recipe["qat"] = {"quantizer_name": algorithm["quantizer_name"], "group_size": algorithm["group_size"]}
    elif algorithm is not None:
        recipe["adapter"] = _adapter(algorithm)
    return {"recipe": recipe, **{key: old.get(key) for key in PLAN_PATHS}}


def old_plan(new: dict[str, Any]) -> dict[str, Any]:
    """A ``JobPlan`` dict in 0002's shape (for the downgrade)."""
    recipe = new["recipe"]
    training = {**recipe["schedule"], "data_config": dict(recipe["data"]), "optimizer_config": dict(recipe["optimizer"]),
                "efficiency_config": {"enable_activation_checkpointing": recipe["activation_checkpointing"]},
                "dtype": recipe["dtype"]}
    algorithm = None
    adapter = recipe.get("adapter")
    if adapter is not None:
        algorithm = {"type": "LoRA", "lora_attn_modules": adapter["attention"] or ["q_proj", "k_proj", "v_proj", "output_proj"],
                     "apply_lora_to_mlp": adapter["mlp"], "apply_lora_to_output": adapter["output"],
                     "rank": adapter["rank"], "alpha": adapter["alpha"], "use_dora": adapter["use_dora"],
                     "quantize_base": adapter["quantize_base"]}
    if recipe.get("qat") is not None:
        algorithm = {"type": "QAT", **recipe["qat"]}
    if recipe["method"] == "dpo":
        algorithm = {**recipe["dpo"], "lora": algorithm}
    return {"method": recipe["method"], **{key: new.get(key) for key in PLAN_PATHS}, "training_config": training,
            "algorithm_config": algorithm, "logger_config": {"type": "tensorboard"} if recipe["tensorboard"] else None,
            "seed": recipe["seed"]}


def _rewrite(convert: Callable[[dict[str, Any]], dict[str, Any]], wanted_key: str) -> None:
    jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("plan", sa.JSON))
    conn = op.get_bind()
    for job_id, plan in conn.execute(sa.select(jobs.c.id, jobs.c.plan)).all():
        if isinstance(plan, str):
            plan = json.loads(plan)
        if isinstance(plan, dict) and wanted_key in plan:
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(plan=convert(plan)))


def upgrade() -> None:
    _rewrite(typed_plan, "training_config")


def downgrade() -> None:
    _rewrite(old_plan, "recipe")
