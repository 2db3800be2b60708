"""Our own reinforcement door over HTTP through the real app and stores: a body with a grader and
GRPO knobs becomes a GRPO recipe, the job is an ordinary one on the Llama Stack paths, and bad
graders, knobs and shapes are refused with an RFC 7807 body naming the field, leaving nothing."""

from __future__ import annotations

import uuid

import pytest

from tests.integration.test_api import assert_problem, register

PATH = "/v1/posttrain/reinforcement-fine-tune"
GRADER = {"type": "string_check", "name": "is_red", "input": "{{sample.output_text}}",
          "reference": "{{item.answer}}", "operation": "eq"}
ROWS = [{"messages": [{"role": "user", "content": f"Colour of thing {i}?"}], "answer": "red"} for i in range(4)]


def rft_request(model: str, dataset_id: str, **overrides) -> dict:
    body = {
        "job_uuid": str(uuid.uuid4()),
        "model": model,
        "training_config": {
            "n_epochs": 1, "max_steps_per_epoch": 2,
            "data_config": {"dataset_id": dataset_id, "batch_size": 2, "shuffle": False, "data_format": "dialog"},
            "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-3, "weight_decay": 0.0, "num_warmup_steps": 0},
        },
        "algorithm_config": {"type": "LoRA", "lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": False,
                             "apply_lora_to_output": False, "rank": 4, "alpha": 8},
        "grader": GRADER,
        "grpo": {"num_generations": 4, "beta": 0.04, "loss_type": "dr_grpo", "temperature": 0.8,
                 "max_completion_length": 8, "eval_interval": 2, "eval_samples": 2},
    }
    body.update(overrides)
    return body


def test_a_reinforcement_job_is_a_grpo_job_on_the_llama_stack_paths(client, services, tiny_model_path):
    register(client, "rft", rows=ROWS)
    body = rft_request(str(tiny_model_path), "rft")
    response = client.post(PATH, json=body)
    assert response.status_code == 200, response.text
    assert response.json() == {"job_uuid": body["job_uuid"]}
    job = services.jobs.get(tenant="default", job_uuid=body["job_uuid"])
    recipe = job.plan.recipe
    assert job.kind.value == "grpo" and recipe.adapter is not None and recipe.adapter.rank == 4
    grpo = recipe.grpo
    assert grpo.grader == GRADER and grpo.num_generations == 4 and grpo.beta == 0.04
    assert grpo.loss_type == "dr_grpo" and grpo.temperature == 0.8 and grpo.max_completion_length == 8
    assert grpo.eval_interval == 2 and grpo.eval_samples == 2 and grpo.epsilon == 0.2  # the recipe's default
    assert recipe.schedule.n_epochs == 1 and recipe.optimizer.lr == 1e-3
    status = client.get("/v1/post-training/job/status", params={"job_uuid": body["job_uuid"]}).json()
    assert status["status"] == "scheduled" and status["checkpoints"] == []
    assert {"job_uuid": body["job_uuid"]} in client.get("/v1/post-training/jobs").json()["data"]


def test_without_algorithm_config_every_weight_trains(client, services, tiny_model_path):
    register(client, "rft", rows=ROWS)
    body = rft_request(str(tiny_model_path), "rft", grpo={"beta": 0})
    del body["algorithm_config"]
    assert client.post(PATH, json=body).status_code == 200
    recipe = services.jobs.get(tenant="default", job_uuid=body["job_uuid"]).plan.recipe
    assert recipe.adapter is None and recipe.grpo.num_generations == 4  # the recipe's default


@pytest.mark.parametrize(("change", "words"), [
    ({"grader": {**GRADER, "operation": "sounds_like"}}, ["grader.operation"]),
    ({"grader": {"type": "telepathy"}}, ["grader.type"]),
    ({"grader": {"type": "score_model", "name": "j", "model": "x", "input": [{"role": "user", "content": "Rate"}],
                 "range": [0, 1]}}, ["grader.model", "The model 'x' does not exist", "judge"]),
    ({"grpo": {"num_generations": 1}}, ["grpo.num_generations"]),
    ({"grpo": {"epsilon": 1.5}}, ["grpo.epsilon"]),
    ({"grpo": {"loss_type": "ppo"}}, ["loss_type"]),
    ({"grpo": {"top_k": 5}}, ["top_k"]),
    ({"grpo": {"num_generations": 4, "max_completion_length": 0}}, ["grpo.max_completion_length"]),
    ({"logger_config": {"type": "wandb"}}, ["logger_config"]),
    ({"hyperparam_search_config": {"lr": [1, 2]}}, ["hyperparam_search_config"]),
])
def test_bad_graders_and_knobs_are_400_and_leave_nothing(client, services, tiny_model_path, change, words):
    register(client, "rft", rows=ROWS)
    response = client.post(PATH, json=rft_request(str(tiny_model_path), "rft", **change))
    assert_problem(response, 400, *words)
    assert services.jobs.list(tenant="default") == []


def test_full_fine_tune_with_kl_refused(client, services, tiny_model_path):
    register(client, "rft", rows=ROWS)
    body = rft_request(str(tiny_model_path), "rft")
    del body["algorithm_config"]
    assert_problem(client.post(PATH, json=body), 400, "grpo.beta", "LoRA")


def test_unknown_dataset_and_missing_grader(client, services, tiny_model_path):
    assert_problem(client.post(PATH, json=rft_request(str(tiny_model_path), "nope")), 400,
                   "training_config.data_config.dataset_id", "nope")
    register(client, "rft", rows=ROWS)
    body = rft_request(str(tiny_model_path), "rft")
    del body["grader"]
    assert_problem(client.post(PATH, json=body), 400, "grader")
    assert services.jobs.list(tenant="default") == []


def test_on_a_keyed_server_python_graders_are_refused_and_datasets_stay_the_tenants(keyed_client, tiny_model_path):
    from tests.integration.test_openai_api import ALICE, BOB, as_

    registered = keyed_client.post("/v1/datasets", headers=as_(ALICE), json={
        "purpose": "post-training/messages", "dataset_id": "alice-rft", "source": {"type": "rows", "rows": ROWS}})
    assert registered.status_code == 200, registered.text
    python = {"type": "python", "name": "py", "source": "def grade(sample, item):\n    return 1.0\n"}
    refused = keyed_client.post(PATH, headers=as_(ALICE), json=rft_request(str(tiny_model_path), "alice-rft",
                                                                           grader=python))
    assert_problem(refused, 400, "grader.type", "POSTTRAIN_ALLOW_PYTHON_GRADERS")
    assert keyed_client.post(PATH, json=rft_request(str(tiny_model_path), "alice-rft")).status_code == 401
    theirs = keyed_client.post(PATH, headers=as_(BOB), json=rft_request(str(tiny_model_path), "alice-rft"))
    assert_problem(theirs, 400, "no dataset with id 'alice-rft'")
    assert keyed_client.get("/v1/post-training/jobs", headers=as_(ALICE)).json()["data"] == []
    assert keyed_client.get("/v1/post-training/jobs", headers=as_(BOB)).json()["data"] == []


@pytest.mark.parametrize(("row", "words"), [
    ({"messages": [{"role": "user", "content": "Pick a colour."}, {"role": "assistant", "content": "red"}],
      "answer": "red"}, ["row 1", "last message is the assistant's"]),
    ({"messages": [{"role": "user", "content": 3}]}, ["row 1", "string 'role' and 'content'"]),
])
def test_a_row_that_is_no_prompt_is_refused_at_submit_naming_it(client, services, tiny_model_path, row, words):
    register(client, "rft-bad", rows=[ROWS[0], row])  # both fit the dialog layout, so both register
    response = client.post(PATH, json=rft_request(str(tiny_model_path), "rft-bad"))
    assert_problem(response, 400, "training_config.data_config.dataset_id", "rft-bad", *words)
    assert services.jobs.list(tenant="default") == []
    assert not list(services.settings.jobs_dir.glob("*/train.jsonl"))
