"""OpenAI's reinforcement method over HTTP through the real app and stores: a job with a grader and
its hyperparameters is accepted as a GRPO recipe (``auto`` resolved, the training lines kept with
their reference fields), and bad knobs, graders and lines are refused 400 naming the param, leaving
nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_openai_api import ALICE, as_, assert_openai_error, create_job, upload

RFT_LINES = "".join(json.dumps({"messages": [{"role": "developer", "content": "Answer with a colour."},
                                             {"role": "user", "content": f"Colour of thing {i}?"}],
                                "answer": "red", "meta": {"id": i}}) + "\n" for i in range(6)).encode()
GRADER = {"type": "string_check", "name": "is_red", "input": "{{sample.output_text}}",
          "reference": "{{item.answer}}", "operation": "eq"}


def _method(grader: dict | None = None, **hyperparameters) -> dict:
    body: dict = {"grader": grader or GRADER}
    if hyperparameters:
        body["hyperparameters"] = hyperparameters
    return {"type": "reinforcement", "reinforcement": body}


def test_a_reinforcement_job_is_accepted_as_a_grpo_recipe(client, services, tiny_model_path):
    file = upload(client, RFT_LINES).json()
    created = create_job(client, tiny_model_path, file["id"], method=_method(
        n_epochs=2, batch_size=3, learning_rate_multiplier=2, compute_multiplier=2, eval_interval=5,
        eval_samples="auto"))
    assert created.status_code == 200, created.text
    job = created.json()
    hyper = {"n_epochs": 2, "batch_size": 3, "learning_rate_multiplier": 2.0, "compute_multiplier": 2.0,
             "eval_interval": 5, "eval_samples": 4, "reasoning_effort": "default"}
    assert job["method"] == {"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": hyper}}
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 3, "learning_rate_multiplier": 2.0}
    stored = services.jobs.get(tenant="default", job_uuid=job["id"])
    recipe = stored.plan.recipe
    assert stored.kind.value == "grpo" and recipe.grpo is not None and recipe.adapter is not None
    assert recipe.grpo.grader == GRADER and recipe.grpo.num_generations == 8  # 4 at compute_multiplier 1
    assert recipe.grpo.eval_interval == 5 and recipe.grpo.eval_samples == 4
    assert recipe.schedule.n_epochs == 2 and recipe.schedule.max_steps_per_epoch == 2
    assert recipe.optimizer.lr == pytest.approx(2e-4)
    first = json.loads(Path(stored.plan.train_rows_path).read_text().splitlines()[0])
    assert first == {"messages": [{"role": "system", "content": "Answer with a colour."},
                                  {"role": "user", "content": "Colour of thing 0?"}], "answer": "red", "meta": {"id": 0}}
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["method"]["type"] == "reinforcement"


def test_auto_everything_and_reasoning_effort_noted(client, services, tiny_model_path):
    file = upload(client, RFT_LINES).json()
    job = create_job(client, tiny_model_path, file["id"], method=_method(reasoning_effort="high")).json()
    recipe = services.jobs.get(tenant="default", job_uuid=job["id"]).plan.recipe
    assert recipe.grpo.num_generations == 4 and recipe.schedule.n_epochs == 3 and recipe.data.batch_size == 4
    assert any("reasoning_effort" in note for note in recipe.notes)


@pytest.mark.parametrize(("method", "param", "words"), [
    ({"type": "reinforcement"}, "method.reinforcement", ["grader"]),
    ({"type": "reinforcement", "reinforcement": {}}, "method.reinforcement.grader", []),
    (_method(n_epochs=0), "method.reinforcement.hyperparameters.n_epochs", ["1 to 50"]),
    (_method(batch_size=1000), "method.reinforcement.hyperparameters.batch_size", ["1 to 256"]),
    (_method(learning_rate_multiplier=0), "method.reinforcement.hyperparameters.learning_rate_multiplier",
     ["above 0"]),
    (_method(compute_multiplier=0), "method.reinforcement.hyperparameters.compute_multiplier", ["above 0"]),
    (_method(compute_multiplier=11), "method.reinforcement.hyperparameters.compute_multiplier", ["at most"]),
    (_method(eval_interval=0), "method.reinforcement.hyperparameters.eval_interval", ["at least 1"]),
    (_method(eval_samples=0), "method.reinforcement.hyperparameters.eval_samples", ["1 to"]),
    (_method(reasoning_effort="extreme"), "method.reinforcement.hyperparameters.reasoning_effort", []),
    (_method(beta=0.1), "method.reinforcement.hyperparameters.beta", []),
    (_method({"type": "score_model", "name": "j", "model": "x", "input": [{"role": "user", "content": "Rate it"}]}),
     "method.reinforcement.grader.model", ["The model 'x' does not exist", "judge"]),
    (_method({"type": "telepathy"}), "method.reinforcement.grader.type", []),
    ({"type": "reinforcement", "reinforcement": {"grader": GRADER}, "dpo": {}}, "method.dpo", ["method.reinforcement"]),
])
def test_bad_knobs_are_400_naming_the_param(client, services, tiny_model_path, method, param, words):
    file = upload(client, RFT_LINES).json()
    assert_openai_error(create_job(client, tiny_model_path, file["id"], method=method), 400, *words, param=param)
    assert services.jobs.list_jobs(tenant="default") == []


def test_top_level_hyperparameters_refused_for_reinforcement(client, services, tiny_model_path):
    file = upload(client, RFT_LINES).json()
    response = create_job(client, tiny_model_path, file["id"], method=_method(), hyperparameters={"n_epochs": 1})
    assert_openai_error(response, 400, "method.reinforcement.hyperparameters", param="hyperparameters")


@pytest.mark.parametrize(("line", "code"), [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]},
     "invalid_last_message"),
    ({"answer": "red"}, "missing_messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "unsupported_feature"),
])
def test_a_bad_training_line_is_refused_naming_the_line(client, services, tiny_model_path, line, code):
    file = upload(client, (json.dumps(line) + "\n").encode()).json()
    response = create_job(client, tiny_model_path, file["id"], method=_method())
    assert_openai_error(response, 400, "Line 1", param="training_file", code=code)
    assert services.jobs.list_jobs(tenant="default") == []


@pytest.fixture
def keyed_client(settings, tmp_path):
    from fastapi.testclient import TestClient

    from posttrain.api.app import create_app
    from posttrain.services.access import digest
    from posttrain.services.container import build_services

    keys = tmp_path / "keys"
    keys.write_text(f"alice:{digest(ALICE)}\n")
    settings.api_keys_file = keys
    services = build_services(settings)
    with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
        yield client
    services.close()


def test_a_python_grader_is_refused_on_a_keyed_server(keyed_client, tiny_model_path):
    file = upload(keyed_client, RFT_LINES, headers=as_(ALICE)).json()
    grader = {"type": "python", "name": "py", "source": "def grade(sample, item):\n    return 1.0\n"}
    response = create_job(keyed_client, tiny_model_path, file["id"], headers=as_(ALICE), method=_method(grader))
    assert_openai_error(response, 400, "POSTTRAIN_ALLOW_PYTHON_GRADERS", param="method.reinforcement.grader.type")
