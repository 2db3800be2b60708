"""Tenants share nothing in the file roots: with API keys each tenant reads and writes only its own
area, ``<root>/<tenant>/``, plus the operator's shared read-only folders; every refusal reads the
same whatever is there, and a path checked at submit cannot be swapped for a link before use.
Real HTTP through the real app, two API keys (as in test_access.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from posttrain.api.app import create_app
from posttrain.domain.jobs import JobStatus
from posttrain.domain.pins import pin_folder
from posttrain.domain.recipes import TrainerSpec
from posttrain.services.access import digest
from posttrain.services.container import build_services
from posttrain.trainer import checkpoints, loading
from posttrain.trainer.errors import PathChangedError
from posttrain.worker.launcher import Launcher
from tests.integration.test_access import ALICE, BOB, as_
from tests.integration.test_api import ROWS, assert_problem, lora_request
from tests.worker_helpers import REPO, launch_config, stand_in_importable

JSONL = "".join(json.dumps(row) + "\n" for row in ROWS)


@pytest.fixture
def shared(tmp_path) -> Path:
    folder = tmp_path / "read-by-all"
    folder.mkdir()
    (folder / "common.jsonl").write_text(JSONL)
    return folder


@pytest.fixture
def keyed(settings, tmp_path, shared):
    keys = tmp_path / "keys"
    keys.write_text(f"alice:{digest(ALICE)}\nbob:{digest(BOB)}\n")
    settings.api_keys_file = keys
    settings.shared_file_roots = [shared]
    services = build_services(settings)
    with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
        client.services = services  # type: ignore[attr-defined]  # the swap tests claim its jobs
        yield client
    services.close()


@pytest.fixture
def alice_area(settings) -> Path:
    """Alice's area with a dataset, a folder and a CSV whose third line is bad."""
    area = settings.allowed_file_roots[0] / "alice"
    area.mkdir(parents=True)
    (area / "rows.jsonl").write_text(JSONL)
    (area / "folder.jsonl").mkdir()
    (area / "bad.csv").write_text("messages,extra\n\"[]\",1\n\"[]\"\n")
    return area


def register(client, key: str, uri: str, dataset_id: str = "d"):
    return client.post("/v1/datasets", headers=as_(key), json={
        "purpose": "post-training/messages", "dataset_id": dataset_id, "source": {"type": "uri", "uri": uri}})


def same_refusal(responses: dict[str, object]) -> dict:
    """Every response is a 400 whose body, with the path the request named taken out, is the
    same: it tells nothing about what is at that path."""
    bodies = {}
    for path, response in responses.items():
        body = assert_problem(response, 400)
        bodies[path] = {**body, "detail": body["detail"].replace(path, "<path>", 1)}
    first = next(iter(bodies.values()))
    assert all(body == first for body in bodies.values()), bodies
    return first


def test_a_tenant_reads_only_its_own_area_and_refusals_look_alike(keyed, settings, alice_area):
    root = settings.allowed_file_roots[0]
    assert register(keyed, ALICE, f"file://{alice_area / 'rows.jsonl'}").status_code == 200
    # Alice may read her own bad file, and is told what is wrong with it.
    assert_problem(register(keyed, ALICE, str(alice_area / "bad.csv"), "bad"), 400, "line 3")

    (root / "bob").mkdir()
    paths = {
        "exists in alice's area": str(alice_area / "rows.jsonl"),
        "a folder in alice's area": str(alice_area / "folder.jsonl"),
        "a bad file in alice's area": str(alice_area / "bad.csv"),
        "missing in alice's area": str(alice_area / "nothing.jsonl"),
        "missing in bob's area": str(root / "bob" / "nothing.jsonl"),
        "a folder in bob's area": str(root / "bob"),
        "outside every root": "/etc/hostname",
    }
    detail = same_refusal({path: register(keyed, BOB, path) for path in paths.values()})["detail"]
    assert "alice" not in detail and "line" not in detail
    assert keyed.get("/v1/datasets", headers=as_(BOB)).json() == {"data": []}
    # A link in Bob's own area to Alice's file is refused the same way.
    (root / "bob" / "link.jsonl").symlink_to(alice_area / "rows.jsonl")
    link = str(root / "bob" / "link.jsonl")
    same_refusal({link: register(keyed, BOB, link), paths["outside every root"]: register(keyed, BOB, "/etc/hostname")})


def test_the_shared_root_is_read_by_every_tenant_and_written_by_none(keyed, shared, tiny_model_path):
    common = str(shared / "common.jsonl")
    for key in (ALICE, BOB):
        assert register(keyed, key, common, "common").status_code == 200, key
    job = lora_request(str(tiny_model_path), "common", checkpoint_dir=str(shared / "out"))
    assert_problem(keyed.post("/v1/post-training/supervised-fine-tune", headers=as_(BOB), json=job),
                   400, "checkpoint_dir")
    assert not (shared / "out").exists()


def test_checkpoint_dir_only_inside_the_tenants_own_area(keyed, settings, shared, alice_area, tiny_model_path):
    root = settings.allowed_file_roots[0]
    assert register(keyed, BOB, str(shared / "common.jsonl"), "common").status_code == 200
    (alice_area / "ckpt").mkdir()
    targets = [str(alice_area / "ckpt"), str(alice_area / "no-such"), str(alice_area / "rows.jsonl"),
               str(shared), str(root), "/tmp/elsewhere"]

    def submit(checkpoint_dir: str):
        body = lora_request(str(tiny_model_path), "common", checkpoint_dir=checkpoint_dir)
        return keyed.post("/v1/post-training/supervised-fine-tune", headers=as_(BOB), json=body)

    detail = same_refusal({target: submit(target) for target in targets})["detail"]
    assert "alice" not in detail and "checkpoint_dir" in detail
    assert sorted(p.name for p in (alice_area / "ckpt").iterdir()) == []
    assert keyed.get("/v1/post-training/jobs", headers=as_(BOB)).json() == {"data": []}

    own = root / "bob" / "ckpt"
    response = submit(str(own))
    assert response.status_code == 200, response.text
    job_uuid = response.json()["job_uuid"]
    status = keyed.get("/v1/post-training/job/status", params={"job_uuid": job_uuid}, headers=as_(BOB))
    assert status.status_code == 200


def test_a_model_in_another_tenants_area_is_refused_like_one_outside(keyed, settings, shared, alice_area,
                                                                     tiny_model_path):
    """Model roots are shared read-only; where one overlaps the file roots, another tenant's area in
    it is still refused, in the words used for a folder outside every root."""
    root = settings.allowed_file_roots[0]
    settings.model_roots = [tiny_model_path.parent, root]
    shutil.copytree(tiny_model_path, alice_area / "model")
    for key in (ALICE, BOB):
        assert register(keyed, key, str(shared / "common.jsonl"), "common").status_code == 200

    def submit(key: str, model: str):
        return keyed.post("/v1/post-training/supervised-fine-tune", headers=as_(key),
                          json=lora_request(model, "common"))

    assert submit(ALICE, str(alice_area / "model")).status_code == 200
    assert submit(BOB, str(tiny_model_path)).status_code == 200  # the operator's models: every tenant's
    outside = "/etc/posttrain-no-model"
    same_refusal({str(alice_area / "model"): submit(BOB, str(alice_area / "model")),
                  str(alice_area / "none"): submit(BOB, str(alice_area / "none")),
                  outside: submit(BOB, outside)})


def test_without_keys_the_default_tenant_keeps_the_whole_roots(settings):
    """An open server's one tenant reads the roots as before tenants had areas."""
    root = settings.allowed_file_roots[0]
    root.mkdir(parents=True, exist_ok=True)
    (root / "top.jsonl").write_text(JSONL)
    services = build_services(settings)
    with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
        response = client.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "top",
                                                     "source": {"type": "uri", "uri": str(root / "top.jsonl")}})
        assert response.status_code == 200, response.text
    services.close()


# --- a folder checked at submit and swapped for a link before the trainer starts ----------------


@pytest.fixture
def bob_job(keyed, settings, shared, tiny_model_path, monkeypatch):
    """Bob submits a job on a model in his own area (the model roots cover the file roots here)
    with a checkpoint_dir there too; no worker runs yet. Returns a function that claims and
    launches it with the stand-in trainer (which writes ``ran.json`` into its output folder)."""
    stand_in_importable(monkeypatch)
    root = settings.allowed_file_roots[0]
    settings.model_roots = [tiny_model_path.parent, root]
    shutil.copytree(tiny_model_path, root / "bob" / "model")
    assert register(keyed, BOB, str(shared / "common.jsonl"), "common").status_code == 200
    body = lora_request(str(root / "bob" / "model"), "common", checkpoint_dir=str(root / "bob" / "ckpt"))
    body["job_uuid"] = "completes-" + body["job_uuid"]
    response = keyed.post("/v1/post-training/supervised-fine-tune", headers=as_(BOB), json=body)
    assert response.status_code == 200, response.text
    store = keyed.services.jobs.store
    job = store.find(tenant="bob", job_uuid=body["job_uuid"])

    def launch(**config):
        claimed = store.claim_next(owner="w1", lease_seconds=30)
        assert claimed is not None and claimed.id == job.id
        Launcher(job=claimed, owner="w1", store=store, config=launch_config(**config)).run()
        return store.get(job_id=job.id)

    return job, launch


def _swap_for_link(folder: Path, target: Path) -> None:
    folder.rename(folder.with_name(folder.name + "-checked"))
    folder.symlink_to(target, target_is_directory=True)


def test_an_unswapped_job_runs(bob_job):
    job, launch = bob_job
    done = launch()
    assert done.status is JobStatus.COMPLETED, done.error_message
    assert (Path(job.plan.output_dir) / "ran.json").is_file()


def test_a_model_folder_swapped_for_a_link_fails_the_job_and_starts_no_trainer(bob_job, tmp_path, tiny_model_path):
    job, launch = bob_job
    outside = tmp_path / "outside-model"
    shutil.copytree(tiny_model_path, outside)
    _swap_for_link(Path(job.plan.model), outside)
    done = launch()
    assert done.status is JobStatus.FAILED and done.error_code == "path_changed", done.error_message
    assert "model folder" in done.error_message and str(outside) not in done.error_message
    folder = Path(job.plan.train_rows_path).parent
    assert not list(folder.glob("spec-attempt-*")) and not list(folder.glob("trainer-attempt-*"))
    assert not (Path(job.plan.output_dir) / "ran.json").exists()


def test_a_checkpoint_folder_swapped_for_a_link_fails_the_job_and_nothing_is_written_outside(bob_job, tmp_path):
    job, launch = bob_job
    outside = tmp_path / "outside-checkpoints"
    outside.mkdir()
    _swap_for_link(Path(job.plan.output_dir), outside)
    done = launch()
    assert done.status is JobStatus.FAILED and done.error_code == "path_changed", done.error_message
    assert list(outside.iterdir()) == []


def test_a_model_file_made_a_link_into_another_tenants_area_fails_the_job(bob_job, alice_area):
    job, launch = bob_job
    (Path(job.plan.model) / "extra.safetensors").symlink_to(alice_area / "rows.jsonl")
    done = launch()
    assert done.status is JobStatus.FAILED and done.error_code == "path_changed", done.error_message
    assert "extra.safetensors" in done.error_message and "alice" not in done.error_message


def test_the_trainer_itself_refuses_a_checkpoint_folder_swapped_after_the_launcher_checked(bob_job, tmp_path):
    """The swap lands between the launcher's check and the trainer's start: the real trainer
    process re-checks before it loads or writes, fails with path_changed, writes nothing outside."""
    job, _ = bob_job
    spec = tmp_path / "spec.json"
    spec.write_text(TrainerSpec(job_uuid=job.job_uuid, plan=job.plan, device="cpu", threads=1).model_dump_json())
    outside = tmp_path / "outside-checkpoints"
    outside.mkdir()
    _swap_for_link(Path(job.plan.output_dir), outside)
    ran = subprocess.run([sys.executable, "-m", "posttrain.trainer", str(spec)], capture_output=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    last = json.loads(ran.stdout.decode().strip().splitlines()[-1])
    assert last["event"] == "failed" and last["code"] == "path_changed", last
    assert list(outside.iterdir()) == []


def _pinned_output(tmp_path) -> Path:
    output = tmp_path / "out" / "job"
    output.mkdir(parents=True)
    loading.pin_paths([pin_folder(output, role="output_dir", within=(str(output),))])
    return output


def test_a_checkpoint_is_never_written_through_a_swapped_output_folder(tmp_path):
    output = _pinned_output(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    _swap_for_link(output, outside)
    try:
        with pytest.raises(PathChangedError):
            checkpoints.write_folder(output / "epoch_1", model=None, tokenizer=None, training_state={},
                                     trainer_state={}, save_model=lambda staging, final: None)
    finally:
        loading.pin_paths([])
    assert list(outside.iterdir()) == []


def test_a_swap_while_a_checkpoint_is_written_sends_nothing_outside(tmp_path):
    """Files go through the descriptor of the folder checked, not its name; the swap is noticed
    before the checkpoint is published."""
    output = _pinned_output(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()

    def swap_then_write(staging: Path, final: Path) -> None:
        _swap_for_link(output, outside)
        (staging / "weights.bin").write_bytes(b"w")

    try:
        with pytest.raises(PathChangedError):
            checkpoints.write_folder(output / "epoch_1", model=None, tokenizer=None, training_state={},
                                     trainer_state={}, save_model=swap_then_write)
    finally:
        loading.pin_paths([])
    assert list(outside.iterdir()) == []
    assert list(output.with_name("job-checked").iterdir()) == []  # the staging folder was removed


def test_a_model_whose_files_lead_into_another_tenants_area_is_refused_at_submit(keyed, settings, shared, alice_area,
                                                                                 tiny_model_path):
    root = settings.allowed_file_roots[0]
    settings.model_roots = [tiny_model_path.parent, root]
    model = root / "bob" / "model"
    shutil.copytree(tiny_model_path, model)
    (model / "extra.safetensors").symlink_to(alice_area / "rows.jsonl")
    assert register(keyed, BOB, str(shared / "common.jsonl"), "common").status_code == 200
    response = keyed.post("/v1/post-training/supervised-fine-tune", headers=as_(BOB),
                          json=lora_request(str(model), "common"))
    body = assert_problem(response, 400, "model", "extra.safetensors")
    assert "alice" not in body["detail"]
    assert keyed.get("/v1/post-training/jobs", headers=as_(BOB)).json() == {"data": []}


def test_the_real_trainer_runs_a_pinned_job_into_the_tenants_own_area(bob_job, settings):
    """The pins hold for an untouched job: the real trainer loads the model from Bob's area and
    writes its checkpoint into his checkpoint_dir, re-checking them at every load and write."""
    job, launch = bob_job
    done = launch(trainer_module="posttrain.trainer", threads=1, device="cpu")
    assert done.status is JobStatus.COMPLETED, done.error_message
    (checkpoint,) = done.checkpoints
    assert Path(checkpoint.path).parent == Path(job.plan.output_dir)
    assert Path(checkpoint.path).is_relative_to(settings.allowed_file_roots[0] / "bob" / "ckpt")
