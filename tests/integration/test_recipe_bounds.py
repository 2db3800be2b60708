"""Sizes in a training request are bounded: one job cannot ask for what no machine holds.

Through the real app: absurd values fail fast against the recipe's static bounds (naming the
request's field and the bound), and a LoRA rank the model cannot use is refused at submit with
the adapter's estimated size in parameters and bytes; every refusal leaves nothing behind."""

from __future__ import annotations

import json

import pytest

from posttrain.domain.recipes import MAX_LORA_RANK, build_recipe
from tests.integration.test_api import assert_problem, lora_request, register

SFT = "/v1/post-training/supervised-fine-tune"


def refused(client, settings, body, *words):
    problem = assert_problem(client.post(SFT, json=body), 400, *words)
    assert client.get("/v1/post-training/jobs").json() == {"data": []}
    assert list(settings.jobs_dir.iterdir()) == []
    return problem


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda b: b["algorithm_config"].update(rank=2**40), ["algorithm_config.rank", str(MAX_LORA_RANK)]),
        (lambda b: b["algorithm_config"].update(alpha=2**40), ["algorithm_config.alpha"]),
        (lambda b: b["training_config"].update(n_epochs=10**9), ["training_config.n_epochs", "10000"]),
        (lambda b: b["training_config"].update(max_steps_per_epoch=10**12), ["training_config.max_steps_per_epoch"]),
        (lambda b: b["training_config"].update(gradient_accumulation_steps=10**9),
         ["training_config.gradient_accumulation_steps"]),
        (lambda b: b["training_config"].update(max_validation_steps=10**12), ["training_config.max_validation_steps"]),
        (lambda b: b["training_config"]["data_config"].update(batch_size=10**9),
         ["training_config.data_config.batch_size"]),
    ],
)
def test_absurd_sizes_fail_fast_against_the_recipes_bounds(client, settings, tiny_model_path, change, words):
    register(client)
    body = lora_request(str(tiny_model_path), "toy")
    change(body)
    refused(client, settings, body, "less than or equal", *words)


def test_a_rank_above_the_models_hidden_size_is_refused_with_the_estimate(client, settings, tiny_model_path):
    register(client)
    hidden = json.loads((tiny_model_path / "config.json").read_text())["hidden_size"]
    body = lora_request(str(tiny_model_path), "toy")
    body["algorithm_config"].update(rank=hidden + 1)
    problem = refused(client, settings, body, f"rank {hidden + 1}", f"hidden size {hidden}", "parameters", "bytes")
    # q_proj and v_proj on every layer: rank * (in + out) each.
    layers = json.loads((tiny_model_path / "config.json").read_text())["num_hidden_layers"]
    estimate = (hidden + 1) * (hidden + hidden) * 2 * layers
    assert f"{estimate:,} parameters" in problem["detail"]
    assert f"{estimate * 4:,} bytes" in problem["detail"]


def test_an_adapter_larger_than_its_base_model_is_refused(client, settings, tiny_model_path):
    register(client)
    config = json.loads((tiny_model_path / "config.json").read_text())
    body = lora_request(str(tiny_model_path), "toy")
    body["algorithm_config"].update(rank=config["hidden_size"], apply_lora_to_mlp=True, apply_lora_to_output=True,
                                    lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"])
    refused(client, settings, body, "more than the base model", "parameters", "bytes")


def test_the_largest_sensible_rank_is_accepted(client, tiny_model_path):
    register(client)
    body = lora_request(str(tiny_model_path), "toy")
    body["algorithm_config"].update(rank=json.loads((tiny_model_path / "config.json").read_text())["hidden_size"])
    assert client.post(SFT, json=body).status_code == 200


def test_the_bounds_are_generous():
    """What real jobs ask for stays valid: the bounds are far above them."""
    build_recipe({"method": "sft", "adapter": {"attention": ["q_proj"], "rank": MAX_LORA_RANK, "alpha": 2 * 4096},
                  "schedule": {"n_epochs": 1000, "max_steps_per_epoch": 1_000_000, "gradient_accumulation_steps": 1024,
                               "max_validation_steps": 100_000},
                  "data": {"batch_size": 4096}})
