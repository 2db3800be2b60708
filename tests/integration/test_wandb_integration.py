"""OpenAI's ``integrations: [{"type": "wandb", ...}]``: refused (400, naming the field) unless the
operator set up Weights & Biases; otherwise the job's step and checkpoint metrics land in a real
W&B run — offline here, read back from the run's own ``.wandb`` file — through the real app, a
real trainer process and a real server. A W&B failure (online without a login) never fails the job."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from posttrain.api.openai_recipes import CreateFineTuningJob, Refusal, wandb_run
from tests.conftest import start_server, stop_server
from tests.integration.test_openai_api import CHAT_LINES, assert_openai_error, create_job, upload
from tests.integration.test_trainer_process import kinds, make_spec, run
from tests.trainer_specs import typed_spec_file

pytestmark = [
    # peft 0.21 still reads transformers' deprecated alias when generating from a PeftModel.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

WANDB = {"type": "wandb", "wandb": {"project": "colours", "tags": ["tiny", "sft"]}}


# -- the run's own file --------------------------------------------------------------------------


def wandb_records(path: Path) -> list:
    """Every record of a ``run-<id>.wandb`` file: W&B's LevelDB-style log (a 7-byte ``:W&B`` header,
    then 32 KiB blocks of chunks: crc32, length, type FULL/FIRST/MIDDLE/LAST), each record one
    ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pos, pending, records = header, b"", []
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0:
            break
        pending += data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 4):  # FULL or LAST: the record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def read_run(path: Path) -> dict:
    """What a run file holds: its run record, history rows by step, the final summary, its exit code."""
    run_record, history, summary, exit_code = None, {}, {}, None
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_record = record.run
        elif kind == "history":
            row = _items(record.history.item)
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return {"run": run_record, "config": _items(run_record.config.update) if run_record else {},
            "history": history, "summary": summary, "exit_code": exit_code}


def run_files(wandb_dir: Path, run_id: str) -> list[Path]:
    """The run's files, one per attempt (``<dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb``), oldest first."""
    return sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))


# -- refusals through the real app ------------------------------------------------------------------


def test_an_integration_on_a_server_without_wandb_set_up_is_400_and_creates_nothing(client, services,
                                                                                      tiny_model_path):
    assert services.settings.wandb_mode == "off"  # the default
    file = upload(client).json()
    response = create_job(client, tiny_model_path, file["id"], integrations=[WANDB])
    assert_openai_error(response, 400, "does not log to Weights & Biases", "POSTTRAIN_WANDB_MODE", param="integrations")
    assert services.jobs.list_jobs(tenant="default") == []
    assert create_job(client, tiny_model_path, file["id"], integrations=[]).json()["integrations"] == []


@pytest.mark.parametrize(("integration", "param", "words"), [
    ({"type": "datadog"}, "integrations.0.type", ["only integration", "'datadog'"]),
    ({"type": "wandb", "wandb": {"name": "run"}}, "integrations.0.wandb.project", ["required"]),
    ({"type": "wandb"}, "integrations.0.wandb", ["project"]),
    ({"type": "wandb", "wandb": {"project": "p", "team": "x"}}, "integrations.0.wandb.team", ["not a W&B option"]),
    ({"type": "wandb", "wandb": {"project": "p"}, "extra": 1}, "integrations.0.extra", ["type and wandb"]),
    ({"type": "wandb", "wandb": {"project": "a/b"}}, "integrations.0.wandb.project", ["may not hold"]),
    ({"type": "wandb", "wandb": {"project": 5}}, "integrations.0.wandb.project", ["string"]),
    ({"type": "wandb", "wandb": {"project": "p", "tags": "one"}}, "integrations.0.wandb.tags", ["list of strings"]),
    ({"type": "wandb", "wandb": {"project": "p", "tags": ["x" * 65]}}, "integrations.0.wandb.tags.0", ["1 to 64"]),
    ({"type": "wandb", "wandb": {"project": "p", "name": ""}}, "integrations.0.wandb.name", []),
])
def test_a_bad_integration_is_400_naming_its_field(client, services, tiny_model_path, integration, param, words):
    services.settings.wandb_mode = "offline"
    file = upload(client).json()
    response = create_job(client, tiny_model_path, file["id"], integrations=[integration])
    assert_openai_error(response, 400, *words, param=param)
    assert services.jobs.list_jobs(tenant="default") == []


def test_an_accepted_integration_is_in_the_recipe_and_the_job_object(client, services, tiny_model_path):
    services.settings.wandb_mode = "offline"
    file = upload(client).json()
    created = create_job(client, tiny_model_path, file["id"], integrations=[
        {"type": "wandb", "wandb": {"project": "colours", "name": "first try", "entity": "lab", "tags": ["a"]}}])
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["integrations"] == [{"type": "wandb", "wandb": {"project": "colours", "name": "first try",
                                                               "entity": "lab", "tags": ["a"]}}]
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["integrations"] == job["integrations"]
    run = services.jobs.get(tenant="default", job_uuid=job["id"]).plan.recipe.wandb
    assert (run.project, run.name, run.entity, run.tags) == ("colours", "first try", "lab", ("a",))
    two = create_job(client, tiny_model_path, file["id"], integrations=[WANDB, WANDB])
    assert_openai_error(two, 400, "at most one", param="integrations.1")


def test_wandb_not_installed_is_refused_naming_integrations():
    """The "not installed" branch, with find_spec asked for a module that really is not installed
    (hiding the installed wandb from a running server would take an import hook: a mock)."""
    body = CreateFineTuningJob.model_validate({"model": "m", "training_file": "file-x", "integrations": [WANDB]})
    with pytest.raises(Refusal) as refused:
        wandb_run(body, mode="offline", module="posttrain_no_such_module")
    assert refused.value.param == "integrations" and "wandb is not installed on this server" in refused.value.reason
    assert wandb_run(body, mode="offline").project == "colours"  # the real wandb is installed here


# -- a real trainer --------------------------------------------------------------------------------


def wandb_spec(tmp_path: Path, tiny_model_path: Path, *, mode: str, wandb_dir: Path, **training) -> Path:
    typed = typed_spec_file(make_spec(tmp_path, tiny_model_path, **training))
    spec = json.loads(typed.read_text())
    spec["plan"]["recipe"]["wandb"] = {"project": "colours", "tags": ["tiny"]}
    spec.update(wandb_mode=mode, wandb_dir=str(wandb_dir))
    typed.write_text(json.dumps(spec))
    return typed


@pytest.mark.slow
def test_a_resumed_trainer_continues_the_same_offline_run(tiny_model_path, tmp_path):
    wandb_dir = tmp_path / "wandb"
    first, code = run(wandb_spec(tmp_path, tiny_model_path, mode="offline", wandb_dir=wandb_dir,
                                 n_epochs=1, max_steps_per_epoch=2), tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    second, code = run(wandb_spec(tmp_path, tiny_model_path, mode="offline", wandb_dir=wandb_dir,
                                  n_epochs=2, max_steps_per_epoch=2), tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert kinds(second) == ["started", "checkpoint", "metric", "metric", "checkpoint", "completed"]
    assert not [e for e in first + second if e["event"] == "log" and "Weights & Biases" in e["message"]]

    files = run_files(wandb_dir, "job-1")
    assert len(files) == 2  # one file per attempt, of the same run id: `wandb sync` merges them
    runs = [read_run(path) for path in files]
    assert [r["run"].run_id for r in runs] == ["job-1", "job-1"] and runs[0]["run"].display_name == "job-1"
    assert runs[0]["run"].project == "colours" and list(runs[0]["run"].tags) == ["tiny"]
    assert runs[0]["config"]["job_id"] == "job-1" and runs[0]["config"]["schedule"]["n_epochs"] == 1
    for events, logged in ((first, runs[0]), (second, runs[1])):
        metrics = {e["step"]: e for e in events if e["event"] == "metric"}
        assert {s: row["train_loss"] for s, row in logged["history"].items()} == \
            {s: pytest.approx(m["loss"], rel=1e-6) for s, m in metrics.items()}
        assert all(row["learning_rate"] == pytest.approx(metrics[s]["lr"]) for s, row in logged["history"].items())
        checkpoint = [e for e in events if e["event"] == "checkpoint"][-1]
        assert logged["summary"]["checkpoint/validation_loss"] == pytest.approx(checkpoint["validation_loss"],
                                                                                rel=1e-6)
        assert logged["exit_code"] == 0
    assert sorted(runs[1]["history"]) == [3, 4]  # the resumed attempt logs only the steps it trained


@pytest.mark.slow
def test_a_wandb_failure_is_a_warning_and_the_job_trains_on(tiny_model_path, tmp_path, monkeypatch):
    """Online with no W&B login (no WANDB_API_KEY, a HOME without a netrc): wandb.init refuses; the
    job's log says so once and the job completes."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    events, code = run(wandb_spec(tmp_path, tiny_model_path, mode="online", wandb_dir=tmp_path / "wandb",
                                  n_epochs=1, max_steps_per_epoch=2), tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert kinds(events) == ["started", "metric", "metric", "checkpoint", "completed"]
    warnings = [e for e in events if e["event"] == "log" and "Weights & Biases" in e["message"]]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning" and "API key" in warnings[0]["message"]


# -- through a real server -------------------------------------------------------------------------


@pytest.mark.slow
def test_an_openai_job_with_a_wandb_integration_logs_its_metrics_to_an_offline_run(tiny_model_path, tmp_path):
    home, wandb_dir = tmp_path / "home", tmp_path / "wandb-runs"
    home.mkdir()
    server = start_server(home, tiny_model_path, extra_env={"POSTTRAIN_WANDB_MODE": "offline",
                                                            "POSTTRAIN_WANDB_DIR": str(wandb_dir)})
    try:
        file = server.post("/v1/files", files={"file": ("train.jsonl", CHAT_LINES, "application/jsonl")},
                           data={"purpose": "fine-tune"}).json()
        created = server.post("/v1/fine_tuning/jobs", json={
            "model": tiny_model_path.name, "training_file": file["id"], "integrations": [WANDB],
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}}})
        assert created.status_code == 200, created.text
        job = created.json()
        assert job["integrations"] == [{"type": "wandb", "wandb": {"project": "colours", "name": None,
                                                                   "entity": None, "tags": ["tiny", "sft"]}}]
        deadline = time.monotonic() + 240
        while (job := server.get(f"/v1/fine_tuning/jobs/{job['id']}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["status"] == "succeeded", (job, (home / "server.log").read_text()[-3000:])
        events = server.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    finally:
        stop_server(server)
    assert not [e for e in events if "Weights & Biases" in e["message"]], events
    steps = {e["data"]["step"]: e["data"]["train_loss"] for e in events if e["type"] == "metrics"}
    assert sorted(steps) == [1, 2]  # 8 rows in batches of 4

    [path] = run_files(wandb_dir, job["id"])
    logged = read_run(path)
    assert logged["run"].project == "colours" and logged["run"].display_name == job["id"]
    assert list(logged["run"].tags) == ["tiny", "sft"] and logged["config"]["job_id"] == job["id"]
    assert logged["config"]["data"]["batch_size"] == 4 and logged["config"]["base_model"] == tiny_model_path.name
    assert {s: row["train_loss"] for s, row in logged["history"].items()} == \
        {s: pytest.approx(loss, rel=1e-6) for s, loss in steps.items()}
    assert logged["summary"]["train_loss"] == pytest.approx(steps[2], rel=1e-6)
    assert "checkpoint/validation_loss" in logged["summary"] and logged["exit_code"] == 0


def test_the_wandb_folder_is_under_home_unless_set(tmp_path, monkeypatch):
    from posttrain.settings import Settings
    from posttrain.worker.scheduler import launch_config_from

    monkeypatch.setenv("POSTTRAIN_WANDB_MODE", "offline")
    assert Settings(home=tmp_path).resolved_wandb_dir == tmp_path.resolve() / "wandb"
    assert Settings(home=tmp_path, wandb_dir=Path("runs")).resolved_wandb_dir == tmp_path.resolve() / "runs"
    config = launch_config_from(Settings(home=tmp_path, wandb_dir=tmp_path / "elsewhere"))
    assert (config.wandb_mode, config.wandb_dir) == ("offline", str((tmp_path / "elsewhere").resolve()))
