"""The models API (``/v1/models``) and the export through the real app over real stores, on real
checkpoint folders: one LoRA checkpoint the real trainer wrote (once per session), copied into
each job's output folder, and the tiny model itself as a full fine-tune. The jobs are driven by a
stand-in launcher (the test records what a trainer would report), so each test costs seconds.

Covers: the list (bases + the caller's fine-tuned models and checkpoints, never another
tenant's), retrieve, delete (files gone, history kept, 404 after, a base refused, a running job
409), identical 404s for unknown and another tenant's ids, Llama Stack identifiers, the
adapter/``base/`` layouts, and exports that load with transformers/peft and give the
checkpoint's logits."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from posttrain.domain.jobs import JobStatus
from tests.integration.test_openai_api import (
    WORKER,
    as_,
    assert_openai_error,
    create_job,
    upload,
)
from tests.serving_helpers import ALICE, BOB


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory, tiny_model_path) -> Path:
    """A LoRA checkpoint folder the real trainer wrote on the tiny model (2 steps)."""
    from tests.integration.test_trainer_process import make_spec, run

    tmp = tmp_path_factory.mktemp("trained-adapter")
    _, code = run(make_spec(tmp, tiny_model_path, n_epochs=1, max_steps_per_epoch=2), tmp)
    assert code == 0, (tmp / "stderr.txt").read_text()[-3000:]
    folder = tmp / "out" / "epoch_1"
    assert (folder / "adapter_config.json").is_file()
    return folder


def finished_job(client, services, tiny_model_path, source: Path, *, steps=(2, 4), headers=None,
                 status: JobStatus | None = JobStatus.COMPLETED, **fields):
    """An OpenAI job whose stand-in trainer wrote a copy of ``source`` as each of its checkpoints."""
    file = upload(client, headers=headers).json()
    job = create_job(client, tiny_model_path, file["id"], headers=headers, **fields).json()
    claimed = services.jobs.store.claim_next(owner=WORKER, lease_seconds=60)
    assert claimed is not None and claimed.job_uuid == job["id"]
    record_checkpoints(services, claimed, source, steps)
    if status is not None:
        services.jobs.store.finish(job_id=claimed.id, owner=WORKER, attempt=claimed.attempt, status=status)
    return job, claimed


def record_checkpoints(services, claimed, source: Path, steps) -> list[Path]:
    folders = []
    for epoch, number in enumerate(steps, start=1):
        folder = Path(claimed.plan.output_dir) / f"epoch_{epoch}"
        shutil.copytree(source, folder)
        services.jobs.store.record_checkpoint(job_id=claimed.id, owner=WORKER, attempt=claimed.attempt,
                                              identifier=f"{claimed.job_uuid}-epoch-{epoch}", epoch=epoch,
                                              step=number, path=str(folder), train_loss=1.0, validation_loss=None,
                                              perplexity=None)
        folders.append(folder)
    return folders


#: The model root is the session's pytest folder, where other tests build models of their own
#: (tiny-gpt2, links, ...): the lists below look at this module's base and at trained models only.
BASE = "tiny-llama"


def ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    return [m["id"] for m in body["data"] if m["owned_by"] != "system" or m["id"] == BASE]


def test_the_list_holds_the_bases_and_the_callers_models_and_checkpoints_only(keyed_client, services, tiny_model_path,
                                                                               trained_adapter):
    client = keyed_client
    mine, claimed = finished_job(client, services, tiny_model_path, trained_adapter, headers=as_(ALICE),
                                 suffix="colours")
    theirs, _ = finished_job(client, services, tiny_model_path, trained_adapter, headers=as_(BOB), steps=(3,))
    ft = f"ft:{tiny_model_path.name}:colours:{mine['id']}"
    assert client.get(f"/v1/fine_tuning/jobs/{mine['id']}", headers=as_(ALICE)).json()["fine_tuned_model"] == ft

    listed = client.get("/v1/models", headers=as_(ALICE))
    assert ids(listed) == [tiny_model_path.name, ft, f"{ft}:ckpt-step-2", f"{ft}:ckpt-step-4"]
    base, model, *_ = [m for m in listed.json()["data"] if m["owned_by"] != "system" or m["id"] == BASE]
    assert base["owned_by"] == "system" and base["object"] == "model" and isinstance(base["created"], int)
    assert model["owned_by"] == "alice" and model["object"] == "model" and model["created"] > 0
    # What the Llama Stack clients read, beside OpenAI's four fields.
    assert {k: model[k] for k in ("identifier", "provider_id", "model_type", "type")} == {
        "identifier": ft, "provider_id": "posttrain", "model_type": "llm", "type": "model"}
    bob_ft = f"ft:{tiny_model_path.name}:bob:{theirs['id']}"
    assert ids(client.get("/v1/models", headers=as_(BOB))) == [tiny_model_path.name, bob_ft, f"{bob_ft}:ckpt-step-3"]

    assert client.get(f"/v1/models/{ft}", headers=as_(ALICE)).json() == model
    assert client.get(f"/v1/models/{tiny_model_path.name}", headers=as_(BOB)).json()["owned_by"] == "system"
    served = services.models.resolve("alice", f"{ft}:ckpt-step-2")
    assert served.adapter_path == str(Path(claimed.plan.output_dir, "epoch_1").resolve())
    assert served.base_path == str(tiny_model_path.resolve()) and served.tokenizer_path == served.adapter_path
    assert services.models.resolve("alice", ft).adapter_path == str(Path(claimed.plan.output_dir, "epoch_2").resolve())


def test_unknown_and_another_tenants_models_are_the_same_404(keyed_client, services, tiny_model_path,
                                                             trained_adapter):
    client = keyed_client
    job, _ = finished_job(client, services, tiny_model_path, trained_adapter, headers=as_(ALICE), steps=(2,))
    ft = f"ft:{tiny_model_path.name}:alice:{job['id']}"
    unknown = f"ft:{tiny_model_path.name}:alice:ftjob-000000000000000000000000"
    for theirs, missing in ((ft, unknown), (f"{ft}:ckpt-step-2", f"{unknown}:ckpt-step-2")):
        for method in ("GET", "DELETE"):
            got = client.request(method, f"/v1/models/{theirs}", headers=as_(BOB))
            expected = client.request(method, f"/v1/models/{missing}", headers=as_(BOB))
            error = assert_openai_error(expected, 404, missing, code="model_not_found", param="model")
            assert got.status_code == 404
            assert got.json()["error"] == {**error, "message": error["message"].replace(missing, theirs)}
    # A wrong suffix or base for a real job is unknown too, as is a checkpoint step it never wrote.
    for wrong in (ft.replace(":alice:", ":bob:"), f"{ft}:ckpt-step-9", "gpt-4o-mini", "a/b/c"):
        assert_openai_error(client.get(f"/v1/models/{wrong}", headers=as_(ALICE)), 404, code="model_not_found")
    assert client.get(f"/v1/models/{ft}", headers=as_(ALICE)).status_code == 200
    assert Path(services.models.resolve("alice", ft).adapter_path).is_dir()  # bob's DELETE changed nothing


def test_delete_removes_the_files_keeps_the_history_and_refuses_bases_and_running_jobs(
        client, services, tiny_model_path, trained_adapter):
    job, claimed = finished_job(client, services, tiny_model_path, trained_adapter, steps=(2, 4, 6))
    ft = f"ft:{tiny_model_path.name}:default:{job['id']}"
    first, second, final = (Path(claimed.plan.output_dir) / f"epoch_{n}" for n in (1, 2, 3))

    gone = client.delete(f"/v1/models/{ft}:ckpt-step-2")
    assert gone.status_code == 200 and gone.json() == {"id": f"{ft}:ckpt-step-2", "object": "model", "deleted": True}
    assert not first.exists() and second.is_dir() and final.is_dir()
    assert ids(client.get("/v1/models")) == [tiny_model_path.name, ft, f"{ft}:ckpt-step-4", f"{ft}:ckpt-step-6"]
    assert_openai_error(client.get(f"/v1/models/{ft}:ckpt-step-2"), 404, code="model_not_found")
    assert_openai_error(client.delete(f"/v1/models/{ft}:ckpt-step-2"), 404, code="model_not_found")
    steps = [c["step_number"] for c in client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]]
    assert steps == [6, 4]  # the fine-tuning API no longer lists it either

    assert client.delete(f"/v1/models/{ft}").json() == {"id": ft, "object": "model", "deleted": True}
    assert not second.exists() and not final.exists()
    assert ids(client.get("/v1/models")) == [tiny_model_path.name]
    assert_openai_error(client.get(f"/v1/models/{ft}"), 404, code="model_not_found")
    kept = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert kept["status"] == "succeeded" and kept["fine_tuned_model"] == ft  # the job keeps its history
    messages = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events",
                                                 params={"limit": 100}).json()["data"]]
    assert f"New fine-tuned model created: {ft}" in messages
    status = client.get("/v1/post-training/job/status", params={"job_uuid": job["id"]}).json()
    assert status["status"] == "completed" and status["checkpoints"] == []

    refused = assert_openai_error(client.delete(f"/v1/models/{tiny_model_path.name}"), 403, tiny_model_path.name,
                                  code="model_not_deletable")
    assert refused["type"] == "invalid_request_error"
    assert (tiny_model_path / "config.json").is_file()

    running, held = finished_job(client, services, tiny_model_path, trained_adapter, steps=(2,), status=None)
    running_ft = f"ft:{tiny_model_path.name}:default:{running['id']}"
    assert ids(client.get("/v1/models"))[-1] == f"{running_ft}:ckpt-step-2"  # a running job's checkpoint is usable
    assert_openai_error(client.delete(f"/v1/models/{running_ft}:ckpt-step-2"), 409, running["id"], code="model_in_use")
    assert (Path(held.plan.output_dir) / "epoch_1").is_dir()
    client.post(f"/v1/fine_tuning/jobs/{running['id']}/pause")  # pausing, then paused: still not finished
    assert_openai_error(client.delete(f"/v1/models/{running_ft}:ckpt-step-2"), 409, code="model_in_use")


def test_deleting_the_final_checkpoint_takes_the_fine_tuned_model_with_it(client, services, tiny_model_path,
                                                                          trained_adapter):
    job, _ = finished_job(client, services, tiny_model_path, trained_adapter, steps=(2, 4))
    ft = f"ft:{tiny_model_path.name}:default:{job['id']}"
    assert client.delete(f"/v1/models/{ft}:ckpt-step-4").status_code == 200
    # Not silently the older checkpoint: the fine-tuned model was the final one.
    assert ids(client.get("/v1/models")) == [tiny_model_path.name, f"{ft}:ckpt-step-2"]
    assert_openai_error(client.get(f"/v1/models/{ft}"), 404, code="model_not_found")


def test_a_llama_stack_jobs_checkpoints_are_listed_by_identifier(client, services, tiny_model_path, trained_adapter):
    from tests.integration.test_api import lora_request, register

    register(client, "toy")
    body = lora_request(str(tiny_model_path), "toy")
    assert client.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    claimed = services.jobs.store.claim_next(owner=WORKER, lease_seconds=60)
    record_checkpoints(services, claimed, trained_adapter, (1,))
    services.jobs.store.finish(job_id=claimed.id, owner=WORKER, attempt=claimed.attempt, status=JobStatus.COMPLETED)
    identifier = client.get("/v1/post-training/job/status",
                            params={"job_uuid": body["job_uuid"]}).json()["checkpoints"][0]["identifier"]
    assert ids(client.get("/v1/models")) == [tiny_model_path.name, identifier]
    assert client.get(f"/v1/models/{identifier}").json()["owned_by"] == "default"
    # The fine-tuning API names the job's model too; that name resolves (unlisted).
    ft = client.get(f"/v1/fine_tuning/jobs/{body['job_uuid']}").json()["fine_tuned_model"]
    assert client.get(f"/v1/models/{ft}").json()["id"] == ft
    assert client.delete(f"/v1/models/{identifier}").json()["deleted"] is True
    assert ids(client.get("/v1/models")) == [tiny_model_path.name]
    assert client.get("/v1/post-training/job/status", params={"job_uuid": body["job_uuid"]}).json()["checkpoints"] == []


def test_the_checkpoint_layouts_resolve_and_an_adapter_naming_a_foreign_base_is_not_served(
        client, services, tiny_model_path, trained_adapter, tmp_path, request):
    # A DPO checkpoint on its starting model: the adapter names the checkpoint's own base/ folder.
    on_start = tmp_path / "on-start"
    shutil.copytree(trained_adapter, on_start)
    shutil.copytree(tiny_model_path, on_start / "base")
    # An adapter whose base is outside the model roots (which hold every pytest folder): never loaded.
    foreign = tmp_path / "foreign"
    shutil.copytree(trained_adapter, foreign)
    outside = tempfile.TemporaryDirectory(prefix="not-a-model-root-")
    request.addfinalizer(outside.cleanup)
    elsewhere = Path(outside.name) / "model"
    shutil.copytree(tiny_model_path, elsewhere)
    config = json.loads((foreign / "adapter_config.json").read_text())
    (foreign / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(elsewhere)}))
    for source in (on_start, foreign, tiny_model_path):
        finished_job(client, services, tiny_model_path, source, steps=(1,))
    listed = [m for m in services.models.list("default") if m.owned_by != "system" or m.id == BASE]
    assert len(listed) == 1 + 2 * 2  # the base; two models with a checkpoint each; nothing of the foreign one
    with_base, full_model = [m for m in listed if m.id.startswith("ft:") and "ckpt-step" not in m.id]
    assert with_base.base_path.endswith("/epoch_1/base") and with_base.adapter_path.endswith("/epoch_1")
    assert with_base.tokenizer_path == with_base.adapter_path
    assert full_model.adapter_path is None and full_model.base_path.endswith("/epoch_1")


def untar(response, into: Path) -> Path:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
        tar.extractall(into, filter="data")
    (folder,) = list(into.iterdir())
    return folder


@pytest.mark.slow
def test_exports_load_with_transformers_and_give_the_checkpoints_logits(client, services, tiny_model_path,
                                                                         trained_adapter, tmp_path, settings):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job, _ = finished_job(client, services, tiny_model_path, trained_adapter, steps=(2,))
    ft = f"ft:{tiny_model_path.name}:default:{job['id']}"
    adapter = untar(client.get(f"/v1/posttrain/models/{ft}/export", params={"format": "adapter"}), tmp_path / "a")
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "training_state.pt").exists()
    merged = untar(client.get(f"/v1/posttrain/models/{ft}/export", params={"format": "merged"}), tmp_path / "m")
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
    assert not (merged / "adapter_config.json").exists()
    assert list((settings.resolved_home / "exports").iterdir()) == []  # the merge and the archives are gone

    tokenizer = AutoTokenizer.from_pretrained(merged)
    inputs = tokenizer("What colour is the sky? The sky is blue.", return_tensors="pt")
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                                             trained_adapter).eval()(**inputs).logits
        from_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                                                 adapter).eval()(**inputs).logits
        from_merged = AutoModelForCausalLM.from_pretrained(merged).eval()(**inputs).logits
        untrained = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()(**inputs).logits
    assert torch.equal(from_adapter, expected)
    assert torch.allclose(from_merged, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(untrained, expected, atol=1e-3), "the adapter changed nothing: the test proves nothing"

    # A checkpoint that holds its own merged/ exports that folder, no merge run.
    with_merged = tmp_path / "with-merged"
    shutil.copytree(trained_adapter, with_merged)
    shutil.copytree(merged, with_merged / "merged")
    (with_merged / "merged" / "marker.txt").write_text("the checkpoint's own merged/")
    job, _ = finished_job(client, services, tiny_model_path, with_merged, steps=(2,))
    own = untar(client.get(f"/v1/posttrain/models/ft:{tiny_model_path.name}:default:{job['id']}/export"),
                tmp_path / "own")
    assert (own / "marker.txt").read_text() == "the checkpoint's own merged/"


def test_a_full_fine_tune_exports_as_itself_and_refuses_adapter(client, services, tiny_model_path, tmp_path, settings):
    job, _ = finished_job(client, services, tiny_model_path, tiny_model_path, steps=(2,))
    ft = f"ft:{tiny_model_path.name}:default:{job['id']}"
    exports = settings.resolved_home / "exports"
    stale, fresh = exports / "export-killed", exports / "export-under-way"
    for leftover in (stale, fresh):
        (leftover / "merged").mkdir(parents=True)
    os.utime(stale, (time.time() - 2 * 24 * 3600,) * 2)
    merged = untar(client.get(f"/v1/posttrain/models/{ft}/export", params={"format": "merged"}), tmp_path / "m")
    names = sorted(p.name for p in merged.iterdir())
    assert names == sorted(p.name for p in tiny_model_path.iterdir() if p.is_file())
    assert not stale.exists() and fresh.is_dir()  # what a killed export left is swept, a recent one kept
    refused = client.get(f"/v1/posttrain/models/{ft}/export", params={"format": "adapter"})
    assert refused.status_code == 400 and "full fine-tune" in refused.json()["detail"]
    bad = client.get(f"/v1/posttrain/models/{ft}/export", params={"format": "gguf"})
    assert bad.status_code == 400 and "format" in bad.json()["detail"]
    base = client.get(f"/v1/posttrain/models/{tiny_model_path.name}/export")
    assert base.status_code == 400
    missing = client.get(f"/v1/posttrain/models/{ft}x/export")
    assert missing.status_code == 404 and missing.json()["status"] == 404


@pytest.mark.slow
def test_a_deleted_model_is_forgotten_by_the_serving_worker(client, services, tiny_model_path, trained_adapter):
    import asyncio
    from contextlib import aclosing

    from posttrain.domain.serving import GenerationRequest, SamplingParams, TokenEvent

    services.settings.serve_threads = 1
    job, _ = finished_job(client, services, tiny_model_path, trained_adapter, steps=(2,))
    ft = f"ft:{tiny_model_path.name}:default:{job['id']}"
    model = services.models.resolve("default", ft)
    request = GenerationRequest(model=model, sampling=SamplingParams(max_tokens=2, temperature=0.0), prompt="The sky")

    async def generate() -> list:
        async with aclosing(services.serving.generate(request)) as stream:
            return [event async for event in stream]

    def loaded_adapters() -> list[str]:
        return [a["path"] for a in asyncio.run(services.serving.stats())["adapters"]]

    assert any(isinstance(e, TokenEvent) for e in asyncio.run(generate()))
    assert model.adapter_path in loaded_adapters()
    assert client.delete(f"/v1/models/{ft}").status_code == 200
    assert model.adapter_path not in loaded_adapters()
