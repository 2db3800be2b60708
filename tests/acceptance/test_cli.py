"""The ``posttrain datasets …`` / ``posttrain jobs …`` commands, run as real processes against a real
server (the ``live_server`` fixture): register and read a dataset, submit a YAML config and watch it
train to the end, read its status, artifacts and events, cancel, pause and resume a long job, and fail
readably.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from posttrain.demo import colour_rows
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow

ROWS = colour_rows(repeat=2)


def cli(server_url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "POSTTRAIN_URL": server_url, "COLUMNS": "200"}
    env.pop("POSTTRAIN_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "posttrain", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    text = result.stderr.strip()
    assert "\n" not in text and "Traceback" not in text, text
    assert text.startswith("error:"), text
    return text


def yaml_config(model: str, dataset_id: str, *, epochs: int, steps: int) -> str:
    """A config as it would be kept in git: no job_uuid, and the two empty spec objects left out."""
    return f"""\
# LoRA on the colours toy set
model: {model}
algorithm_config:
  type: LoRA
  lora_attn_modules: [q_proj, v_proj]
  apply_lora_to_mlp: false
  apply_lora_to_output: false
  rank: 4
  alpha: 8
training_config:
  n_epochs: {epochs}
  max_steps_per_epoch: {steps}
  gradient_accumulation_steps: 1
  max_validation_steps: 1
  data_config:
    dataset_id: {dataset_id}
    batch_size: 2
    shuffle: false
    data_format: instruct
  optimizer_config: {{optimizer_type: adamw, lr: 0.001, weight_decay: 0.0, num_warmup_steps: 0}}
"""


def register_colours(live_server, folder: Path) -> str:
    path = folder / "colours.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    dataset_id = f"cli-colours-{uuid.uuid4().hex[:6]}"
    out = ok(cli(live_server.base_url, "datasets", "register", str(path), "--id", dataset_id))
    assert out.strip() == dataset_id
    return dataset_id


@pytest.fixture(scope="module")
def dataset(live_server, tmp_path_factory) -> str:
    return register_colours(live_server, tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def trained(live_server, dataset, tmp_path_factory) -> tuple[str, str]:
    """A short LoRA job submitted from YAML with --watch: (job_uuid, what the command printed)."""
    config = tmp_path_factory.mktemp("cli-config") / "short.yaml"
    config.write_text(yaml_config(str(live_server.tiny_model_path), dataset, epochs=2, steps=2))
    out = ok(cli(live_server.base_url, "jobs", "submit", str(config), "--watch", timeout=180))
    job_uuid = out.splitlines()[0].strip()
    uuid.UUID(job_uuid)  # the file has none, so the command made a uuid4
    return job_uuid, out


def test_dataset_register_list_rows(live_server, dataset):
    listed = ok(cli(live_server.base_url, "datasets", "list"))
    line = next(line for line in listed.splitlines() if line.startswith(dataset))
    assert "post-training/messages" in line and "rows" in line and line.split()[-1] == str(len(ROWS))

    out = ok(cli(live_server.base_url, "datasets", "rows", dataset, "--start", "2", "--limit", "3"))
    assert [json.loads(line) for line in out.splitlines()] == ROWS[2:5]
    everything = ok(cli(live_server.base_url, "datasets", "rows", dataset))
    assert [json.loads(line) for line in everything.splitlines()] == ROWS


def test_submit_yaml_and_watch_to_completion(live_server, trained):
    job_uuid, out = trained
    assert f"{job_uuid}  completed" in out
    assert "validation loss" in out and "checkpoint epoch 2" in out
    status = live_server.get("/v1/post-training/job/status", params={"job_uuid": job_uuid}).json()
    assert status["status"] == "completed" and [c["epoch"] for c in status["checkpoints"]] == [1, 2]
    final = status["checkpoints"][-1]["training_metrics"]["validation_loss"]
    assert f"validation loss {final:.4f}" in out


def test_status_artifacts_and_logs_show_the_checkpoints(live_server, trained):
    job_uuid, _ = trained
    answer = live_server.get("/v1/post-training/job/artifacts", params={"job_uuid": job_uuid}).json()
    paths = [c["path"] for c in answer["checkpoints"]]
    assert len(paths) == 2

    status = ok(cli(live_server.base_url, "jobs", "status", job_uuid))
    assert "completed" in status and "checkpoints (2)" in status and all(p in status for p in paths)
    assert "step 4/4" in status  # the latest metrics, from the job's events

    artifacts = ok(cli(live_server.base_url, "jobs", "artifacts", job_uuid))
    assert all(p in artifacts for p in paths)
    as_json = json.loads(ok(cli(live_server.base_url, "jobs", "artifacts", job_uuid, "--json")))
    assert [c["path"] for c in as_json["checkpoints"]] == paths

    logs = ok(cli(live_server.base_url, "jobs", "logs", job_uuid)).splitlines()
    assert any("checkpoint epoch 1" in line and paths[0] in line for line in logs)
    assert any("checkpoint epoch 2" in line and paths[1] in line for line in logs)
    assert any(" metric " in line and "step 4/4" in line for line in logs)
    assert any(line.split()[2:4] == ["state", "completed"] for line in logs)
    followed = ok(cli(live_server.base_url, "jobs", "logs", job_uuid, "--follow", "--type", "checkpoint,state"))
    kinds = [line.split()[2] for line in followed.splitlines()]
    assert kinds == ["state", "state", "checkpoint", "checkpoint", "state"]

    listed = ok(cli(live_server.base_url, "jobs", "list"))
    assert any(line.split()[:2] == [job_uuid, "completed"] for line in listed.splitlines())


def test_cancel_a_long_job(live_server, dataset, trained, tmp_path):
    config = tmp_path / "long.yaml"
    config.write_text(yaml_config(str(live_server.tiny_model_path), dataset, epochs=50, steps=100))
    job_uuid = f"cli-long-{uuid.uuid4().hex[:8]}"
    assert ok(cli(live_server.base_url, "jobs", "submit", str(config), "--job-uuid", job_uuid)).strip() == job_uuid
    deadline = time.monotonic() + 60
    params = {"job_uuid": job_uuid}
    while live_server.get("/v1/post-training/job/status", params=params).json()["status"] == "scheduled":
        assert time.monotonic() < deadline, "the long job never started"
        time.sleep(0.2)

    assert ok(cli(live_server.base_url, "jobs", "cancel", job_uuid)).split() == [job_uuid, "cancelled"]
    status = ok(cli(live_server.base_url, "jobs", "status", job_uuid))
    assert "cancelled" in status and "cancelled by the user" in status
    watched = cli(live_server.base_url, "jobs", "watch", job_uuid, "--poll")
    assert watched.returncode == 1 and f"{job_uuid}  cancelled" in watched.stdout


def test_config_method_inference_dry_run(live_server, tmp_path):
    config = tmp_path / "dpo.json"
    config.write_text(json.dumps({"job_uuid": "from-file", "finetuned_model": "/m", "algorithm_config": {"beta": 0.1},
                                  "training_config": {"n_epochs": 1, "max_steps_per_epoch": 1,
                                                      "gradient_accumulation_steps": 1}}))
    out = ok(cli(live_server.base_url, "jobs", "submit", str(config), "--dry-run"))
    head, body = out.split("\n", 1)
    assert head == "POST /v1/post-training/preference-optimize"
    sent = json.loads(body)
    assert sent["job_uuid"] == "from-file" and sent["hyperparam_search_config"] == {} and sent["logger_config"] == {}


def test_errors_are_one_readable_line(live_server, tmp_path):
    missing = live_server.get("/v1/post-training/job/status", params={"job_uuid": "no-such-job"})
    assert missing.status_code == 404
    line = one_error_line(cli(live_server.base_url, "jobs", "status", "no-such-job"))
    assert "404" in line and missing.json()["detail"] in line

    url = f"http://127.0.0.1:{free_port()}"
    line = one_error_line(cli(url, "jobs", "list"))
    assert f"cannot reach the posttrain server at {url}" in line

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    line = one_error_line(cli(live_server.base_url, "jobs", "submit", str(bad)))
    assert "not valid YAML" in line and "line" in line

    line = one_error_line(cli(live_server.base_url, "datasets", "rows", "no-such-dataset"))
    assert "404" in line and "no-such-dataset" in line


def test_client_sends_the_api_key_and_reads_problem_bodies(monkeypatch):
    import httpx

    from posttrain.remote.http import ApiError, Client, resolve

    monkeypatch.setenv("POSTTRAIN_URL", "localhost:9999/")
    monkeypatch.setenv("POSTTRAIN_API_KEY", "from-env")
    assert resolve(None, None) == ("http://localhost:9999", "from-env")
    assert resolve("http://h:1", "explicit") == ("http://h:1", "explicit")

    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(409, json={"status": 409, "title": "Conflict", "detail": "a dataset\nwith id 'x' exists"})

    with Client("http://h:1", "secret", transport=httpx.MockTransport(answer)) as api, pytest.raises(ApiError) as caught:
        api.get("/v1/datasets/x")
    assert seen == ["Bearer secret"]
    assert (caught.value.status, caught.value.title) == (409, "Conflict")
    assert str(caught.value) == "409 Conflict: a dataset with id 'x' exists (GET /v1/datasets/x)"


def test_dataset_rm(live_server, dataset, trained):
    assert ok(cli(live_server.base_url, "datasets", "rm", dataset)).strip() == f"removed {dataset}"
    assert dataset not in ok(cli(live_server.base_url, "datasets", "list"))
    assert live_server.get(f"/v1/datasets/{dataset}").status_code == 404


def test_pause_and_resume_a_long_job(live_server, tmp_path):
    dataset = register_colours(live_server, tmp_path)  # its own: test_dataset_rm removes the module's
    config = tmp_path / "long.yaml"
    config.write_text(yaml_config(str(live_server.tiny_model_path), dataset, epochs=50, steps=100))
    job_uuid = f"cli-pause-{uuid.uuid4().hex[:8]}"
    assert ok(cli(live_server.base_url, "jobs", "submit", str(config), "--job-uuid", job_uuid)).strip() == job_uuid

    def own_status() -> str:
        page = live_server.get("/v1/post-training/job/events", params={"job_uuid": job_uuid, "after": 10**9})
        return page.json()["status"]

    def wait(status: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while own_status() != status:
            assert time.monotonic() < deadline, f"the job never became {status}"
            time.sleep(0.2)

    wait("in_progress")
    words = ok(cli(live_server.base_url, "jobs", "pause", job_uuid)).split()
    assert words[0] == job_uuid and words[1] in ("pausing", "paused")
    wait("paused", timeout=30)
    assert "paused" in ok(cli(live_server.base_url, "jobs", "status", job_uuid))
    assert "409" in one_error_line(cli(live_server.base_url, "jobs", "pause", job_uuid))
    words = ok(cli(live_server.base_url, "jobs", "resume", job_uuid)).split()
    assert words[0] == job_uuid and words[1] in ("scheduled", "in_progress")  # a worker may claim it at once
    assert "409" in one_error_line(cli(live_server.base_url, "jobs", "resume", job_uuid))
    assert ok(cli(live_server.base_url, "jobs", "cancel", job_uuid)).split() == [job_uuid, "cancelled"]
