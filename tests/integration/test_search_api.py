"""``hyperparam_search_config`` through the real app: a bad key, path or range is a 400 RFC 7807
body naming it and creates nothing (no job, no folder); ``{}`` is an ordinary job; a valid search
is one parent job holding its typed config, whose status names it, and cancelling it cancels its
trials."""

from __future__ import annotations

import pytest

from posttrain.domain.jobs import JobStatus
from tests.integration.test_api import assert_problem, lora_request, register
from tests.spec import validate_response

SFT = "/v1/post-training/supervised-fine-tune"
GOOD = {"search_space": {"optimizer_config.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
                         "algorithm_config.rank": {"type": "choice", "values": [4, 8, 16]}},
        "num_trials": 4, "max_concurrent_trials": 2, "metric": "validation_loss", "mode": "min",
        "pruner": "median", "seed": 0}
LR = "training_config.optimizer_config.lr"


def _space(**params) -> dict:
    return {**GOOD, "search_space": params}


BAD = [
    pytest.param(_space(**{"training_config.nonsense": {"type": "uniform", "low": 0, "high": 1}}),
                 "training_config.nonsense", id="unknown-path"),
    pytest.param({**GOOD, "trials": 4}, "hyperparam_search_config.trials", id="unknown-key"),
    pytest.param(_space(**{LR: {"type": "loguniform", "low": 0.0, "high": 0.1}}), f"{LR}.low", id="log-of-zero"),
    pytest.param(_space(**{LR: {"type": "uniform", "low": 0.1, "high": 0.01}}), "low must be below high",
                 id="inverted-range"),
    pytest.param(_space(**{LR: {"type": "uniform", "low": -1.0, "high": 0.01}}), "would not be a valid", id="lr<0"),
    pytest.param(_space(**{"algorithm_config.rank": {"type": "choice", "values": [4, 10**6]}}),
                 "algorithm_config.rank", id="rank-too-big"),
    pytest.param(_space(**{"algorithm_config.rank": {"type": "int", "low": 1.5, "high": 8}}),
                 "algorithm_config.rank.low", id="int-range-of-floats"),
    pytest.param(_space(**{"algorithm_config.rank": {"type": "normal", "low": 1, "high": 8}}),
                 "algorithm_config.rank", id="unknown-type"),
    pytest.param(_space(**{"algorithm_config.rank": {"type": "choice", "values": []}}),
                 "algorithm_config.rank.values", id="empty-choice"),
    pytest.param(_space(**{"algorithm_config.beta": {"type": "uniform", "low": 0.1, "high": 0.5}}),
                 "no DPO algorithm_config", id="beta-on-sft"),
    pytest.param({**GOOD, "num_trials": 0}, "num_trials", id="no-trials"),
    pytest.param({**GOOD, "num_trials": 1000}, "POSTTRAIN_MAX_SEARCH_TRIALS", id="over-the-operator-cap"),
    pytest.param({**GOOD, "max_concurrent_trials": 5}, "max_concurrent_trials", id="more-concurrent-than-trials"),
    pytest.param({**GOOD, "mode": "best"}, "mode", id="bad-mode"),
    pytest.param({**GOOD, "metric": "accuracy"}, "metric", id="bad-metric"),
    pytest.param({**GOOD, "search_space": {}}, "search_space", id="empty-space"),
    pytest.param({"num_trials": 2}, "search_space", id="no-space"),
    pytest.param({**GOOD, "num_trials": "4"}, "num_trials", id="string-count"),
]


@pytest.mark.parametrize(("search", "named"), BAD)
def test_a_bad_search_is_a_400_naming_it_and_creates_nothing(client, tiny_model_path, settings, search, named):
    register(client, "toy")
    body = lora_request(str(tiny_model_path), "toy", hyperparam_search_config=search)
    problem = assert_problem(client.post(SFT, json=body), 400, named)
    assert "hyperparam_search_config" in problem["detail"]
    assert client.get("/v1/post-training/jobs").json()["data"] == []
    assert not settings.jobs_dir.exists() or list(settings.jobs_dir.iterdir()) == []


def test_an_empty_search_is_an_ordinary_job(client, tiny_model_path, services):
    register(client, "toy")
    body = lora_request(str(tiny_model_path), "toy")
    assert client.post(SFT, json=body).status_code == 200
    job = services.jobs.store.find(tenant="default", job_uuid=body["job_uuid"])
    assert job.search is None and job.parent_job_id is None


def test_a_search_is_one_parent_job_and_its_cancel_cancels_its_trials(client, tiny_model_path, services):
    register(client, "toy")
    body = lora_request(str(tiny_model_path), "toy", hyperparam_search_config=GOOD)
    assert client.post(SFT, json=body).status_code == 200, client.post(SFT, json=body).text
    store = services.jobs.store
    parent = next(j for j in store.list() if j.job_uuid == body["job_uuid"])
    assert parent.search["num_trials"] == 4
    assert set(parent.search["search_space"]) == {LR, "algorithm_config.rank"}  # full request paths
    # A worker's driver queues trials; here one is queued as it would be, to see the cancel reach it.
    from posttrain.worker.search import SearchDriver

    claimed = store.claim_next(owner="w", lease_seconds=30)
    SearchDriver(job=claimed, owner="w", store=store, lease_seconds=30, tick_seconds=0.1).tick()
    listed = client.get("/v1/post-training/jobs").json()["data"]
    assert {j["job_uuid"] for j in listed} == {body["job_uuid"], f"{body['job_uuid']}.trial-0",
                                                f"{body['job_uuid']}.trial-1"}
    answered = client.get("/v1/post-training/job/status", params={"job_uuid": body["job_uuid"]})
    validate_response(answered, "/v1/post-training/job/status")  # the search summary fits the spec's status
    status = answered.json()
    trials = status["resources_allocated"]["search"]["trials"]
    assert [t["job_uuid"] for t in trials] == [f"{body['job_uuid']}.trial-0", f"{body['job_uuid']}.trial-1"]
    assert all(set(t["params"]) == {LR, "algorithm_config.rank"} for t in trials)
    # The dashboard's jobs table and job page show trials as the jobs they are.
    summaries = client.get("/v1/posttrain/jobs").json()
    shown = {j["job_uuid"] for j in summaries.get("data", summaries.get("jobs", []))}
    assert f"{body['job_uuid']}.trial-0" in shown, summaries
    assert client.get(f"/ui/jobs/{body['job_uuid']}.trial-0").status_code == 200
    assert client.post("/v1/post-training/job/cancel", json={"job_uuid": body["job_uuid"]}).status_code == 200
    for name in (body["job_uuid"], f"{body['job_uuid']}.trial-0", f"{body['job_uuid']}.trial-1"):
        assert store.find(tenant=parent.tenant, job_uuid=name).status is JobStatus.CANCELLED
