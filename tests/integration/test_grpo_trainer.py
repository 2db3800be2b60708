"""Real GRPO jobs through the trainer process on a tiny model: the model is first taught by a short
SFT to answer "Pick a colour." with one of eight colours, each about as likely (so a grader for one
colour starts near 1/8), then GRPO raises the mean reward past 0.8, with a ``string_check``, a
``python`` (the real sandbox) and a ``multi`` grader; the events, the checkpoint and a resume after
kill -9. One SFT warm-up (module scope) serves every test here."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.domain.recipes import JobPlan, TrainerSpec, build_recipe
from tests.fixtures_tiny import build_tiny_model
from tests.trainer_specs import finish

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

REPO = Path(__file__).resolve().parents[2]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "purple", "brown"]
TARGET = "blue"
PROMPT = [{"role": "user", "content": "Pick a colour."}]
GRADER = {"type": "string_check", "name": "is_blue", "input": "{{sample.output_text}}",
          "reference": "{{item.answer}}", "operation": "eq"}
PYTHON_GRADER = {"type": "python", "name": "exact",
                 "source": "def grade(sample, item) -> float:\n"
                           "    return 1.0 if sample['output_text'] == item['answer'] else 0.0\n"}
MULTI_GRADER = {"type": "multi", "name": "blue_and_close",
                "graders": {"is_blue": GRADER,
                            "close": {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}",
                                      "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"}},
                "calculate_output": "0.5 * is_blue + 0.5 * close"}
#: Steps of the learning runs, and how many at each end the assertions average.
LEARN_STEPS, WINDOW = 16, 3


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


def _run(spec: Path, tmp_path: Path) -> list[dict]:
    events, code = finish(_start(spec, tmp_path), timeout=400)
    assert code == 0, (tmp_path / f"{spec.stem}-stderr.txt").read_text()[-3000:]
    return events


@pytest.fixture(scope="module")
def colour_model(tiny_model_path, tmp_path_factory) -> Path:
    """The tiny model after a short full SFT on 'Pick a colour.' -> one of eight colours. Unshuffled,
    so each batch of 8 holds every colour once (shuffled batches are grouped by length and hold few
    colours each, and the model would end up favouring the last ones it saw)."""
    tmp = tmp_path_factory.mktemp("colour-sft")
    rows = _write_rows(tmp / "sft.jsonl", [{"messages": [*PROMPT, {"role": "assistant", "content": c}]}
                                           for _ in range(8) for c in COLOURS])
    recipe = {"method": "sft", "data": {"batch_size": 8, "data_format": "dialog", "shuffle": False},
              "schedule": {"n_epochs": 10, "max_steps_per_epoch": 8},
              "optimizer": {"lr": 3e-3}, "dtype": "fp32", "seed": 0}
    events = _run(_spec(tmp, name="sft", model=tiny_model_path, rows=rows, recipe=recipe, keep_checkpoints=1), tmp)
    return Path([e for e in events if e["event"] == "checkpoint"][-1]["path"])


def _grpo_recipe(*, grader: dict = GRADER, **grpo) -> dict:
    """What a user would set for this task: a LoRA adapter on the attention, the MLP and the output
    layer (on a 64-wide, 2-layer model the attention alone barely moves the answer's distribution),
    a LoRA-sized learning rate, 2 prompts x 8 completions a step, room for the longest colour
    (black: 4 tokens) and its end token."""
    return {"method": "grpo",
            "adapter": {"architecture_defaults": True, "mlp": True, "output": True, "rank": 16, "alpha": 32},
            "data": {"batch_size": 2}, "schedule": {"n_epochs": 1, "max_steps_per_epoch": LEARN_STEPS},
            "optimizer": {"lr": 1e-2}, "dtype": "fp32", "seed": 0,
            "grpo": {"grader": grader, "num_generations": 8, "max_completion_length": 6, "beta": 0.0,
                     "temperature": 1.0, "eval_interval": 4, "eval_samples": 16, **grpo}}


def _grpo_rows(tmp_path: Path, n: int = 2 * LEARN_STEPS) -> Path:
    return _write_rows(tmp_path / "grpo.jsonl", [{"messages": PROMPT, "answer": TARGET} for _ in range(n)])


def _learn(colour_model: Path, tmp_path: Path, name: str, grader: dict, **grpo) -> tuple[list[dict], list[dict]]:
    """A GRPO job of LEARN_STEPS steps with ``grader``; its events and its step metrics. Asserts the
    mean reward of the last WINDOW steps, and the last validation reward, are 0.8 or more."""
    spec = _spec(tmp_path, name=name, model=colour_model, rows=_grpo_rows(tmp_path),
                 recipe=_grpo_recipe(grader=grader, **grpo))
    started = time.monotonic()
    events = _run(spec, tmp_path)
    seconds = time.monotonic() - started
    metrics = [e for e in events if e["event"] == "metric"]
    assert [m["step"] for m in metrics] == list(range(1, LEARN_STEPS + 1))
    last = sum(m["reward_mean"] for m in metrics[-WINDOW:]) / WINDOW
    valid = [m["valid_reward_mean"] for m in metrics if "valid_reward_mean" in m]
    print(f"{name}: reward {metrics[0]['reward_mean']:.3f} -> {last:.3f}, validation {valid}, {seconds:.0f} s")
    assert last >= 0.8, [m["reward_mean"] for m in metrics]
    assert valid[-1] >= 0.8, valid
    return events, metrics


def test_grpo_with_a_string_check_grader_raises_the_reward_from_one_eighth_past_0_8(colour_model, tmp_path):
    events, metrics = _learn(colour_model, tmp_path, "grpo", GRADER)
    assert metrics[0]["reward_mean"] <= 0.35  # before any update: one colour in eight, give or take 16 samples
    kinds = [e["event"] for e in events if e["event"] != "log"]
    assert kinds == ["started", *["metric"] * LEARN_STEPS, "checkpoint", "completed"]
    assert events[0]["resources"]["method"] == "grpo" and events[0]["total_steps"] == LEARN_STEPS
    for m in metrics:
        assert 0 <= m["reward_mean"] <= 1 and m["reward/is_blue"] == m["reward_mean"]
        assert m["entropy"] >= 0 and 1 <= m["completion_length"] <= 6 and "kl" not in m  # beta 0
        assert m["clip_ratio_region"] == 0  # on-policy: the ratio is 1
    assert [("valid_reward_mean" in m) for m in metrics] == [s % 4 == 0 for s in range(1, LEARN_STEPS + 1)]
    checkpoint = [e for e in events if e["event"] == "checkpoint"][-1]
    state = json.loads((Path(checkpoint["path"]) / "trainer_state.json").read_text())
    assert state["method"] == "grpo" and state["validation"]["validation_reward_mean"] >= 0.8
    # The checkpoint's losses (the Llama Stack status's training_metrics): the mean GRPO step loss,
    # the negated validation reward, the policy's perplexity of its own validation completions.
    assert checkpoint["train_loss"] == pytest.approx(sum(m["loss"] for m in metrics) / LEARN_STEPS)
    assert checkpoint["validation_loss"] == pytest.approx(-state["validation"]["validation_reward_mean"])
    assert checkpoint["perplexity"] == pytest.approx(math.exp(state["validation"]["validation_completion_nll"]))
    assert checkpoint["perplexity"] >= 1
    assert (Path(checkpoint["path"]) / "adapter_config.json").is_file()


def test_grpo_with_a_python_grader_in_the_sandbox_raises_the_reward_past_0_8(colour_model, tmp_path):
    _, metrics = _learn(colour_model, tmp_path, "grpo-python", PYTHON_GRADER)
    assert metrics[0]["reward_mean"] <= 0.35
    assert all(m["reward/exact"] == m["reward_mean"] for m in metrics)


def test_grpo_with_a_multi_grader_reports_each_graders_mean_and_raises_the_reward(colour_model, tmp_path):
    _, metrics = _learn(colour_model, tmp_path, "grpo-multi", MULTI_GRADER)
    for m in metrics:  # calculate_output is linear, so the step's mean reward is it of the graders' means
        assert m["reward_mean"] == pytest.approx(0.5 * m["reward/is_blue"] + 0.5 * m["reward/close"])
        assert m["reward/close"] >= m["reward/is_blue"]  # the exact colour is also the closest text
    assert metrics[0]["reward/is_blue"] <= 0.35
    assert sum(m["reward/is_blue"] for m in metrics[-WINDOW:]) / WINDOW >= 0.8


def test_kill_9_mid_job_resumes_from_the_newest_checkpoint(colour_model, tmp_path):
    recipe = _grpo_recipe(eval_interval=100, eval_samples=4, num_generations=4)
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
    recipe = _grpo_recipe(eval_interval=100, eval_samples=4, num_generations=4)
    recipe["schedule"] = {"n_epochs": 1, "max_steps_per_epoch": 4}
    spec = _spec(tmp_path, name="grpo-pause", model=colour_model, rows=_grpo_rows(tmp_path), recipe=recipe,
                 resume_dir=str(tmp_path / "resume"))
    proc = _start(spec, tmp_path)
    seen = []
    for line in proc.stdout:
        seen.append(json.loads(line))
        if seen[-1]["event"] == "metric" and seen[-1]["step"] == 1:
            os.kill(proc.pid, signal.SIGUSR1)
    events, code = finish(proc, timeout=400)
    events = seen + events
    assert code == 0 and events[-1]["event"] == "paused", events[-3:]
    paused = events[-1]
    assert paused["resume_point"] == f"epoch-1-step-{paused['step']}" and paused["step"] < 4
    resumed = _run(spec, tmp_path)
    assert resumed[0]["resumed_from"] == f"grpo-pause-epoch-1-step-{paused['step']}"
    assert [e["step"] for e in resumed if e["event"] == "metric"] == list(range(paused["step"] + 1, 5))
    assert resumed[-1]["event"] == "completed"
