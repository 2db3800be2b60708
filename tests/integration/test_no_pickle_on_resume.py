"""A resume reads ``training_state.pt`` with ``torch.load(weights_only=True)``: the checkpoint folder
may lie in a tenant's own file area, so a planted pickle must never run code as the server's user.

The trainer's own state (optimizer, scheduler, RNG states, position) is plain data and loads that
way; a file holding anything else (a crafted pickle, or a checkpoint from before the RNG states
were plain data) fails the job with ``checkpoint_refused`` and runs nothing."""

from __future__ import annotations

import builtins
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from posttrain.trainer import checkpoints
from posttrain.trainer.errors import CheckpointRefusedError
from tests.integration import test_trainer_process as sft_process

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


class _WritesAMarker:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_the_training_state_round_trips_under_weights_only_and_restores_every_rng(tmp_path):
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = checkpoints.training_state(optimizer=optimizer, scheduler=scheduler, epoch=1, global_step=1,
                                       steps_done_in_epoch=1, losses=[0.5])
    torch.save(state, tmp_path / checkpoints.TRAINING_STATE)
    torch.load(tmp_path / checkpoints.TRAINING_STATE, weights_only=True)  # plain data only (the old numpy state was not)
    loaded = checkpoints.load_training_state(folder=tmp_path)

    expected = (random.random(), np.random.random(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    checkpoints.restore_rng_state(loaded["rng"])
    assert (random.random(), np.random.random(3).tolist(), np.random.randn(), torch.rand(3).tolist()) == expected
    assert loaded["losses"] == [0.5] and loaded["steps_done_in_epoch"] == 1


def test_a_planted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"optimizer": _WritesAMarker(marker)}, tmp_path / checkpoints.TRAINING_STATE)
    with pytest.raises(CheckpointRefusedError, match="nothing in it ran"):
        checkpoints.load_training_state(folder=tmp_path)
    assert not marker.exists()


def _first_epoch(tmp_path: Path, model: Path) -> Path:
    _events, code = sft_process.run(sft_process.make_spec(tmp_path, model, n_epochs=1, max_steps_per_epoch=2), tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    return tmp_path / "out" / "epoch_1"


def _resume(tmp_path: Path, model: Path) -> dict:
    events, code = sft_process.run(sft_process.make_spec(tmp_path, model, n_epochs=2, max_steps_per_epoch=2), tmp_path)
    assert code == 1, sft_process.kinds(events)
    assert "metric" not in sft_process.kinds(events), "nothing trains on a refused checkpoint"
    assert not (tmp_path / "out" / "epoch_2").exists()
    return events[-1]


@pytest.mark.slow
def test_a_resume_from_a_checkpoint_holding_a_planted_pickle_fails_and_runs_nothing(tiny_model_path, tmp_path):
    epoch_1 = _first_epoch(tmp_path, tiny_model_path)
    marker = tmp_path / "marker"
    state = torch.load(epoch_1 / checkpoints.TRAINING_STATE, weights_only=True)
    state["optimizer"]["param_groups"][0]["payload"] = _WritesAMarker(marker)
    torch.save(state, epoch_1 / checkpoints.TRAINING_STATE)

    failed = _resume(tmp_path, tiny_model_path)
    assert failed["event"] == "failed" and failed["code"] == "checkpoint_refused", failed
    assert "training_state.pt" in failed["message"] and "nothing in it ran" in failed["message"]
    assert not marker.exists(), "the planted pickle ran"


@pytest.mark.slow
def test_a_checkpoint_from_before_plain_rng_states_still_resumes(tiny_model_path, tmp_path):
    """The old format kept numpy's RNG state as a numpy array: the numpy globals that rebuild an
    array are allowed under weights_only, so a job paused or interrupted before the upgrade resumes."""
    epoch_1 = _first_epoch(tmp_path, tiny_model_path)
    state = torch.load(epoch_1 / checkpoints.TRAINING_STATE, weights_only=True)
    state["rng"]["numpy"] = np.random.get_state()
    torch.save(state, epoch_1 / checkpoints.TRAINING_STATE)

    events, code = sft_process.run(sft_process.make_spec(tmp_path, tiny_model_path, n_epochs=2, max_steps_per_epoch=2),
                                   tmp_path)
    assert code == 0, sft_process.kinds(events)
    assert (tmp_path / "out" / "epoch_2").is_dir()
