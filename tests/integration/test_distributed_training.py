"""One SFT job on two processes (gloo, CPU) under torch's launcher, started with the command the
worker's launcher runs: the same loss curve as one process with the same global batch, a
checkpoint of the same shape that loads with peft, every rank stopped by a cancel, and a rank
killed ending the attempt at once instead of hanging. A DPO job on two ranks matches one process
the same way (its loss, rewards and token accuracy)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from posttrain.worker.launcher import rank_pids, ranks_command
from tests.integration.test_trainer_process import make_spec, with_spec_keys
from tests.trainer_specs import finish as finish_trainer
from tests.trainer_specs import typed_spec_file

REPO = Path(__file__).resolve().parents[2]


def start(spec: Path, folder: Path, *, ranks: int) -> subprocess.Popen:
    """Start the trainer as the worker does: its command, its own process group, stdin a pipe held open."""
    command = ranks_command(sys.executable, 0, str(typed_spec_file(spec)), module="posttrain.trainer", ranks=ranks)
    with open(folder / "stderr.txt", "w") as stderr:
        return subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, text=True, process_group=0)


def finish(proc: subprocess.Popen, *, timeout: float = 120) -> tuple[list[dict], int]:
    """``trainer_specs.finish`` for a launcher of ranks: past ``timeout`` its whole process group is killed."""
    return finish_trainer(proc, timeout=timeout, kill=lambda: os.killpg(proc.pid, signal.SIGKILL))


def trained(tmp_path: Path, model: Path, *, ranks: int, accumulate: int, **training) -> list[dict]:
    folder = tmp_path / f"ranks-{ranks}"
    folder.mkdir()
    spec = make_spec(folder, model, gradient_accumulation_steps=accumulate, dtype="fp32", **training)
    events, code = finish(start(spec, folder, ranks=ranks))
    assert code == 0, (folder / "stderr.txt").read_text()[-3000:]
    return events


@pytest.mark.slow
def test_two_ranks_match_one_process_with_the_same_global_batch(tiny_model_path, tmp_path):
    one = trained(tmp_path, tiny_model_path, ranks=1, accumulate=2, n_epochs=2, max_steps_per_epoch=3)
    two = trained(tmp_path, tiny_model_path, ranks=2, accumulate=1, n_epochs=2, max_steps_per_epoch=3)
    kinds = [e["event"] for e in two if e["event"] != "log"]
    assert kinds == ["started", *["metric"] * 3, "checkpoint", *["metric"] * 3, "checkpoint", "completed"]

    resources = {e["event"]: e for e in two}["started"]["resources"]
    assert {key: resources[key] for key in ("world_size", "backend", "per_device_batch_size",
                                            "gradient_accumulation_steps", "global_batch_size")} == {
        "world_size": 2, "backend": "gloo", "per_device_batch_size": 4, "gradient_accumulation_steps": 1,
        "global_batch_size": 8}
    assert {e["event"]: e for e in one}["started"]["resources"]["global_batch_size"] == 8
    assert resources["parallelism"] == "ddp"  # LoRA on several ranks: data parallel, not sharded

    def curve(events):
        return [(m["step"], m["loss"], m["tokens"]) for m in events if m["event"] == "metric"]

    assert [(s, t) for s, _, t in curve(two)] == [(s, t) for s, _, t in curve(one)]  # the same rows each step
    assert [loss for _, loss, _ in curve(two)] == pytest.approx([loss for _, loss, _ in curve(one)], rel=1e-4)
    assert curve(two)[-1][1] < curve(two)[0][1]

    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    checkpoints = {e["path"] for e in one if e["event"] == "checkpoint"}, {
        e["path"] for e in two if e["event"] == "checkpoint"}
    for path_one, path_two in zip(*map(sorted, checkpoints), strict=True):
        assert sorted(p.name for p in Path(path_one).iterdir()) == sorted(p.name for p in Path(path_two).iterdir())
        weights_one, weights_two = (load_file(Path(p) / "adapter_model.safetensors") for p in (path_one, path_two))
        assert {k: v.shape for k, v in weights_one.items()} == {k: v.shape for k, v in weights_two.items()}
        assert all((weights_one[k] - weights_two[k]).abs().max() < 1e-3 for k in weights_one)
    model = AutoPeftModelForCausalLM.from_pretrained(sorted(checkpoints[1])[-1])
    assert model.generate(input_ids=__import__("torch").tensor([[1, 20, 30]]), max_new_tokens=3).shape[1] > 3
    # Only rank 0 wrote: one checkpoint folder per epoch, nothing else.
    assert sorted(p.name for p in (tmp_path / "ranks-2" / "out").iterdir()) == ["epoch_1", "epoch_2"]


def long_run(tmp_path: Path, model: Path, **keys) -> tuple[subprocess.Popen, list[int]]:
    """Two ranks on an epoch too long to finish, under way (a metric reported); their pids."""
    spec = with_spec_keys(make_spec(tmp_path, model, n_epochs=100, max_steps_per_epoch=1000, data_config={
        "dataset_id": "toy", "batch_size": 1, "shuffle": False, "data_format": "dialog"}), **keys)
    proc = start(spec, tmp_path, ranks=2)
    for line in proc.stdout:
        if json.loads(line)["event"] == "metric":
            ranks = rank_pids(proc.pid)
            assert len(ranks) == 2
            return proc, ranks
    pytest.fail(f"no metric before exit: {(tmp_path / 'stderr.txt').read_text()[-3000:]}")


def gone(pids: list[int], *, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.slow
def test_sigterm_stops_every_rank(tiny_model_path, tmp_path):
    proc, ranks = long_run(tmp_path, tiny_model_path)
    os.killpg(proc.pid, signal.SIGTERM)  # what the launcher sends on cancel
    events, _code = finish(proc, timeout=60)
    assert events[-1] == {"event": "cancelled"}, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert gone(ranks, within=10)


@pytest.mark.slow
def test_a_killed_rank_ends_the_attempt_promptly(tiny_model_path, tmp_path):
    proc, ranks = long_run(tmp_path, tiny_model_path)
    killed_at = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    events, code = finish(proc, timeout=60)
    assert code != 0 and time.monotonic() - killed_at < 30
    # No failed (the job is not at fault) and no completed: the launcher requeues the attempt.
    assert not {"failed", "completed"} & {e["event"] for e in events}
    assert gone(ranks, within=10)


@pytest.mark.slow
def test_pause_stops_both_ranks_at_one_step_with_a_resume_point(tiny_model_path, tmp_path):
    proc, ranks = long_run(tmp_path, tiny_model_path, resume_dir=str(tmp_path / "resume"))
    for pid in ranks:  # what the launcher sends to pause a job on several ranks
        os.kill(pid, signal.SIGUSR1)
    events, code = finish(proc, timeout=60)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    paused = events[-1]
    assert paused["event"] == "paused" and paused["resume_point"] == f"epoch-1-step-{paused['step']}"
    assert [p.name for p in (tmp_path / "resume").iterdir()] == [f"step_{paused['step']}"]
    assert gone(ranks, within=10)


@pytest.fixture
def two_rank_job(tiny_model_path, tmp_path):
    """A real SQLite store holding one scheduled SFT job that asks for 2 devices (2 epochs of 16
    steps of 1 row a rank), and a launch config that runs the real trainer on up to 2 ranks."""
    from posttrain.domain.jobs import JobKind
    from posttrain.domain.recipes import JobPlan
    from posttrain.store.engine import make_engine, migrate
    from posttrain.store.jobs import JobStore, new_job_id
    from tests.trainer_specs import typed_spec
    from tests.worker_helpers import launch_config

    draft = json.loads(make_spec(tmp_path, tiny_model_path, n_epochs=2, max_steps_per_epoch=16, data_config={
        "dataset_id": "toy", "batch_size": 1, "shuffle": False, "data_format": "instruct"}).read_text())
    recipe = typed_spec(draft).recipe.model_copy(update={"devices": 2})
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "train.jsonl").write_text((tmp_path / "train.jsonl").read_text())
    plan = JobPlan(recipe=recipe, model=str(tiny_model_path), output_dir=str(folder / "out"),
                   train_rows_path=str(folder / "train.jsonl"))
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    migrate(engine)
    store = JobStore(engine)
    job_id = new_job_id()
    store.create(job_id=job_id, job_uuid="ddp-1", tenant="t", kind=JobKind.SFT, request={}, plan=plan, max_attempts=2)
    config = launch_config(trainer_module="posttrain.trainer", devices_per_job=2, device="cpu", threads=2,
                           lease_seconds=30.0, cancel_grace_seconds=20.0)
    yield store, job_id, config
    engine.dispose()


def _launch(store, config, owner: str):
    from posttrain.worker.launcher import Launcher

    launcher = Launcher(job=store.claim_next(owner=owner, lease_seconds=30), owner=owner, store=store, config=config)
    assert launcher.world_size() == 2
    thread = threading.Thread(target=launcher.run)
    thread.start()
    return launcher, thread


def _ranks_under_way(store, job_id: str, launcher) -> list[int]:
    from tests.worker_helpers import wait_for

    def metrics() -> int:
        return sum(e.type == "metric" for e in store.events(job_id=job_id))

    before = metrics()  # an earlier attempt's steps
    wait_for(lambda: launcher._started.is_set() and metrics() > before, timeout=120, what="a step of this attempt")
    ranks = rank_pids(launcher._process.pid)
    assert len(ranks) == 2
    return ranks


@pytest.mark.slow
def test_a_job_whose_rank_is_killed_is_requeued_and_resumes_from_its_checkpoint(two_rank_job):
    """The worker's path end to end: one of the launcher's 2 ranks is killed after the first epoch's
    checkpoint, the attempt is requeued (charged), and the next attempt resumes from that
    checkpoint on 2 ranks and completes."""
    from posttrain.domain.jobs import JobStatus
    from tests.worker_helpers import wait_for

    store, job_id, config = two_rank_job
    launcher, thread = _launch(store, config, "w1")
    wait_for(lambda: store.get(job_id=job_id).checkpoints, timeout=120, what="the first checkpoint")
    os.kill(rank_pids(launcher._process.pid)[1], signal.SIGKILL)
    thread.join(timeout=60)
    assert not thread.is_alive()
    requeued = store.get(job_id=job_id)
    assert (requeued.status, requeued.attempt) == (JobStatus.SCHEDULED, 1)
    assert requeued.resources["world_size"] == 2 and requeued.resources["backend"] == "gloo"

    _launcher, thread = _launch(store, config, "w2")
    thread.join(timeout=180)
    done = store.get(job_id=job_id)
    assert done.status is JobStatus.COMPLETED, done.error_message
    assert [c.identifier for c in done.checkpoints] == ["ddp-1-epoch-1", "ddp-1-epoch-2"]
    started = [e.data for e in store.events(job_id=job_id) if e.type == "started"]
    assert [s["resumed_from"] for s in started] == [None, "ddp-1-epoch-1"]


@pytest.mark.slow
def test_the_launcher_pauses_and_cancels_a_job_on_two_ranks(two_rank_job):
    """A pause from the store reaches both ranks (SIGUSR1 to each), which stop at one step and park
    the job; resumed, it continues from that step on 2 ranks, and a cancel stops both."""
    from posttrain.domain.jobs import JobStatus

    store, job_id, config = two_rank_job
    launcher, thread = _launch(store, config, "w1")
    ranks = _ranks_under_way(store, job_id, launcher)
    assert store.pause(job_id=job_id) is JobStatus.PAUSING
    thread.join(timeout=60)
    parked = store.get(job_id=job_id)
    assert parked.status is JobStatus.PAUSED
    assert gone(ranks, within=10)

    store.resume(job_id=job_id)
    launcher, thread = _launch(store, config, "w2")
    ranks = _ranks_under_way(store, job_id, launcher)
    started = [e.data for e in store.events(job_id=job_id) if e.type == "started"]
    assert started[-1]["resumed_from"] is not None  # the pause's resume point (or epoch 1's checkpoint)
    store.cancel(job_id=job_id)
    thread.join(timeout=60)
    assert store.get(job_id=job_id).status is JobStatus.CANCELLED
    assert gone(ranks, within=10)


SFT = "/v1/post-training/supervised-fine-tune"
HEADER = "X-Posttrain-Devices"


def test_the_devices_header_goes_into_the_recipe_capped_by_the_operator(client, services, settings, tiny_model_path,
                                                                        tmp_path):
    """The Llama Stack body stays the spec's; the devices ride in our header, a bad one is a 400
    naming it and creates nothing; the launcher starts at most POSTTRAIN_DEVICES_PER_JOB ranks."""
    from posttrain.worker.launcher import Launcher
    from tests.integration.test_api import assert_problem, lora_request, register
    from tests.worker_helpers import launch_config

    register(client)
    for bad, words in (("two", ["whole number"]), ("0", ["greater than or equal"]), ("5000", ["less than or equal"])):
        assert_problem(client.post(SFT, json=lora_request(str(tiny_model_path), "toy"), headers={HEADER: bad}), 400,
                       HEADER, *words)
    assert client.get("/v1/post-training/jobs").json() == {"data": []}

    asked, plain = lora_request(str(tiny_model_path), "toy"), lora_request(str(tiny_model_path), "toy")
    assert client.post(SFT, json=asked, headers={HEADER: "3"}).status_code == 200
    assert client.post(SFT, json=plain).status_code == 200
    jobs = [services.jobs.store.find(tenant="default", job_uuid=body["job_uuid"]) for body in (asked, plain)]
    assert [job.plan.recipe.devices for job in jobs] == [3, None]
    for cap, ranks in ((1, [1, 1]), (2, [2, 2]), (4, [3, 4])):
        config = launch_config(devices_per_job=cap)
        assert [Launcher(job=job, owner="w", store=services.jobs.store, config=config).world_size()
                for job in jobs] == ranks


def test_a_dpo_job_takes_the_devices_header_too(client, services, tiny_model_path):
    from posttrain.worker.launcher import Launcher
    from tests.integration.test_api import dpo_request, register
    from tests.worker_helpers import launch_config

    register(client)
    body = dpo_request(str(tiny_model_path), "toy")
    assert client.post("/v1/post-training/preference-optimize", json=body, headers={HEADER: "2"}).status_code == 200
    job = services.jobs.store.find(tenant="default", job_uuid=body["job_uuid"])
    assert job.plan.recipe.devices == 2
    assert Launcher(job=job, owner="w", store=services.jobs.store, config=launch_config(devices_per_job=4)
                    ).world_size() == 2


def test_only_supervised_fine_tuning_and_dpo_ask_for_several_devices():
    from posttrain.domain.recipes import build_recipe
    from posttrain.errors import RecipeInvalid

    assert build_recipe({"method": "sft", "devices": 4}).devices == 4
    assert build_recipe({"method": "dpo", "dpo": {}, "adapter": {"architecture_defaults": True}, "devices": 2}).devices == 2
    with pytest.raises(RecipeInvalid, match="one device"):
        build_recipe({"method": "grpo", "adapter": {"architecture_defaults": True}, "devices": 2, "grpo": {
            "grader": {"type": "string_check", "name": "eq", "input": "{{sample.output_text}}",
                       "reference": "{{item.answer}}", "operation": "eq"}}})


def test_a_job_on_several_gpus_holds_that_many():
    from posttrain.worker.devices import GpuPool

    pool = GpuPool(["0", "1", "2", "3", "4"], per_job=2)
    assert pool.free() == 2
    first, second = pool.take(), pool.take()
    assert (first, second, pool.take(), pool.free()) == ("0,1", "2,3", None, 0)
    pool.give_back(first)
    assert pool.free() == 1 and pool.take() == "0,1"


@pytest.mark.slow
def test_dpo_on_two_ranks_matches_one_process_with_the_same_global_batch(tiny_model_path, tmp_path):
    from tests.integration import test_dpo_trainer as dpo

    def dpo_run(ranks: int, accumulate: int) -> list[dict]:
        folder = tmp_path / f"dpo-{ranks}"
        folder.mkdir()
        spec = dpo.make_spec(folder, tiny_model_path, gradient_accumulation_steps=accumulate, dtype="fp32",
                             n_epochs=2, max_steps_per_epoch=2)
        events, code = finish(start(spec, folder, ranks=ranks))
        assert code == 0, (folder / "stderr.txt").read_text()[-3000:]
        return events

    one, two = dpo_run(1, 2), dpo_run(2, 1)
    assert [e["event"] for e in two if e["event"] != "log"] == [
        "started", "metric", "metric", "checkpoint", "metric", "metric", "checkpoint", "completed"]
    resources = {e["event"]: e for e in two}["started"]["resources"]
    assert {key: resources[key] for key in ("world_size", "backend", "parallelism", "global_batch_size")} == {
        "world_size": 2, "backend": "gloo", "parallelism": "ddp", "global_batch_size": 8}

    def curve(events):
        return [(m["step"], m["tokens"], m["loss"], m["reward_margin"], m["train_mean_token_accuracy"])
                for m in events if m["event"] == "metric"]

    assert [c[:2] for c in curve(two)] == [c[:2] for c in curve(one)]  # the same pairs each step
    for key in (2, 3, 4):
        assert [c[key] for c in curve(two)] == pytest.approx([c[key] for c in curve(one)], rel=1e-4, abs=1e-6)
    # The second epoch's reference log-probs come from each rank's own cache, and still match. The
    # first step starts at equal models (loss ln 2, no margin); the adapter then moves on both ranks.
    assert curve(two)[0][2] == pytest.approx(0.693147, abs=1e-5) and abs(curve(two)[-1][3]) > 1e-4
    checkpoints = [[e for e in run if e["event"] == "checkpoint"] for run in (one, two)]
    for first, second in zip(*checkpoints, strict=True):
        assert second["validation_loss"] == pytest.approx(first["validation_loss"], rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "dpo-2" / "out").iterdir()) == ["epoch_1", "epoch_2"]
