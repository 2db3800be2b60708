"""Trainer specs for tests and benchmarks, written the way a person reads them: in the Llama Stack
request's terms (``training_config``, ``algorithm_config``, ``logger_config``) beside the plan's
paths and the worker's switches, a "draft". ``typed_spec_file`` turns a draft into the real
``TrainerSpec`` file through the real Llama Stack door (``api/llama_stack_recipes.py``), so a
trainer test also checks that what a client sends becomes the recipe the trainer reads.
``finish`` reads a started trainer's events to its end.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.api.llama_stack_recipes import dpo_submission, sft_submission
from posttrain.api.schemas import PreferenceOptimizeRequest, SupervisedFineTuneRequest
from posttrain.domain.recipes import JobPlan, LoRA, TrainerSpec

PLAN_KEYS = ("model", "adapter", "output_dir", "train_rows_path", "validation_rows_path")
WORKER_KEYS = ("device", "cuda_visible_devices", "cpu_bf16", "compile", "resume_dir", "resume_every_seconds",
               "threads", "trust_remote_code", "save_merged")


def _lora(algorithm: dict[str, Any]) -> dict[str, Any]:
    return {"apply_lora_to_mlp": False, "apply_lora_to_output": False, **algorithm}


def lora_recipe(algorithm: dict[str, Any]) -> LoRA:
    """The recipe's ``LoRA`` for a Llama Stack ``LoraFinetuningConfig`` dict, through the door."""
    body = {"job_uuid": "x", "model": "/m", "hyperparam_search_config": {}, "logger_config": {},
            "training_config": {"n_epochs": 1, "data_config": {"dataset_id": "d", "batch_size": 1, "shuffle": True,
                                                               "data_format": "instruct"}},
            "algorithm_config": {"type": "LoRA", "rank": 8, "alpha": 16, **_lora(algorithm)}}
    adapter = sft_submission(SupervisedFineTuneRequest.model_validate_json(json.dumps(body))).recipe.adapter
    assert adapter is not None
    return adapter


def _complete(training: dict[str, Any]) -> dict[str, Any]:
    """A draft's training_config with what the spec requires of a request and a draft may leave
    out (the old hand-written specs did): shuffle, data_format and the optimizer's fields."""
    data = {"shuffle": True, "data_format": "instruct", **(training.get("data_config") or {})}
    optimizer = training.get("optimizer_config")
    if optimizer is not None:
        optimizer = {"optimizer_type": "adamw", "weight_decay": 0.0, "num_warmup_steps": 0, **optimizer}
    return {**training, "data_config": data, **({"optimizer_config": optimizer} if optimizer is not None else {})}


def typed_spec(draft: dict[str, Any]) -> TrainerSpec:
    """The ``TrainerSpec`` a draft describes."""
    common = {"job_uuid": draft["job_uuid"], "training_config": _complete(draft["training_config"]),
              "hyperparam_search_config": {}, "logger_config": draft.get("logger_config") or {}}
    algorithm = draft.get("algorithm_config")
    if draft["method"] == "dpo":
        dpo = {key: algorithm[key] for key in ("beta", "loss_type")} if algorithm else {"beta": 0.1}
        body = {**common, "finetuned_model": draft["model"], "algorithm_config": dpo}
        recipe = dpo_submission(PreferenceOptimizeRequest.model_validate_json(json.dumps(body))).recipe
        if algorithm and algorithm.get("lora"):  # a draft may name the DPO adapter's own options
            sft = {**common, "algorithm_config": _lora(algorithm["lora"])}
            adapter = sft_submission(SupervisedFineTuneRequest.model_validate_json(json.dumps(sft))).recipe.adapter
            recipe = recipe.model_copy(update={"adapter": adapter})
    else:
        if algorithm is not None and algorithm.get("type", "LoRA") == "LoRA":
            algorithm = _lora(algorithm)
        body = {**common, "model": draft["model"], "algorithm_config": algorithm}
        recipe = sft_submission(SupervisedFineTuneRequest.model_validate_json(json.dumps(body))).recipe
    if "seed" in draft:
        recipe = recipe.model_copy(update={"seed": draft["seed"]})
    plan = JobPlan(recipe=recipe, **{key: draft.get(key) for key in PLAN_KEYS})
    return TrainerSpec(job_uuid=draft["job_uuid"], plan=plan,
                       **{key: draft[key] for key in WORKER_KEYS if draft.get(key) is not None})


def typed_spec_file(draft_path: Path) -> Path:
    """Write the typed spec of the draft at ``draft_path`` beside it; return its path. A file that
    already is a typed spec (it has a ``plan``) is returned as it is."""
    draft = json.loads(draft_path.read_text())
    if "plan" in draft:
        return draft_path
    typed = draft_path.with_name(draft_path.stem + ".typed.json")
    typed.write_text(typed_spec(draft).model_dump_json(indent=2))
    return typed


def finish(proc: subprocess.Popen, *, timeout: float = 90, kill: Callable[[], None] | None = None,
           ) -> tuple[list[dict], int]:
    """Read every event (each stdout line must be JSON) with stdin still open, then reap; past
    ``timeout`` the trainer is killed (``kill``: how, e.g. its whole process group; default
    ``proc.kill``).

    Not ``communicate()``: it closes stdin first, which the trainer rightly takes as "stop".
    """
    killer = threading.Timer(timeout, kill or proc.kill)
    killer.start()
    try:
        out = proc.stdout.read()
        code = proc.wait()
    finally:
        killer.cancel()
        proc.stdin.close()
        proc.stdout.close()
    return [json.loads(line) for line in out.splitlines()], code
