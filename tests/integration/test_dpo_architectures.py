"""DPO on architectures without Llama's q/k/v/o layers: GPT-2 (``Conv1D`` ``c_attn``) trains on
peft's default targets; a model type with neither is refused at submit. Real app, real trainer."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest

from tests.fixtures_tiny import build_tiny_gpt2
from tests.integration.test_dpo_trainer import finish, kinds, metrics_of, preference_rows, start, stderr_tail

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="session")
def tiny_gpt2_path(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_mamba_path(tmp_path_factory) -> Path:
    """A real model type peft has no default LoRA targets for, with no attention layers at all
    (``in_proj``, ``x_proj``, ``dt_proj``, ``out_proj``). Beside the tiny Llama, in the model roots."""
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    path = tmp_path_factory.getbasetemp() / "tiny-mamba"
    if not path.exists():
        torch.manual_seed(0)
        config = MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2)
        MambaForCausalLM(config).save_pretrained(path)
    return path


def dpo_request(model: str, dataset_id: str) -> dict:
    return {
        "job_uuid": str(uuid.uuid4()), "finetuned_model": model, "hyperparam_search_config": {}, "logger_config": {},
        "algorithm_config": {"beta": 0.1, "loss_type": "sigmoid"},
        "training_config": {"n_epochs": 1, "max_steps_per_epoch": 1, "gradient_accumulation_steps": 1,
                            "data_config": {"dataset_id": dataset_id, "batch_size": 1, "shuffle": False,
                                            "data_format": "dialog"}},
    }


def register_preferences(client) -> str:
    response = client.post("/v1/datasets", json={"purpose": "post-training/messages",
                                                 "source": {"type": "rows", "rows": preference_rows()}})
    assert response.status_code == 200, response.text
    return response.json()["identifier"]


def test_peft_default_targets_are_read_without_importing_peft():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    from posttrain.services.models import peft_default_lora_targets

    assert peft_default_lora_targets() == TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    assert peft_default_lora_targets()["gpt2"] == ["c_attn"]


def test_dpo_on_a_model_type_with_no_lora_targets_is_refused_at_submit(client, tiny_mamba_path):
    dataset_id = register_preferences(client)
    response = client.post("/v1/post-training/preference-optimize", json=dpo_request(str(tiny_mamba_path), dataset_id))
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert "finetuned_model" in detail and "'mamba'" in detail and "no default LoRA targets" in detail
    assert client.get("/v1/post-training/jobs").json() == {"data": []}


def test_dpo_on_gpt2_and_llama_is_accepted_at_submit(client, tiny_gpt2_path, tiny_model_path):
    dataset_id = register_preferences(client)
    for model in (tiny_gpt2_path, tiny_model_path):
        response = client.post("/v1/post-training/preference-optimize", json=dpo_request(str(model), dataset_id))
        assert response.status_code == 200, response.text
    assert len(client.get("/v1/post-training/jobs").json()["data"]) == 2


def test_sft_lora_names_are_not_replaced_by_defaults(tiny_gpt2_path):
    """Only ``default_targets`` falls back: an explicit q_proj on GPT-2 still fails, naming the layer."""
    from transformers import AutoModelForCausalLM

    from posttrain.domain.recipes import DPO_ADAPTER, LoRA
    from posttrain.trainer.adapters import lora_target_modules
    from posttrain.trainer.errors import TrainerConfigError

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path)
    assert lora_target_modules(model, DPO_ADAPTER) == ["c_attn"]
    with pytest.raises(TrainerConfigError, match="'q_proj' matches no linear layer"):
        lora_target_modules(model, LoRA(attention=("q_proj", "k_proj", "v_proj", "output_proj")))


@pytest.mark.slow
def test_dpo_trains_gpt2_on_peft_default_targets(tmp_path, tiny_gpt2_path):
    """The DPO recipe's own adapter (the architecture's default targets) on GPT-2, through the
    trainer process."""
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in preference_rows()))
    spec = {
        "job_uuid": "dpo-gpt2", "method": "dpo", "model": str(tiny_gpt2_path), "adapter": None,
        "output_dir": str(tmp_path / "out"), "train_rows_path": str(rows), "validation_rows_path": None,
        "training_config": {
            "n_epochs": 1, "max_steps_per_epoch": 3, "gradient_accumulation_steps": 1, "max_validation_steps": 1,
            "data_config": {"dataset_id": "prefs", "batch_size": 2, "shuffle": False, "data_format": "dialog"},
            "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-2, "weight_decay": 0.0, "num_warmup_steps": 0},
            "dtype": "bf16"},
        "algorithm_config": {"beta": 0.1, "loss_type": "sigmoid"},
        "device": "cpu", "threads": 1, "seed": 0, "trust_remote_code": False,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    events, code = finish(start(tmp_path / "spec.json", tmp_path), timeout=180)
    assert code == 0, stderr_tail(tmp_path)
    assert kinds(events) == ["started", "metric", "metric", "metric", "checkpoint", "completed"], stderr_tail(tmp_path)
    resources = events[0]["resources"]
    assert 0 < resources["trainable_parameters"] < resources["parameters"]
    metrics = metrics_of(events)
    # ln 2 at step 1: a new adapter, so policy == reference, and dropout (GPT-2's is 0.1, as
    # distilgpt2's) is off in DPO, as TRL turns it off, or the policy's forward would differ.
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=2e-3)
    assert all(math.isfinite(m["loss"]) for m in metrics) and metrics[-1]["loss"] != metrics[0]["loss"]
    adapter = json.loads((tmp_path / "out" / "epoch_1" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["c_attn"] and adapter["fan_in_fan_out"] is True
