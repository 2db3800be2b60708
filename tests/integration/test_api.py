"""The real app over real stores: every body checked against the Llama Stack spec file, every
refusal an RFC 7807 body with the right code, and a refused request changes nothing."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import pytest

from posttrain.demo import colour_rows
from posttrain.services.access import DEFAULT_TENANT
from tests.spec import validate, validate_response

ROWS = colour_rows(repeat=1)


def lora_request(model: str, dataset_id: str, **overrides) -> dict:
    body = {
        "job_uuid": str(uuid.uuid4()),
        "model": model,
        "hyperparam_search_config": {},
        "logger_config": {},
        "algorithm_config": {"type": "LoRA", "lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": False,
                             "apply_lora_to_output": False, "rank": 4, "alpha": 8},
        "training_config": {
            "n_epochs": 1, "max_steps_per_epoch": 2, "gradient_accumulation_steps": 1,
            "data_config": {"dataset_id": dataset_id, "batch_size": 2, "shuffle": False, "data_format": "instruct"},
            "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-3, "weight_decay": 0.0, "num_warmup_steps": 0},
        },
    }
    body.update(overrides)
    return body


def assert_problem(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    validate(body, "Error")
    assert body["status"] == status
    for word in words:
        assert word in body["detail"], body["detail"]
    return body


def register(client, dataset_id="toy", rows=ROWS, prefix="/v1"):
    response = client.post(f"{prefix}/datasets", json={"purpose": "post-training/messages",
                                                       "source": {"type": "rows", "rows": rows}, "dataset_id": dataset_id})
    assert response.status_code == 200, response.text
    validate_response(response, "/v1/datasets")
    return response.json()


# -- datasets ---------------------------------------------------------------------------------


def test_dataset_lifecycle(client):
    created = register(client)
    assert created["identifier"] == "toy" and created["type"] == "dataset"
    assert created["source"] == {"type": "rows", "rows": []}, "register answers metadata only, like list and get"

    listed = client.get("/v1/datasets")
    validate_response(listed, "/v1/datasets")
    assert [d["identifier"] for d in listed.json()["data"]] == ["toy"]

    got = client.get("/v1/datasets/toy")
    validate_response(got, "/v1/datasets/{dataset_id}")

    page = client.get("/v1/datasetio/iterrows/toy", params={"start_index": 2, "limit": 3})
    validate_response(page, "/v1/datasetio/iterrows/{dataset_id}")
    assert page.json()["data"] == ROWS[2:5] and page.json()["has_more"] is True
    rest = client.get("/v1/datasetio/iterrows/toy", params={"start_index": 5})
    assert rest.json()["data"] == ROWS[5:] and rest.json()["has_more"] is False

    appended = client.post("/v1/datasetio/append-rows/toy", json={"rows": [{"input_query": "q", "expected_answer": "a"}]})
    assert appended.status_code == 200
    everything = client.get("/v1/datasetio/iterrows/toy", params={"limit": -1}).json()
    assert len(everything["data"]) == len(ROWS) + 1 and everything["data"][-1] == {"input_query": "q", "expected_answer": "a"}

    assert client.delete("/v1/datasets/toy").status_code == 200
    assert_problem(client.get("/v1/datasets/toy"), 404, "toy")
    assert_problem(client.delete("/v1/datasets/toy"), 404)
    assert client.get("/v1/datasets").json() == {"data": []}


def test_dataset_paths_of_newer_clients(client):
    register(client, "beta", prefix="/v1beta")
    assert client.get("/v1beta/datasets/beta").json()["identifier"] == "beta"
    assert client.get("/v1beta/datasetio/iterrows/beta", params={"limit": 1}).json()["has_more"] is True


def test_dataset_refusals_create_nothing(client, settings):
    register(client, "dup")
    assert_problem(client.post("/v1/datasets", json={"purpose": "post-training/messages",
                                                     "source": {"type": "rows", "rows": ROWS}, "dataset_id": "dup"}), 409, "dup")
    assert_problem(client.post("/v1/datasets", json={"purpose": "nonsense", "source": {"type": "rows", "rows": []}}),
                   400, "purpose")
    assert_problem(client.post("/v1/datasets", json={"purpose": "post-training/messages"}), 400, "source")
    assert_problem(client.post("/v1/datasets", json={"purpose": "post-training/messages",
                                                     "source": {"type": "rows", "rows": ROWS}, "extra": 1}), 400, "extra")
    outside = settings.resolved_home / "secret.jsonl"
    outside.write_text(json.dumps(ROWS[0]) + "\n")
    assert_problem(client.post("/v1/datasets", json={"purpose": "post-training/messages",
                                                     "source": {"type": "uri", "uri": f"file://{outside}"}}), 400, "outside")
    assert [d["identifier"] for d in client.get("/v1/datasets").json()["data"]] == ["dup"]


def test_dataset_from_uris(client, settings):
    root = settings.allowed_file_roots[0]
    root.mkdir(parents=True, exist_ok=True)
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    response = client.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "from-file",
                                                 "source": {"type": "uri", "uri": f"file://{root / 'rows.jsonl'}"}})
    assert response.status_code == 200, response.text
    encoded = base64.b64encode("".join(json.dumps(r) + "\n" for r in ROWS).encode()).decode()
    response = client.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "from-data",
                                                 "source": {"type": "uri", "uri": f"data:application/jsonl;base64,{encoded}"}})
    assert response.status_code == 200, response.text
    for dataset_id in ("from-file", "from-data"):
        assert client.get(f"/v1/datasetio/iterrows/{dataset_id}").json()["data"] == ROWS


# -- jobs -------------------------------------------------------------------------------------


def test_submit_status_list_artifacts_cancel(client, tiny_model_path, settings):
    register(client)
    body = lora_request(str(tiny_model_path), "toy")
    submitted = client.post("/v1/post-training/supervised-fine-tune", json=body)
    assert submitted.status_code == 200, submitted.text
    validate_response(submitted, "/v1/post-training/supervised-fine-tune")
    job_uuid = submitted.json()["job_uuid"]
    assert job_uuid == body["job_uuid"]

    status = client.get("/v1/post-training/job/status", params={"job_uuid": job_uuid})
    validate_response(status, "/v1/post-training/job/status")
    assert status.json()["status"] == "scheduled" and status.json()["checkpoints"] == []
    assert "scheduled_at" in status.json() and "started_at" not in status.json()

    jobs = client.get("/v1/post-training/jobs")
    validate_response(jobs, "/v1/post-training/jobs")
    assert jobs.json() == {"data": [{"job_uuid": job_uuid}]}

    artifacts = client.get("/v1/post-training/job/artifacts", params={"job_uuid": job_uuid})
    validate_response(artifacts, "/v1/post-training/job/artifacts")
    assert artifacts.json() == {"job_uuid": job_uuid, "checkpoints": []}

    assert client.post("/v1/post-training/job/cancel", json={"job_uuid": job_uuid}).status_code == 200
    cancelled = client.get("/v1/post-training/job/status", params={"job_uuid": job_uuid}).json()
    assert cancelled["status"] == "cancelled" and "completed_at" in cancelled
    # Cancelling again is harmless; the job stays cancelled.
    assert client.post("/v1/post-training/job/cancel", json={"job_uuid": job_uuid}).status_code == 200


def test_every_path_generation_reaches_the_same_job(client, tiny_model_path):
    register(client)
    body = lora_request(str(tiny_model_path), "toy")
    assert client.post("/v1alpha/post-training/supervised-fine-tune", json=body).status_code == 200
    job_uuid = body["job_uuid"]
    forms = [
        client.get("/v1/post-training/job/status", params={"job_uuid": job_uuid}),
        client.get("/v1alpha/post-training/job/status", params={"job_uuid": job_uuid}),
        client.get(f"/v1alpha/post-training/jobs/{job_uuid}/status"),
    ]
    assert all(f.status_code == 200 for f in forms)
    assert len({json.dumps(f.json(), sort_keys=True) for f in forms}) == 1
    assert client.get(f"/v1alpha/post-training/jobs/{job_uuid}/artifacts").json()["checkpoints"] == []
    assert client.get("/v1alpha/post-training/jobs").json() == {"data": [{"job_uuid": job_uuid}]}
    assert client.post(f"/v1alpha/post-training/jobs/{job_uuid}/cancel").status_code == 200
    assert client.get("/v1alpha/post-training/job/status", params={"job_uuid": job_uuid}).json()["status"] == "cancelled"


def test_unknown_job_is_404_everywhere(client):
    assert_problem(client.get("/v1/post-training/job/status", params={"job_uuid": "nope"}), 404, "nope")
    assert_problem(client.get("/v1/post-training/job/artifacts", params={"job_uuid": "nope"}), 404)
    assert_problem(client.post("/v1/post-training/job/cancel", json={"job_uuid": "nope"}), 404)
    assert_problem(client.get("/v1alpha/post-training/jobs/nope/status"), 404)
    assert_problem(client.get("/v1/post-training/job/status"), 400, "job_uuid")
    assert_problem(client.get("/v1/no-such-endpoint"), 404)


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        (lambda b: b["training_config"]["data_config"].update(dataset_id="missing"), 400, ["dataset_id", "missing"]),
        (lambda b: b["training_config"]["data_config"].update(validation_dataset_id="gone"), 400,
         ["validation_dataset_id", "gone"]),
        (lambda b: b.update(model="/etc"), 400, ["model", "outside"]),
        (lambda b: b.update(model="org/not-cached"), 400, ["model", "cache"]),
        (lambda b: b["training_config"].pop("n_epochs"), 400, ["training_config.n_epochs", "required"]),
        (lambda b: b["training_config"].update(n_epochs="2"), 400, ["training_config.n_epochs"]),
        (lambda b: b["training_config"].update(n_epochs=0), 400, ["n_epochs"]),
        (lambda b: b["training_config"].update(dtype="int3"), 400, ["dtype"]),
        (lambda b: b.update(algorithm_config={"type": "QAT", "quantizer_name": "x", "group_size": 32}), 400,
         ["QAT", "quantizer_name", "Int8DynActInt4WeightQATQuantizer"]),
        (lambda b: b.update(algorithm_config={"type": "QAT", "quantizer_name": "8da4w", "group_size": 48}), 400,
         ["group_size", "power of two"]),
        (lambda b: b["algorithm_config"].update(lora_attn_modules=["wq"]), 400, ["lora_attn_modules"]),
        (lambda b: b.update(logger_config={"wandb": True}), 400, ["logger_config"]),
        (lambda b: b.update(checkpoint_dir="/tmp/../etc"), 400, ["checkpoint_dir"]),
        (lambda b: b.update(surprise=1), 400, ["surprise"]),
        *[(lambda b, flag=flag: b["training_config"].update(efficiency_config={flag: True}), 400,
           [f"efficiency_config.{flag}", "not supported"])
          for flag in ("enable_activation_offloading", "memory_efficient_fsdp_wrap", "fsdp_cpu_offload")],
    ],
)
def test_invalid_fine_tunes_are_refused_and_leave_nothing(client, tiny_model_path, settings, change, status, words):
    register(client)
    body = lora_request(str(tiny_model_path), "toy")
    change(body)
    assert_problem(client.post("/v1/post-training/supervised-fine-tune", json=body), status, *words)
    assert client.get("/v1/post-training/jobs").json() == {"data": []}
    assert list(settings.jobs_dir.iterdir()) == []


def test_qat_fine_tune_is_accepted_with_its_config(client, tiny_model_path):
    register(client)
    body = lora_request(str(tiny_model_path), "toy")
    body["algorithm_config"] = {"type": "QAT", "quantizer_name": "Int8DynActInt4WeightQATQuantizer", "group_size": 32}
    assert client.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    assert client.get("/v1/post-training/job/status", params={"job_uuid": body["job_uuid"]}).status_code == 200


def test_qlora_is_accepted_and_reaches_the_trainer(client, services, tiny_model_path):
    register(client)
    body = lora_request(str(tiny_model_path), "toy")
    body["algorithm_config"].update(quantize_base=True, use_dora=True)
    assert client.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    adapter = services.jobs.store.find(tenant=DEFAULT_TENANT, job_uuid=body["job_uuid"]).plan.recipe.adapter
    assert adapter.quantize_base is True and adapter.use_dora is True


def test_a_validation_dataset_is_planned_as_the_jobs_own_copy(client, services, tiny_model_path):
    register(client)
    held_out = [{"input_query": "What colour is coal?", "expected_answer": "Coal is black."}]
    register(client, "held-out", rows=held_out)
    body = lora_request(str(tiny_model_path), "toy")
    body["training_config"]["data_config"]["validation_dataset_id"] = "held-out"
    assert client.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    plan = services.jobs.store.find(tenant=DEFAULT_TENANT, job_uuid=body["job_uuid"]).plan
    # The job's own copy: appending to the dataset later does not change what the job validates on.
    assert client.post("/v1/datasetio/append-rows/held-out", json={"rows": held_out}).status_code == 200
    copied = [json.loads(line) for line in Path(plan.validation_rows_path).read_text().splitlines()]
    assert copied == held_out and Path(plan.validation_rows_path).parent == Path(plan.train_rows_path).parent


def test_duplicate_job_uuid_conflicts(client, tiny_model_path):
    register(client)
    body = lora_request(str(tiny_model_path), "toy")
    assert client.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    assert_problem(client.post("/v1/post-training/supervised-fine-tune", json=body), 409, body["job_uuid"])
    assert client.get("/v1/post-training/jobs").json() == {"data": [{"job_uuid": body["job_uuid"]}]}


def test_oversized_body_is_413(settings):
    from fastapi.testclient import TestClient

    from posttrain.api.app import create_app
    from posttrain.services.container import build_services

    settings.max_body_bytes = 1000
    services = build_services(settings)
    big = {"purpose": "post-training/messages", "source": {"type": "rows", "rows": [{"text": "x" * 2000}]}}
    with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
        assert_problem(client.post("/v1/datasets", json=big), 413)
        # A chunked body announces no length; it is cut off as it arrives.
        chunks = (json.dumps(big)[i:i + 100].encode() for i in range(0, len(json.dumps(big)), 100))
        assert_problem(client.post("/v1/datasets", content=chunks, headers={"content-type": "application/json"}), 413)
        assert client.get("/v1/datasets").json() == {"data": []}
    services.close()


def dpo_request(model: str, dataset_id: str, **algorithm) -> dict:
    body = lora_request(model, dataset_id)
    body.pop("model"), body.pop("algorithm_config")
    body.pop("checkpoint_dir", None)
    return {**body, "finetuned_model": model, "algorithm_config": algorithm or {"beta": 0.1, "loss_type": "sigmoid"}}


PREFERENCES = [{"prompt": "What colour is the sky?", "chosen": "Blue.", "rejected": "Green."}] * 4


def test_preference_optimize_accepts_both_config_generations(client, tiny_model_path):
    register(client, "prefs", rows=PREFERENCES)
    legacy = {"reward_scale": 1.0, "reward_clip": 5.0, "epsilon": 0.1, "gamma": 0.99}
    for algorithm in ({"beta": 0.2, "loss_type": "ipo"}, legacy):
        body = dpo_request(str(tiny_model_path), "prefs", **algorithm)
        response = client.post("/v1/post-training/preference-optimize", json=body)
        assert response.status_code == 200, response.text
        validate_response(response, "/v1/post-training/preference-optimize")
    assert len(client.get("/v1/post-training/jobs").json()["data"]) == 2


def test_preference_optimize_refusals(client, tiny_model_path):
    register(client, "prefs", rows=PREFERENCES)
    assert_problem(client.post("/v1/post-training/preference-optimize",
                               json=dpo_request(str(tiny_model_path), "prefs", beta=0.1, loss_type="nonsense")), 400, "loss_type")
    assert_problem(client.post("/v1/post-training/preference-optimize",
                               json=dpo_request(str(tiny_model_path), "prefs", beta=-1.0, loss_type="sigmoid")), 400, "beta")
    assert_problem(client.post("/v1/post-training/preference-optimize",
                               json=dpo_request("/nowhere", "prefs")), 400, "finetuned_model")
    for flag in ("packed", "train_on_input"):
        body = dpo_request(str(tiny_model_path), "prefs")
        body["training_config"]["data_config"][flag] = True
        assert_problem(client.post("/v1/post-training/preference-optimize", json=body), 400, f"data_config.{flag}",
                       "preference")
    assert client.get("/v1/post-training/jobs").json() == {"data": []}


def test_shapes_newer_clients_send(client, tiny_model_path):
    """Clients 0.5/0.6 repeat dataset_id in append-rows, send null for options left out, may omit
    the LoRA type tag, and can only name the job to cancel in the query string."""
    register(client)
    appended = client.post("/v1beta/datasetio/append-rows/toy",
                           json={"dataset_id": "toy", "rows": [{"question": "a", "answer": "b"}]})
    assert appended.status_code == 200
    assert_problem(client.post("/v1beta/datasetio/append-rows/toy", json={"dataset_id": "other", "rows": []}), 400, "dataset_id")
    body = lora_request(str(tiny_model_path), "toy")
    body["algorithm_config"].pop("type")
    body["training_config"].update(max_validation_steps=None, dtype=None, efficiency_config=None)
    body["training_config"].pop("gradient_accumulation_steps")
    assert client.post("/v1alpha/post-training/supervised-fine-tune", json=body).status_code == 200, body
    assert client.post("/v1alpha/post-training/job/cancel", params={"job_uuid": body["job_uuid"]}).status_code == 200
    assert client.get("/v1alpha/post-training/job/status", params={"job_uuid": body["job_uuid"]}).json()["status"] == "cancelled"
    assert_problem(client.post("/v1alpha/post-training/job/cancel"), 400, "job_uuid")


def test_refusals_tell_clients_not_to_retry(client, tiny_model_path):
    register(client)
    body = lora_request(str(tiny_model_path), "toy")
    client.post("/v1/post-training/supervised-fine-tune", json=body)
    conflict = client.post("/v1/post-training/supervised-fine-tune", json=body)
    assert conflict.status_code == 409 and conflict.headers["x-should-retry"] == "false"


def test_prometheus_metrics(client, tiny_model_path):
    register(client)
    client.post("/v1/post-training/supervised-fine-tune", json=lora_request(str(tiny_model_path), "toy"))
    text = client.get("/metrics").text
    assert 'posttrain_jobs{status="scheduled"} 1.0' in text
    assert "posttrain_queue_depth 1.0" in text
    assert 'posttrain_http_requests_total{method="POST",route="/v1/post-training/supervised-fine-tune",status="200"} 1.0' in text


def test_model_paths_stay_inside_roots_and_remote_code_is_refused(client, tiny_model_path, tmp_path):
    import shutil

    register(client)
    remote = tiny_model_path.parent / f"remote-code-{uuid.uuid4().hex[:6]}"
    shutil.copytree(tiny_model_path, remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "modeling_x.Model"}}))
    assert_problem(client.post("/v1/post-training/supervised-fine-tune", json=lora_request(str(remote), "toy")),
                   400, "POSTTRAIN_TRUST_REMOTE_CODE")
    # A symlink inside a root that points outside it is followed, and refused.
    import tempfile

    outside = Path(tempfile.mkdtemp(prefix="posttrain-outside-")) / "model"  # not under the pytest roots
    shutil.copytree(tiny_model_path, outside)
    link = tiny_model_path.parent / f"link-{uuid.uuid4().hex[:6]}"
    link.symlink_to(outside)
    assert_problem(client.post("/v1/post-training/supervised-fine-tune", json=lora_request(str(link), "toy")), 400, "outside")
    assert_problem(client.post("/v1/post-training/supervised-fine-tune",
                               json=lora_request(str(tiny_model_path / ".." / ".." / "x"), "toy")), 400, "model")
    assert client.get("/v1/post-training/jobs").json() == {"data": []}
