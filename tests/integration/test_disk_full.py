"""A full disk while a checkpoint is written fails the job with a clear reason and keeps the
earlier checkpoints whole. The disk is a real, tiny tmpfs (so this test needs root)."""

from __future__ import annotations

import errno
import subprocess
import uuid
from pathlib import Path

import pytest

from posttrain.trainer.checkpoints import write_folder
from posttrain.trainer.errors import CheckpointWriteError
from tests.integration.test_trainer_process import make_spec, run, with_spec_keys

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_disk(tmp_path):
    mounts: list[Path] = []

    def mount(size_bytes: int) -> Path:
        target = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        target.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(target)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounts.append(target)
        return target

    yield mount
    for target in mounts:
        subprocess.run(["umount", str(target)], check=False)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_full_disk_fails_the_job_and_keeps_earlier_checkpoints(tiny_model_path, tmp_path, tiny_disk):
    # How big is one checkpoint of this job? Measure it on the ordinary disk.
    probe = tmp_path / "probe"
    probe.mkdir()
    events, code = run(make_spec(probe, tiny_model_path, lora=False, n_epochs=1, max_steps_per_epoch=1), probe)
    assert code == 0
    one = _size(probe / "out" / "epoch_1")

    # A disk with room for one checkpoint and a half: the second cannot be written.
    disk = tiny_disk(int(one * 1.5) + 64 * 1024)
    spec_path = with_spec_keys(make_spec(tmp_path, tiny_model_path, lora=False, n_epochs=2, max_steps_per_epoch=1),
                               output_dir=str(disk))
    events, code = run(spec_path, tmp_path)

    assert code == 1
    failure = events[-1]
    assert failure["event"] == "failed" and failure["code"] == "disk_full", failure
    assert "no space left" in failure["message"] and "epoch_2" in failure["message"]
    assert [e["epoch"] for e in events if e["event"] == "checkpoint"] == [1]
    assert sorted(p.name for p in disk.iterdir()) == ["epoch_1"], "no partial checkpoint is left behind"

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(disk / "epoch_1")  # the earlier checkpoint still loads


def test_a_write_error_without_an_errno_on_a_full_disk_is_a_disk_full_error(tmp_path, tiny_disk):
    # safetensors reports a failed write as its own error, not an OSError: on a disk with next to
    # nothing left it still means the disk is full.
    disk = tiny_disk(64 * 1024)

    def save_model(staging: Path, final: Path) -> None:
        raise RuntimeError("Error while serializing: I/O error")

    with pytest.raises(CheckpointWriteError, match="no space left") as raised:
        write_folder(disk / "epoch_1", model=None, tokenizer=None, training_state={}, trainer_state={},
                     save_model=save_model)
    assert raised.value.errno == errno.ENOSPC
    assert list(disk.iterdir()) == [], "the staging folder is removed"
