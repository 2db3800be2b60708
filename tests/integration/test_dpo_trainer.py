"""The DPO trainer as a real subprocess on a tiny model: learning, loss types, from an SFT adapter,
bad rows, SIGTERM."""

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

from tests.conftest import cpu_dtype_for_bf16
from tests.fixtures_tiny import build_tiny_model
from tests.trainer_specs import finish, typed_spec_file

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

REPO = Path(__file__).resolve().parents[2]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
THINGS = ["apple", "sea", "leaf", "sun", "snow", "coffee", "box", "stone",
          "shoe", "sky", "grass", "flower", "cat", "dog", "bird", "tree"]
LORA = {"type": "LoRA", "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
        "apply_lora_to_mlp": False, "apply_lora_to_output": False, "rank": 8, "alpha": 16,
        "use_dora": False, "quantize_base": False}


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory)


def preference_rows() -> list[dict]:
    """16 prompts, each with one fixed right answer (chosen) and one fixed wrong one (rejected).
    Odd rows use message lists, even rows plain strings."""
    rows = []
    for i, thing in enumerate(THINGS):
        question = f"What is the colour of the {thing}?"
        chosen, rejected = f"It is {COLOURS[i % 8]}.", "I do not know."
        if i % 2:
            rows.append({"prompt": [{"role": "user", "content": question}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            rows.append({"prompt": question, "chosen": chosen, "rejected": rejected})
    return rows


def make_spec(tmp_path: Path, model: Path, *, lines: list[str] | None = None, loss_type: str = "sigmoid",
              beta: float = 0.1, adapter: Path | None = None, **training) -> Path:
    rows_path = tmp_path / "train.jsonl"
    lines = lines if lines is not None else [json.dumps(row) for row in preference_rows()]
    rows_path.write_text("\n".join(lines) + "\n")
    config = {
        "n_epochs": 2, "max_steps_per_epoch": 4, "gradient_accumulation_steps": 1, "max_validation_steps": 2,
        "data_config": {"dataset_id": "prefs", "batch_size": 4, "shuffle": True, "data_format": "instruct"},
        "optimizer_config": {"optimizer_type": "adamw", "lr": 2e-2, "weight_decay": 0.0, "num_warmup_steps": 0},
        "dtype": "bf16",
    }
    config.update(training)
    spec = {
        "job_uuid": "dpo-1", "method": "dpo", "model": str(model), "adapter": str(adapter) if adapter else None,
        "output_dir": str(tmp_path / "out"), "train_rows_path": str(rows_path), "validation_rows_path": None,
        "training_config": config, "algorithm_config": {"beta": beta, "loss_type": loss_type, "lora": LORA},
        "device": "cpu", "threads": 1, "seed": 0, "trust_remote_code": False,
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def start(spec: Path, tmp_path: Path) -> subprocess.Popen:
    """Launch like the worker does: stdin is a pipe we hold open, stderr goes to a file."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    stderr = open(tmp_path / "stderr.txt", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.trainer", str(typed_spec_file(spec))], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
    stderr.close()
    return proc


def run(spec: Path, tmp_path: Path) -> tuple[list[dict], int]:
    return finish(start(spec, tmp_path))


def kinds(events: list[dict]) -> list[str]:
    return [e["event"] for e in events if e["event"] != "log"]


def metrics_of(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "metric"]


def stderr_tail(tmp_path: Path) -> str:
    return (tmp_path / "stderr.txt").read_text()[-3000:]


def _margins(model, tokenizer) -> list[float]:
    """Summed log p(chosen) - log p(rejected) per toy row, under ``model``."""
    import torch

    from posttrain.trainer.dpo_loss import answer_logps
    from posttrain.trainer.precision import Precision
    from posttrain.trainer.preference_data import collate_pairs, encode_preference_rows

    examples = encode_preference_rows(preference_rows(), tokenizer=tokenizer, max_length=512)
    batch = collate_pairs(examples, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logps = answer_logps(model.eval(), batch, precision=Precision("cpu", "fp32", "fp32"), average=False)
    return (logps[: len(examples)] - logps[len(examples):]).tolist()


@pytest.mark.slow
def test_loss_formulas_match_trl():
    """Hand-computed values of TRL's formulas (policy/reference summed log-probs of two pairs)."""
    import torch

    from posttrain.trainer.dpo_loss import dpo_loss

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    # chosen log-ratios [1, 0], rejected [-1, 1] -> logits [2, -1]
    expected = {
        "sigmoid": [math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))],
        "hinge": [0.0, 1.5],
        "ipo": [(2 - 1) ** 2, (-1 - 1) ** 2],
        # chosen_KL = mean([1, 0]) = 0.5, rejected_KL = mean([-1, 1]) = 0 (clamped at 0)
        "kto_pair": [1 - sigmoid(0.5 * (1 - 0)), 1 - sigmoid(0.5 * (0 - 0)),
                     1 - sigmoid(0.5 * (0.5 + 1)), 1 - sigmoid(0.5 * (0.5 - 1))],
    }
    for loss_type, values in expected.items():
        losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type)
        assert losses.tolist() == pytest.approx(values, abs=1e-6), loss_type
        assert chosen.tolist() == [0.5, 0.0] and rejected.tolist() == [-0.5, 0.5]


@pytest.mark.slow
def test_sigmoid_dpo_learns_the_preferences_and_checkpoints_load(tiny_model_path, tmp_path):
    events, code = run(make_spec(tmp_path, tiny_model_path, beta=0.5), tmp_path)
    assert code == 0, stderr_tail(tmp_path)
    assert kinds(events) == ["started", *["metric"] * 4, "checkpoint", *["metric"] * 4, "checkpoint", "completed"]
    started = events[0]
    assert started["total_steps"] == 8 and started["resumed_from"] is None
    resources = started["resources"]
    assert resources["method"] == "dpo" and resources["loss_type"] == "sigmoid"
    assert resources["dtype"] == cpu_dtype_for_bf16()
    assert 0 < resources["trainable_parameters"] < resources["parameters"]

    metrics = metrics_of(events)
    assert [(m["step"], m["epoch"]) for m in metrics] == [(s, 1 + (s > 4)) for s in range(1, 9)]
    for m in metrics:
        assert {"loss", "lr", "tokens_per_s", "reward_margin", "reward_accuracy", "chosen_reward",
                "rejected_reward", "total_steps"} <= set(m)
        assert m["reward_margin"] == pytest.approx(m["chosen_reward"] - m["rejected_reward"], abs=1e-6)
        assert 0 <= m["reward_accuracy"] <= 1 and m["tokens_per_s"] > 0 and m["total_steps"] == 8
    # Step 1: the new adapter is zero, so policy == reference: loss ln 2, no margin.
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics[0]["reward_margin"] == pytest.approx(0, abs=1e-4)
    first, last = metrics[:2], metrics[-2:]
    def mean(ms: list[dict], key: str) -> float:
        return sum(m[key] for m in ms) / len(ms)

    assert mean(last, "loss") < mean(first, "loss") - 0.2
    assert mean(last, "reward_margin") > mean(first, "reward_margin") + 1.0
    assert mean(last, "reward_accuracy") == 1.0

    checkpoints = [e for e in events if e["event"] == "checkpoint"]
    for epoch, event in enumerate(checkpoints, start=1):
        assert event["identifier"] == f"dpo-1-epoch-{epoch}" and event["step"] == 4 * epoch
        assert event["path"] == str(tmp_path / "out" / f"epoch_{epoch}")
        # The policy's perplexity on the chosen answers (tests/integration/test_dpo_checkpoints.py), not exp(DPO loss).
        assert event["perplexity"] > 1 and event["perplexity"] != pytest.approx(math.exp(event["validation_loss"]))
    assert checkpoints[1]["validation_loss"] < checkpoints[0]["validation_loss"] < math.log(2)
    state = json.loads((tmp_path / "out" / "epoch_2" / "trainer_state.json").read_text())
    assert state["method"] == "dpo" and state["validation"]["validation_reward_accuracy"] == 1.0

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoints[1]["path"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    base_margins = _margins(AutoModelForCausalLM.from_pretrained(tiny_model_path), tokenizer)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), path)
    tuned_margins = _margins(tuned, tokenizer)
    assert all(t > b for t, b in zip(tuned_margins, base_margins, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize(("loss_type", "first_loss"), [("hinge", 1.0), ("ipo", 25.0), ("kto_pair", 0.5)])
def test_other_loss_types_give_finite_losses(tiny_model_path, tmp_path, loss_type, first_loss):
    spec = make_spec(tmp_path, tiny_model_path, loss_type=loss_type, n_epochs=1, max_steps_per_epoch=2,
                     max_validation_steps=1, gradient_accumulation_steps=2 if loss_type == "kto_pair" else 1)
    events, code = run(spec, tmp_path)
    assert code == 0, stderr_tail(tmp_path)
    assert kinds(events) == ["started", "metric", "metric", "checkpoint", "completed"]
    metrics = metrics_of(events)
    assert all(math.isfinite(m[key]) for m in metrics for key in ("loss", "reward_margin", "chosen_reward"))
    # policy == reference at step 1: logits 0 -> hinge 1, ipo (1/(2*0.1))^2, kto_pair 1 - sigmoid(0).
    assert metrics[0]["loss"] == pytest.approx(first_loss, rel=1e-3)
    assert math.isfinite(events[-2]["validation_loss"])


def train_sft_adapter(folder: Path, model: Path, *, algorithm: dict, steps: int) -> Path:
    """Run a real one-epoch SFT LoRA job (fp32) on the colour rows in ``folder``; its checkpoint."""
    (folder / "train.jsonl").write_text("\n".join(
        json.dumps({"question": f"What is the colour of the {t}?", "answer": f"It is {COLOURS[i % 8]}."})
        for i, t in enumerate(THINGS)) + "\n")
    sft_spec = {
        "job_uuid": "sft-1", "method": "sft", "model": str(model), "output_dir": str(folder / "out"),
        "train_rows_path": str(folder / "train.jsonl"), "validation_rows_path": None,
        "training_config": {"n_epochs": 1, "max_steps_per_epoch": steps, "gradient_accumulation_steps": 1,
                            "max_validation_steps": 1, "dtype": "fp32",
                            "data_config": {"dataset_id": "toy", "batch_size": 4, "shuffle": True,
                                            "data_format": "instruct"},
                            "optimizer_config": {"optimizer_type": "adamw", "lr": 2e-2, "weight_decay": 0.0,
                                                 "num_warmup_steps": 0}},
        "algorithm_config": algorithm,
        "device": "cpu", "threads": 1, "seed": 0, "trust_remote_code": False,
    }
    (folder / "spec.json").write_text(json.dumps(sft_spec))
    events, code = run(folder / "spec.json", folder)
    assert code == 0 and events[-1]["event"] == "completed", stderr_tail(folder)
    return folder / "out" / "epoch_1"


@pytest.mark.slow
def test_dpo_from_an_sft_adapter_and_resume(tiny_model_path, tmp_path):
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    adapter = train_sft_adapter(sft_dir, tiny_model_path, algorithm={**LORA, "apply_lora_to_mlp": True}, steps=2)

    spec = make_spec(tmp_path, tiny_model_path, adapter=adapter, n_epochs=1, max_steps_per_epoch=2,
                     max_validation_steps=1)
    events, code = run(spec, tmp_path)
    assert code == 0, stderr_tail(tmp_path)
    assert kinds(events) == ["started", "metric", "metric", "checkpoint", "completed"]
    assert events[0]["resources"]["merged_adapter"] == str(adapter)
    assert any(e["event"] == "log" and "merged the adapter" in e["message"] for e in events)
    # The merged model is the reference too, so the first step still starts from logits 0.
    assert metrics_of(events)[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert (Path(events[-2]["path"]) / "adapter_config.json").is_file()

    # Resume on the merged model: a longer plan continues from epoch_1 and re-sends its checkpoint.
    spec = make_spec(tmp_path, tiny_model_path, adapter=adapter, n_epochs=2, max_steps_per_epoch=2,
                     max_validation_steps=1)
    resumed, code = run(spec, tmp_path)
    assert code == 0, stderr_tail(tmp_path)
    assert kinds(resumed) == ["started", "checkpoint", "metric", "metric", "checkpoint", "completed"]
    assert resumed[0]["resumed_from"] == "dpo-1-epoch-1" and resumed[0]["total_steps"] == 4
    assert [(m["step"], m["epoch"]) for m in metrics_of(resumed)] == [(3, 2), (4, 2)]
    assert abs(metrics_of(resumed)[0]["reward_margin"]) > 1e-3  # the epoch-1 adapter came back, not a zero one
    resent = [e for e in resumed if e["event"] == "checkpoint"][0]
    assert resent == {k: v for k, v in events[-2].items() if k != "write_seconds"}  # no write on a re-send
    merged = Path(events[-2]["path"]) / "merged"
    assert (merged / "config.json").is_file(), "DPO from an SFT adapter always writes the merged model"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        ([json.dumps(r) for r in preference_rows()[:5]] + [json.dumps({"prompt": "x", "chosen": "y"})],
         "row 5: expected columns prompt+chosen+rejected"),
        ([json.dumps(r) for r in preference_rows()[:2]] + [json.dumps({"prompt": "x", "chosen": [{"text": "y"}],
                                                                       "rejected": "z"})],
         "row 2: column 'chosen' must hold messages with 'role' and 'content'"),
    ],
)
def test_bad_preference_row_fails_naming_the_row(tiny_model_path, tmp_path, lines, needle):
    events, code = run(make_spec(tmp_path, tiny_model_path, lines=lines), tmp_path)
    assert code == 1
    assert events[-1]["event"] == "failed" and events[-1]["code"] == "bad_row"
    assert needle in events[-1]["message"]


@pytest.mark.slow
def test_sigterm_cancels_dpo(tiny_model_path, tmp_path):
    spec = make_spec(tmp_path, tiny_model_path, n_epochs=100, max_steps_per_epoch=1000,
                     data_config={"dataset_id": "prefs", "batch_size": 1, "shuffle": False})
    proc = start(spec, tmp_path)
    for line in proc.stdout:  # wait until training is under way
        if json.loads(line)["event"] == "metric":
            break
    else:
        pytest.fail(f"no metric before exit: {stderr_tail(tmp_path)}")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    events, code = finish(proc, timeout=30)
    assert code == 0 and events[-1] == {"event": "cancelled"}
    assert time.monotonic() - sent < 5
    assert not (tmp_path / "out" / "epoch_1").exists()
