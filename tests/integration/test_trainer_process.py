"""The trainer as a real subprocess on a tiny model: events, checkpoints, stop, resume, bad rows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import cpu_dtype_for_bf16
from tests.fixtures_tiny import build_tiny_model
from tests.trainer_specs import finish, typed_spec_file

pytestmark = [
    pytest.mark.slow,
    # peft 0.21 still reads transformers' deprecated alias when generating from a PeftModel.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

REPO = Path(__file__).resolve().parents[2]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
THINGS = ["apple", "sea", "leaf", "sun", "snow", "coffee", "box", "stone",
          "shoe", "sky", "grass", "flower", "cat", "dog", "bird", "tree"]


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory)


def colour_rows() -> list[dict]:
    """32 rows of a learnable toy task: each thing has one fixed colour."""
    return [{"question": f"What is the colour of the {thing}?", "answer": f"It is {COLOURS[i % 8]}."}
            for _ in range(2) for i, thing in enumerate(THINGS)]


def make_spec(tmp_path: Path, model: Path, *, rows: list | None = None, lines: list[str] | None = None,
              lora: bool = True, **training) -> Path:
    rows_path = tmp_path / "train.jsonl"
    lines = lines if lines is not None else [json.dumps(row) for row in (rows or colour_rows())]
    rows_path.write_text("\n".join(lines) + "\n")
    config = {
        "n_epochs": 2, "max_steps_per_epoch": 8, "gradient_accumulation_steps": 1, "max_validation_steps": 2,
        "data_config": {"dataset_id": "toy", "batch_size": 4, "shuffle": True, "data_format": "instruct"},
        "optimizer_config": {"optimizer_type": "adamw", "lr": 2e-2 if lora else 3e-3, "weight_decay": 0.0,
                             "num_warmup_steps": 0},
        "dtype": "bf16",
    }
    config.update(training)
    spec = {
        "job_uuid": "job-1", "method": "sft", "model": str(model), "output_dir": str(tmp_path / "out"),
        "train_rows_path": str(rows_path), "validation_rows_path": None, "training_config": config,
        "algorithm_config": {"type": "LoRA", "lora_attn_modules": ["q_proj", "v_proj", "output_proj"],
                             "apply_lora_to_mlp": True, "apply_lora_to_output": True, "rank": 16, "alpha": 32}
        if lora else None,
        "device": "cpu", "threads": 1, "seed": 0, "trust_remote_code": False,
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def with_spec_keys(spec: Path, **keys) -> Path:
    """The spec file at ``spec`` with these top-level keys set (what the launcher adds: output_dir,
    save_merged, compile, resume_dir, ...); returns the same path."""
    data = json.loads(spec.read_text())
    data.update(keys)
    spec.write_text(json.dumps(data))
    return spec


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


def test_lora_sft_learns_and_checkpoints_load(tiny_model_path, tmp_path):
    events, code = run(make_spec(tmp_path, tiny_model_path), tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert kinds(events) == ["started", *["metric"] * 8, "checkpoint", *["metric"] * 8, "checkpoint", "completed"]
    started = events[0]
    assert started["total_steps"] == 16 and started["resumed_from"] is None
    resources = started["resources"]
    computed = cpu_dtype_for_bf16()
    assert resources["device"] == "cpu" and resources["dtype"] == computed and resources["requested_dtype"] == "bf16"
    assert 0 < resources["trainable_parameters"] < resources["parameters"] and resources["threads"] == 1
    # A CPU without native bf16 computes in fp32 and says so in the job's log.
    assert any(e["event"] == "log" and "bf16" in e["message"] for e in events) == (computed == "fp32")

    metrics = [e for e in events if e["event"] == "metric"]
    assert [m["step"] for m in metrics] == list(range(1, 17))
    assert [m["epoch"] for m in metrics] == [1] * 8 + [2] * 8
    assert all(m["tokens_per_s"] > 0 and m["total_steps"] == 16 and m["lr"] > 0 for m in metrics)
    first, last = [m["loss"] for m in metrics[:3]], [m["loss"] for m in metrics[-3:]]
    assert sum(last) / 3 < sum(first) / 3 - 1.0

    checkpoints = [e for e in events if e["event"] == "checkpoint"]
    for epoch, event in enumerate(checkpoints, start=1):
        assert event["identifier"] == f"job-1-epoch-{epoch}" and event["epoch"] == epoch and event["step"] == 8 * epoch
        assert event["path"] == str(tmp_path / "out" / f"epoch_{epoch}")
        assert event["perplexity"] == pytest.approx(2.718281828 ** event["validation_loss"], rel=1e-6)
        assert event["train_loss"] > 0
    assert checkpoints[1]["validation_loss"] < checkpoints[0]["validation_loss"]
    assert not list((tmp_path / "out").glob("*.tmp"))

    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoints[1]["path"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the colour of the sky?"}],
                                           tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    for model in (PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), path),
                  AutoPeftModelForCausalLM.from_pretrained(path)):
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert out.shape[1] > inputs["input_ids"].shape[1]


def test_full_finetune_checkpoint_loads_as_a_model(tiny_model_path, tmp_path):
    spec = make_spec(tmp_path, tiny_model_path, lora=False, n_epochs=1, max_steps_per_epoch=3,
                     gradient_accumulation_steps=2, optimizer_config={"optimizer_type": "sgd", "lr": 0.1,
                                                                      "weight_decay": 0.0, "num_warmup_steps": 1})
    events, code = run(spec, tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert kinds(events) == ["started", "metric", "metric", "metric", "checkpoint", "completed"]
    assert events[0]["resources"]["trainable_parameters"] == events[0]["resources"]["parameters"]

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = Path(events[-2]["path"])
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.generate(max_new_tokens=3, input_ids=__import__("torch").tensor([[1, 20, 30]])).shape[1] > 3
    before, after = load_file(tiny_model_path / "model.safetensors"), load_file(folder / "model.safetensors")
    assert any(not (before[k] == after[k]).all() for k in before)
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == 3


def _long_run(tmp_path: Path, model: Path) -> subprocess.Popen:
    spec = make_spec(tmp_path, model, n_epochs=100, max_steps_per_epoch=1000,
                     data_config={"dataset_id": "toy", "batch_size": 1, "shuffle": False, "data_format": "dialog"})
    proc = start(spec, tmp_path)
    for line in proc.stdout:  # wait until training is under way
        if json.loads(line)["event"] == "metric":
            return proc
    pytest.fail(f"no metric before exit: {(tmp_path / 'stderr.txt').read_text()[-3000:]}")


def test_sigterm_cancels_promptly(tiny_model_path, tmp_path):
    proc = _long_run(tmp_path, tiny_model_path)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    events, code = finish(proc, timeout=30)
    assert code == 0 and events[-1] == {"event": "cancelled"}
    assert time.monotonic() - sent < 5


def test_stdin_closing_stops_the_trainer(tiny_model_path, tmp_path):
    proc = _long_run(tmp_path, tiny_model_path)
    proc.stdin.close()
    out = proc.stdout.read()
    proc.stdout.close()
    assert proc.wait(timeout=30) == 0
    assert json.loads(out.splitlines()[-1]) == {"event": "cancelled"}


def test_resume_continues_from_the_newest_checkpoint(tiny_model_path, tmp_path):
    first, code = run(make_spec(tmp_path, tiny_model_path, n_epochs=1, max_steps_per_epoch=3), tmp_path)
    assert code == 0 and kinds(first)[-2:] == ["checkpoint", "completed"]
    epoch_1 = tmp_path / "out" / "epoch_1"
    stamp = (epoch_1 / "trainer_state.json").stat().st_mtime_ns

    events, code = run(make_spec(tmp_path, tiny_model_path, n_epochs=2, max_steps_per_epoch=3), tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert kinds(events) == ["started", "checkpoint", "metric", "metric", "metric", "checkpoint", "completed"]
    assert events[0]["resumed_from"] == "job-1-epoch-1" and events[0]["total_steps"] == 6
    resent = [e for e in events if e["event"] == "checkpoint"][0]
    original = [e for e in first if e["event"] == "checkpoint"][0]
    # The re-sent event is the original, less the write time (there was no write this time).
    assert resent == {k: v for k, v in original.items() if k != "write_seconds"} and original["write_seconds"] > 0
    metrics = [e for e in events if e["event"] == "metric"]
    assert [(m["step"], m["epoch"]) for m in metrics] == [(4, 2), (5, 2), (6, 2)]
    lr = 2e-2
    assert [m["lr"] for m in metrics] == pytest.approx([lr * 3 / 6, lr * 2 / 6, lr * 1 / 6])  # the new plan's decay
    assert events[-2]["identifier"] == "job-1-epoch-2" and events[-2]["step"] == 6
    assert (epoch_1 / "trainer_state.json").stat().st_mtime_ns == stamp

    again, code = run(make_spec(tmp_path, tiny_model_path, n_epochs=2, max_steps_per_epoch=3), tmp_path)
    assert code == 0 and kinds(again) == ["started", "checkpoint", "checkpoint", "completed"]


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        ([json.dumps(r) for r in colour_rows()[:5]] + [json.dumps({"text": "x"})], "row 5: no known layout fits"),
        ([json.dumps(r) for r in colour_rows()[:3]] + ["{broken"], "row 3: not a valid JSON line"),
    ],
)
def test_bad_row_fails_naming_the_row(tiny_model_path, tmp_path, lines, needle):
    events, code = run(make_spec(tmp_path, tiny_model_path, lines=lines), tmp_path)
    assert code == 1
    assert events[-1]["event"] == "failed" and events[-1]["code"] == "bad_row"
    assert needle in events[-1]["message"]
    if "layout" in needle:
        assert "question+answer" in events[-1]["message"]


def test_a_checkpoint_cut_off_mid_write_is_never_reported_and_is_replaced(tiny_model_path, tmp_path):
    """What a kill during a checkpoint write leaves (a ``.tmp`` folder, half written) is ignored:
    the resumed run starts from the last complete checkpoint and writes that epoch anew."""
    events, code = run(make_spec(tmp_path, tiny_model_path, lora=False, n_epochs=1, max_steps_per_epoch=2), tmp_path)
    assert code == 0
    out = tmp_path / "out"
    half = out / "epoch_2.tmp"
    shutil.copytree(out / "epoch_1", half)
    (half / "trainer_state.json").unlink()  # written last: a cut-off write never has it
    weights = half / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])

    events, code = run(make_spec(tmp_path, tiny_model_path, lora=False, n_epochs=2, max_steps_per_epoch=2), tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert events[0]["resumed_from"] == "job-1-epoch-1"
    assert [e["epoch"] for e in events if e["event"] == "checkpoint"] == [1, 2]
    assert sorted(p.name for p in out.iterdir()) == ["epoch_1", "epoch_2"]

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "epoch_2")
