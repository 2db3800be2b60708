"""A full fine-tune on two processes (gloo, CPU) sharded with FSDP2, started as the worker starts it:
the same loss curve as one process with the same global batch, each epoch's checkpoint an ordinary
Hugging Face folder of the same shapes and names as the one-process job's (rank 0 writes the
gathered weights), and a job resumed from that checkpoint on two ranks continuing from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_distributed_training import finish, start
from tests.integration.test_trainer_process import make_spec


def full_tune(tmp_path: Path, model: Path, *, ranks: int, accumulate: int, name: str | None = None,
              **training) -> tuple[list[dict], Path]:
    folder = tmp_path / (name or f"ranks-{ranks}")
    folder.mkdir(exist_ok=True)
    spec = make_spec(folder, model, lora=False, gradient_accumulation_steps=accumulate, dtype="fp32", **training)
    events, code = finish(start(spec, folder, ranks=ranks))
    assert code == 0, (folder / "stderr.txt").read_text()[-3000:]
    return events, folder


def curve(events: list[dict]) -> list[tuple[int, float, int]]:
    return [(m["step"], m["loss"], m["tokens"]) for m in events if m["event"] == "metric"]


@pytest.mark.slow
def test_fsdp2_full_fine_tune_matches_one_process_and_saves_hf_folders(tiny_model_path, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    one, _ = full_tune(tmp_path, tiny_model_path, ranks=1, accumulate=2, n_epochs=1, max_steps_per_epoch=3)
    two, folder = full_tune(tmp_path, tiny_model_path, ranks=2, accumulate=1, n_epochs=1, max_steps_per_epoch=3)
    kinds = [e["event"] for e in two if e["event"] != "log"]
    assert kinds == ["started", *["metric"] * 3, "checkpoint", "completed"]
    resources = {e["event"]: e for e in two}["started"]["resources"]
    assert {key: resources[key] for key in ("world_size", "backend", "parallelism", "global_batch_size")} == {
        "world_size": 2, "backend": "gloo", "parallelism": "fsdp2", "global_batch_size": 8}
    assert {e["event"]: e for e in one}["started"]["resources"]["parallelism"] == "none"
    assert resources["parameters"] == {e["event"]: e for e in one}["started"]["resources"]["parameters"]

    assert [(s, t) for s, _, t in curve(two)] == [(s, t) for s, _, t in curve(one)]
    assert [loss for _, loss, _ in curve(two)] == pytest.approx([loss for _, loss, _ in curve(one)], rel=1e-4)
    assert curve(two)[-1][1] < curve(two)[0][1]

    path_one, path_two = (Path(next(e["path"] for e in run if e["event"] == "checkpoint")) for run in (one, two))
    assert sorted(p.name for p in path_one.iterdir()) == sorted(p.name for p in path_two.iterdir())
    weights_one, weights_two = (load_file(p / "model.safetensors") for p in (path_one, path_two))
    assert {k: v.shape for k, v in weights_one.items()} == {k: v.shape for k, v in weights_two.items()}
    assert all((weights_one[k] - weights_two[k]).abs().max() < 1e-3 for k in weights_one)
    model = AutoModelForCausalLM.from_pretrained(path_two)  # an ordinary HF folder: no DTensor, no peft
    assert model.generate(input_ids=torch.tensor([[1, 20, 30]]), max_new_tokens=3).shape[1] > 3
    assert sorted(p.name for p in (folder / "out").iterdir()) == ["epoch_1"]  # only rank 0 wrote

    # Resumed on two ranks from that checkpoint (the same output folder, one more epoch): the
    # weights load from the HF folder, the optimizer state from its gathered full state.
    resumed, _ = full_tune(tmp_path, tiny_model_path, ranks=2, accumulate=1, name="ranks-2", n_epochs=2,
                           max_steps_per_epoch=3)
    started = {e["event"]: e for e in resumed}["started"]
    assert started["resumed_from"] == "job-1-epoch-1"
    assert [m["step"] for m in resumed if m["event"] == "metric"] == [4, 5, 6]
    assert not [e for e in resumed if e["event"] == "log" and "start afresh" in json.dumps(e)]
    assert curve(resumed)[0][1] < curve(two)[0][1]
    assert sorted(p.name for p in (folder / "out").iterdir()) == ["epoch_1", "epoch_2"]
