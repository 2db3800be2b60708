"""logger_config over the real app: a TensorBoard log is accepted and planned, every other logger is
refused with a 400 that says what is supported, and a refused request leaves nothing behind."""

from __future__ import annotations

import pytest

from posttrain.services.access import DEFAULT_TENANT
from tests.integration.test_api import PREFERENCES, assert_problem, dpo_request, lora_request, register

SFT = "/v1/post-training/supervised-fine-tune"
DPO = "/v1/post-training/preference-optimize"


def planned_logger(services, job_uuid: str):
    """The logger the job's recipe asks for, in the one normalized form the trainer reads."""
    recipe = services.jobs.store.find(tenant=DEFAULT_TENANT, job_uuid=job_uuid).plan.recipe
    return {"type": "tensorboard"} if recipe.tensorboard else None


@pytest.mark.parametrize(
    ("logger_config", "planned"),
    [
        ({}, None),
        ({"type": "tensorboard"}, {"type": "tensorboard"}),
        ({"type": "TensorBoard"}, {"type": "tensorboard"}),
        ({"tensorboard": True}, {"type": "tensorboard"}),
        ({"tensorboard": False}, None),
    ],
)
def test_tensorboard_or_nothing_is_accepted_and_planned(client, services, tiny_model_path, logger_config, planned):
    register(client)
    body = lora_request(str(tiny_model_path), "toy", logger_config=logger_config)
    response = client.post(SFT, json=body)
    assert response.status_code == 200, response.text
    assert planned_logger(services, body["job_uuid"]) == planned
    # The client's own words stay in the stored request; the plan holds the one normalized form.
    assert services.jobs.store.find(tenant=DEFAULT_TENANT, job_uuid=body["job_uuid"]).request["logger_config"] == logger_config


def test_preference_optimize_takes_a_tensorboard_log_too(client, services, tiny_model_path):
    register(client, "prefs", rows=PREFERENCES)
    body = {**dpo_request(str(tiny_model_path), "prefs"), "logger_config": {"type": "tensorboard"}}
    assert client.post(DPO, json=body).status_code == 200
    assert planned_logger(services, body["job_uuid"]) == {"type": "tensorboard"}


@pytest.mark.parametrize(
    ("logger_config", "named"),
    [
        ({"type": "wandb"}, "'wandb'"),
        ({"foo": 1}, "foo"),
        ({"wandb": True}, "wandb"),
        ({"type": "tensorboard", "log_dir": "/tmp/elsewhere"}, "log_dir"),
        ({"tensorboard": "yes"}, "tensorboard"),
        ({"type": 3}, "3"),
    ],
)
@pytest.mark.parametrize("endpoint", [SFT, DPO])
def test_other_loggers_are_refused_and_leave_nothing(client, settings, tiny_model_path, logger_config, named, endpoint):
    register(client, "prefs", rows=PREFERENCES)
    register(client)
    body = (lora_request(str(tiny_model_path), "toy") if endpoint == SFT
            else dpo_request(str(tiny_model_path), "prefs"))
    body["logger_config"] = logger_config
    problem = assert_problem(client.post(endpoint, json=body), 400, "logger_config", '{"type": "tensorboard"}', named)
    assert problem["title"] == "Bad Request"
    assert client.get("/v1/post-training/jobs").json() == {"data": []}
    assert list(settings.jobs_dir.iterdir()) == []


def test_an_unknown_search_key_is_named_before_the_logger_is_looked_at(client, settings, tiny_model_path):
    register(client)
    body = lora_request(str(tiny_model_path), "toy", hyperparam_search_config={"trials": 4},
                        logger_config={"type": "tensorboard"})
    assert_problem(client.post(SFT, json=body), 400, "hyperparam_search_config", "trials")
    assert client.get("/v1/post-training/jobs").json() == {"data": []}
    assert list(settings.jobs_dir.iterdir()) == []
