"""The ray executor against a real local Ray cluster: ``ray start --head`` (2 CPUs, a small object
store, no dashboard) as its own process, a real API server, and a real ``posttrain worker
--executor ray --address …`` on the same store, training the tiny model through Ray Train.

A job completes with its checkpoints in the status, in the job's own folder (where the local
executor writes them); a cancel stops every rank's trainer; a Ray worker killed mid-job makes Ray
Train restart the group, and the job resumes from its newest checkpoint and completes, in the same
attempt. No Ray process outlives the module (its teardown stops the head and checks)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from posttrain.demo import colour_rows
from tests.acceptance.test_crash_recovery import _events
from tests.conftest import REPO, free_port, start_server, stop_server
from tests.integration.test_api import lora_request

pytest.importorskip("ray.train", reason="the ray extra (pip install 'posttrain[ray]') is not installed")

pytestmark = pytest.mark.slow

EPOCHS = 6


def _processes_mentioning(text: str) -> list[int]:
    """Pids of this user's processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster of our own (its own port and temp folder), stopped afterwards."""
    temp = tempfile.mkdtemp(prefix="ptray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", "0",
               "--num-cpus", "2", "--object-store-memory", str(100 * 1024 * 1024), "--include-dashboard", "false",
               "--disable-usage-stats", "--temp-dir", temp, "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-port", str(free_port())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            process_group=0)
    address, seen = None, []
    assert head.stdout is not None
    for line in head.stdout:
        seen.append(line)
        match = re.search(r"ray start --address='([^']+)'", line)
        if match:
            address = match.group(1)
            break
    threading.Thread(target=head.stdout.read, daemon=True).start()  # keep its pipe from filling up
    try:
        assert address, "ray start printed no address:\n" + "".join(seen[-30:])
        yield address
    finally:
        _stop_cluster(head, temp)


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_cluster(head: subprocess.Popen, temp: str) -> None:
    """Stop the head (``--block``: it stops what it started), then make sure every process of the
    cluster, workers included (their command lines read ``ray::…``), is gone: by pid, never by name."""
    ours = _descendants(head.pid) | set(_processes_mentioning(temp))
    for pid in ours:  # the raylet's workers, which the raylet may leave behind when it is stopped
        ours |= _descendants(pid)
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in ours) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in ours:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in ours) and time.monotonic() < deadline:
        time.sleep(0.2)
    shutil.rmtree(temp, ignore_errors=True)
    assert not [pid for pid in ours if _alive(pid)], "Ray processes outlived the cluster"


@pytest.fixture
def ray_server(request, ray_cluster, tmp_path, tiny_model_path):
    """An API server without a worker, and one ``posttrain worker --executor ray`` on its store
    (the test's parameters: more settings, such as POSTTRAIN_RAY_WORKERS)."""
    server = start_server(tmp_path, tiny_model_path, extra_env={"POSTTRAIN_RUN_WORKER": "false",
                                                                "POSTTRAIN_LEASE_SECONDS": "15",
                                                                **getattr(request, "param", {})})
    log = open(tmp_path / "worker.log", "ab")  # noqa: SIM115 - lives as long as the worker
    worker = subprocess.Popen([sys.executable, "-m", "posttrain", "worker", "--log-level", "warning",
                               "--executor", "ray", "--address", ray_cluster],
                              cwd=REPO, env=server.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield server
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        log.close()
        stop_server(server)


def _submit(server, epochs: int) -> str:
    server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "colours",
                                      "source": {"type": "rows", "rows": colour_rows(repeat=8)}})
    body = lora_request(str(server.tiny_model_path), "colours")
    body["training_config"].update(n_epochs=epochs, max_steps_per_epoch=8)
    assert server.post("/v1/post-training/supervised-fine-tune", json=body,
                       headers={"X-Posttrain-Keep-Checkpoints": str(epochs)}).status_code == 200
    return body["job_uuid"]


def _ray_workers(status: dict) -> list[dict]:
    return (status.get("resources_allocated") or {}).get("ray", {}).get("workers", [])


def _spec_of(pid: int, home: Path) -> bool:
    try:
        return str(home) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_job_on_ray_completes_with_checkpoints_in_its_folder(ray_server):
    job_uuid = _submit(ray_server, epochs=2)
    final = ray_server.wait_for_job(job_uuid, lambda s: s["status"] in ("completed", "failed", "cancelled"), timeout=400)
    assert final["status"] == "completed", final
    assert [c["epoch"] for c in final["checkpoints"]] == [1, 2]
    resources = final["resources_allocated"]
    assert resources["executor"] == "ray" and resources["device"] == "cpu"
    assert [w["rank"] for w in resources["ray"]["workers"]] == [0] and resources["ray"]["group_starts"] == 1
    jobs_dir = (ray_server.home / "jobs").resolve()
    for checkpoint in final["checkpoints"]:
        path = Path(checkpoint["path"])
        assert path.resolve().is_relative_to(jobs_dir) and (path / "adapter_config.json").is_file()
        assert checkpoint["training_metrics"]["validation_loss"] > 0


@pytest.mark.skipif(importlib.util.find_spec("posttrain.trainer.distributed") is None,
                    reason="the trainer has no data parallel training (posttrain/trainer/distributed.py) yet")
@pytest.mark.parametrize("ray_server", [{"POSTTRAIN_RAY_WORKERS": "2"}], indirect=True)
def test_job_on_two_ray_workers_completes_as_one_data_parallel_job(ray_server):
    job_uuid = _submit(ray_server, epochs=2)
    final = ray_server.wait_for_job(job_uuid, lambda s: s["status"] in ("completed", "failed", "cancelled"), timeout=400)
    assert final["status"] == "completed", final
    assert [c["epoch"] for c in final["checkpoints"]] == [1, 2]
    resources = final["resources_allocated"]
    assert [w["rank"] for w in resources["ray"]["workers"]] == [0, 1]
    assert resources["world_size"] == 2 and resources["backend"] == "gloo"
    assert all((Path(c["path"]) / "adapter_config.json").is_file() for c in final["checkpoints"])


def test_cancel_stops_the_ray_job(ray_server):
    job_uuid = _submit(ray_server, epochs=50)
    ray_server.wait_for_job(job_uuid, lambda s: s["status"] == "in_progress" and _ray_workers(s), timeout=300)
    assert _trainers_running(ray_server), "the rank's trainer runs on the cluster"
    assert ray_server.post("/v1/post-training/job/cancel", json={"job_uuid": job_uuid}).status_code == 200
    assert ray_server.wait_for_job(job_uuid, lambda s: s["status"] == "cancelled", timeout=30)["status"] == "cancelled"
    deadline = time.monotonic() + 30
    while _trainers_running(ray_server) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _trainers_running(ray_server), "every rank's trainer stops on cancel"
    assert len(ray_server.job_status(job_uuid)["checkpoints"]) < 50


def _trainers_running(server) -> list[int]:
    return [pid for pid in _processes_mentioning("-m posttrain.trainer") if _spec_of(pid, server.home)]


def test_killed_ray_worker_resumes_the_job_from_its_newest_checkpoint(ray_server):
    job_uuid = _submit(ray_server, epochs=EPOCHS)
    running = ray_server.wait_for_job(job_uuid, lambda s: s["status"] == "in_progress" and s["checkpoints"]
                    and _ray_workers(s), timeout=300)
    (rank0,) = _ray_workers(running)
    os.kill(rank0["pid"], signal.SIGKILL)  # the Ray Train worker process of rank 0, and with it its trainer
    final = ray_server.wait_for_job(job_uuid, lambda s: s["status"] in ("completed", "failed", "cancelled"), timeout=400)
    assert final["status"] == "completed", final
    assert [c["epoch"] for c in final["checkpoints"]] == list(range(1, EPOCHS + 1))
    assert final["resources_allocated"]["ray"]["group_starts"] == 2
    assert final["resources_allocated"]["ray"]["workers"][0]["pid"] != rank0["pid"]
    events = _events(ray_server, job_uuid)
    started = [e["data"] for e in events if e["type"] == "started"]
    assert len(started) == 2 and started[0]["resumed_from"] is None
    assert started[1]["resumed_from"] is not None, "the restarted group resumes from a checkpoint"
    resumed_epoch = int(started[1]["resumed_from"].rsplit("-epoch-", 1)[1])
    epochs_after = {e["data"]["epoch"] for e in events if e["type"] == "metric" and e["seq"] > _seq_of_second(events)}
    assert epochs_after and min(epochs_after) == resumed_epoch + 1
    assert {e["data"]["attempt"] for e in events if e["type"] == "metric"} == {1}, "one attempt: Ray recovered it"


def _seq_of_second(events: list[dict]) -> int:
    return [e["seq"] for e in events if e["type"] == "started"][1]


def test_pause_reaches_the_trainer_on_ray_and_parks_the_job(ray_server):
    job_uuid = _submit(ray_server, epochs=50)
    ray_server.wait_for_job(job_uuid, lambda s: s["status"] == "in_progress" and _ray_workers(s), timeout=300)
    ray_server.wait_for_job(job_uuid, lambda _: any(e["type"] == "metric" for e in _events(ray_server, job_uuid)), timeout=120)
    assert ray_server.post(f"/v1/posttrain/jobs/{job_uuid}/pause").status_code == 200
    deadline = time.monotonic() + 60
    while _own_status(ray_server, job_uuid) != "paused":  # the Llama Stack status shows no ``paused``
        assert time.monotonic() < deadline, "the job never became paused"
        time.sleep(0.3)
    states = [e["data"] for e in _events(ray_server, job_uuid) if e["type"] == "state"]
    assert "paused after step" in states[-1].get("reason", ""), states[-1]  # the trainer's own ``paused`` line
    deadline = time.monotonic() + 30
    while _trainers_running(ray_server) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _trainers_running(ray_server), "the paused trainer has left"
    assert ray_server.post("/v1/post-training/job/cancel", json={"job_uuid": job_uuid}).status_code == 200


def _own_status(server, job_uuid: str) -> str:
    page = server.get("/v1/post-training/job/events", params={"job_uuid": job_uuid, "after": 10**9})
    return page.json()["status"]
