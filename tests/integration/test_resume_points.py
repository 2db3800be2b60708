"""A trainer killed in the middle of an epoch resumes from its newest resume point: the same
position in the data, optimizer and schedule, so its loss curve is the uninterrupted run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration import test_dpo_trainer as dpo_process
from tests.integration import test_trainer_process as sft_process
from tests.integration.test_trainer_process import with_spec_keys

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

#: Both methods: 2 epochs of 4 optimizer steps (SFT: 32 rows, DPO: 16 pairs, batch 4).
PROCESSES = {"sft": sft_process, "dpo": dpo_process}
KILL_AFTER_STEP = 6  # the second step of epoch 2


def _spec(process, folder: Path, model: Path, *, resume_points: bool) -> Path:
    folder.mkdir()
    path = process.make_spec(folder, model, n_epochs=2, max_steps_per_epoch=4)
    if resume_points:
        with_spec_keys(path, resume_dir=str(folder / "resume"), resume_every_seconds=1e-9)  # after every step
    return path


def _kill_after_step(process, spec: Path, folder: Path, step: int) -> None:
    proc = process.start(spec, folder)
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "metric" and event["step"] == step:
            proc.kill()
            break
    proc.wait(timeout=30)
    proc.stdin.close()
    proc.stdout.close()
    assert proc.returncode == -9, "the trainer ended before it could be killed mid-epoch"


def _of(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["event"] == kind]


@pytest.mark.parametrize("method", sorted(PROCESSES))
def test_killed_mid_epoch_resumes_at_its_position_in_the_data(method, tiny_model_path, tmp_path):
    process = PROCESSES[method]
    reference, code = process.run(_spec(process, tmp_path / "reference", tiny_model_path, resume_points=False),
                                  tmp_path / "reference")
    assert code == 0
    reference_loss = {m["step"]: m["loss"] for m in _of(reference, "metric")}
    assert sorted(reference_loss) == list(range(1, 9))

    folder = tmp_path / "job"
    spec = _spec(process, folder, tiny_model_path, resume_points=True)
    _kill_after_step(process, spec, folder, KILL_AFTER_STEP)
    events, code = process.run(spec, folder)
    assert code == 0, (folder / "stderr.txt").read_text()[-3000:]

    # The point after step 6 may have been cut off by the kill; the one after step 5 is complete.
    resumed_from = _of(events, "started")[0]["resumed_from"]
    epoch, step = resumed_from.split("-epoch-")[1].split("-step-")
    assert int(epoch) == 2 and int(step) in (KILL_AFTER_STEP - 1, KILL_AFTER_STEP)
    metrics = _of(events, "metric")
    assert [(m["step"], m["epoch"]) for m in metrics] == [(s, 2) for s in range(int(step) + 1, 9)]
    for m in metrics:
        assert m["loss"] == pytest.approx(reference_loss[m["step"]], rel=1e-4), m["step"]

    # Epoch 1's checkpoint is re-sent as it was; epoch 2's train loss covers the steps before the kill too.
    checkpoints = _of(events, "checkpoint")
    assert [c["epoch"] for c in checkpoints] == [1, 2] and "write_seconds" not in checkpoints[0]
    expected = _of(reference, "checkpoint")[1]
    assert checkpoints[1]["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-4)
    assert checkpoints[1]["validation_loss"] == pytest.approx(expected["validation_loss"], rel=1e-4)
    assert list((folder / "resume").iterdir()) == [], "an epoch checkpoint supersedes the resume points"
    assert sorted(p.name for p in (folder / "out").iterdir()) == ["epoch_1", "epoch_2"]


def test_resume_points_are_off_without_a_folder(tiny_model_path, tmp_path):
    """The trainer writes none unless the worker gives it a folder (and never into the output folder)."""
    spec = sft_process.make_spec(tmp_path, tiny_model_path, n_epochs=1, max_steps_per_epoch=3)
    events, code = sft_process.run(spec, tmp_path)
    assert code == 0 and _of(events, "started")[0]["resumed_from"] is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["epoch_1"]
