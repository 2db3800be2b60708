"""A real GRPO job through the trainer process on a tiny model: the model is first taught by a short
SFT to answer "Pick a colour." with one of four colours, then GRPO with an exact-match grader for
one colour raises its mean reward; the events, the checkpoint and a resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from posttrain.domain.recipes import JobPlan, TrainerSpec, build_recipe
from tests.fixtures_tiny import build_tiny_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

REPO = Path(__file__).resolve().parents[2]
COLOURS = ["red", "blue", "green", "white"]
PROMPT = [{"role": "user", "content": "Pick a colour."}]
GRADER = {"type": "string_check", "name": "is_red", "input": "{{sample.output_text}}",
          "reference": "{{item.answer}}", "operation": "eq"}


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory)


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _spec(tmp_path: Path, *, name: str, model: Path, rows: Path, recipe: dict, **worker) -> Path:
    output = tmp_path / f"{name}-out"
    output.mkdir(exist_ok=True)
    plan = JobPlan(recipe=build_recipe(recipe), model=str(model), output_dir=str(output), train_rows_path=str(rows))
    spec = TrainerSpec(job_uuid=name, plan=plan, device="cpu", threads=1, compile="off", **worker)
    path = tmp_path / f"{name}-spec.json"
    path.write_text(spec.model_dump_json())
    return path


def _start(spec: Path, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    stderr = open(tmp_path / f"{spec.stem}-stderr.txt", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.trainer", str(spec)], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
    stderr.close()
    return proc


def _finish(proc: subprocess.Popen, *, timeout: float = 400) -> tuple[list[dict], int]:
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        out = proc.stdout.read()
        code = proc.wait()
    finally:
        killer.cancel()
        proc.stdin.close()
        proc.stdout.close()
    return [json.loads(line) for line in out.splitlines()], code


def _run(spec: Path, tmp_path: Path) -> list[dict]:
    events, code = _finish(_start(spec, tmp_path))
    assert code == 0, (tmp_path / f"{spec.stem}-stderr.txt").read_text()[-3000:]
    return events


@pytest.fixture(scope="module")
def colour_model(tiny_model_path, tmp_path_factory) -> Path:
    """The tiny model after a short full SFT on 'Pick a colour.' -> one of four colours."""
    tmp = tmp_path_factory.mktemp("colour-sft")
    rows = _write_rows(tmp / "sft.jsonl", [{"messages": [*PROMPT, {"role": "assistant", "content": c}]}
                                           for _ in range(16) for c in COLOURS])
    recipe = {"method": "sft", "data": {"batch_size": 4, "data_format": "dialog"},
              "schedule": {"n_epochs": 5, "max_steps_per_epoch": 16},
              "optimizer": {"lr": 1e-2}, "dtype": "fp32", "seed": 0}
    events = _run(_spec(tmp, name="sft", model=tiny_model_path, rows=rows, recipe=recipe, keep_checkpoints=1), tmp)
    return Path([e for e in events if e["event"] == "checkpoint"][-1]["path"])


def _grpo_recipe(**grpo) -> dict:
    return {"method": "grpo", "adapter": {"architecture_defaults": True, "rank": 8, "alpha": 16},
            "data": {"batch_size": 2}, "schedule": {"n_epochs": 2, "max_steps_per_epoch": 8},
            "optimizer": {"lr": 5e-2}, "dtype": "fp32", "seed": 0,
            "grpo": {"grader": GRADER, "num_generations": 8, "max_completion_length": 4, "beta": 0.04,
                     "temperature": 1.0, "eval_interval": 3, "eval_samples": 8, **grpo}}


def _grpo_rows(tmp_path: Path) -> Path:
    return _write_rows(tmp_path / "grpo.jsonl", [{"messages": PROMPT, "answer": "red"} for _ in range(16)])


def test_grpo_job_raises_the_mean_reward(colour_model, tmp_path):
    spec = _spec(tmp_path, name="grpo", model=colour_model, rows=_grpo_rows(tmp_path), recipe=_grpo_recipe())
    events = _run(spec, tmp_path)
    kinds = [e["event"] for e in events if e["event"] != "log"]
    assert kinds == ["started", *["metric"] * 8, "checkpoint", *["metric"] * 8, "checkpoint", "completed"]
    assert events[0]["resources"]["method"] == "grpo" and events[0]["total_steps"] == 16
    metrics = [e for e in events if e["event"] == "metric"]
    for m in metrics:
        assert 0 <= m["reward_mean"] <= 1 and m["reward/is_red"] == m["reward_mean"]
        assert m["kl"] >= 0 and m["entropy"] >= 0 and 1 <= m["completion_length"] <= 4
        assert m["clip_ratio_region"] == 0  # on-policy: the ratio is 1
    assert [("valid_reward_mean" in m) for m in metrics] == [s % 3 == 0 for s in range(1, 17)]
    first, last = metrics[:3], metrics[-3:]
    assert sum(m["reward_mean"] for m in last) / 3 > sum(m["reward_mean"] for m in first) / 3 + 0.2
    assert metrics[14]["valid_reward_mean"] > metrics[2]["valid_reward_mean"] + 0.2
    checkpoint = [e for e in events if e["event"] == "checkpoint"][-1]
    state = json.loads((Path(checkpoint["path"]) / "trainer_state.json").read_text())
    assert state["method"] == "grpo" and state["validation"]["validation_reward_mean"] > 0.3
    assert (Path(checkpoint["path"]) / "adapter_config.json").is_file()


def test_kill_9_mid_job_resumes_from_the_newest_checkpoint(colour_model, tmp_path):
    recipe = _grpo_recipe(beta=0.0, eval_interval=100, num_generations=4)
    recipe["schedule"] = {"n_epochs": 3, "max_steps_per_epoch": 2}
    spec = _spec(tmp_path, name="grpo-kill", model=colour_model, rows=_grpo_rows(tmp_path), recipe=recipe)
    proc = _start(spec, tmp_path)
    seen = []
    for line in proc.stdout:
        seen.append(json.loads(line))
        if seen[-1]["event"] == "metric" and seen[-1]["step"] == 3:  # epoch 1 is checkpointed
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdin.close()
    proc.stdout.close()
    assert any(e["event"] == "checkpoint" and e["epoch"] == 1 for e in seen)
    events = _run(spec, tmp_path)
    started = events[0]
    assert started["resumed_from"] == "grpo-kill-epoch-1"
    steps = [e["step"] for e in events if e["event"] == "metric"]
    assert steps == [3, 4, 5, 6]
    assert [e["epoch"] for e in events if e["event"] == "checkpoint"] == [1, 2, 3]
    assert events[-1]["event"] == "completed"


def test_pause_writes_a_resume_point_and_the_job_continues_from_it(colour_model, tmp_path):
    recipe = _grpo_recipe(beta=0.0, eval_interval=100, num_generations=4)
    recipe["schedule"] = {"n_epochs": 1, "max_steps_per_epoch": 4}
    spec = _spec(tmp_path, name="grpo-pause", model=colour_model, rows=_grpo_rows(tmp_path), recipe=recipe,
                 resume_dir=str(tmp_path / "resume"))
    proc = _start(spec, tmp_path)
    seen = []
    for line in proc.stdout:
        seen.append(json.loads(line))
        if seen[-1]["event"] == "metric" and seen[-1]["step"] == 1:
            os.kill(proc.pid, signal.SIGUSR1)
    events, code = _finish(proc)
    events = seen + events
    assert code == 0 and events[-1]["event"] == "paused", events[-3:]
    paused = events[-1]
    assert paused["resume_point"] == f"epoch-1-step-{paused['step']}" and paused["step"] < 4
    resumed = _run(spec, tmp_path)
    assert resumed[0]["resumed_from"] == f"grpo-pause-epoch-1-step-{paused['step']}"
    assert [e["step"] for e in resumed if e["event"] == "metric"] == list(range(paused["step"] + 1, 5))
    assert resumed[-1]["event"] == "completed"
