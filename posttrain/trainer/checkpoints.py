"""Per-epoch checkpoint folders: written atomically, found and read back on resume.

A checkpoint is built in ``epoch_<E>.tmp`` and renamed to ``epoch_<E>`` only when complete, with
``trainer_state.json`` written last, so any ``epoch_<E>`` folder holding that file always loads: a
crash or kill mid-write leaves only a ``.tmp`` folder, which is ignored and later replaced.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

TRAINER_STATE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
_FOLDER = re.compile(r"^epoch_(\d+)$")


def checkpoint_dir(*, output_dir: Path, epoch: int) -> Path:
    return output_dir / f"epoch_{epoch}"


def find_checkpoints(*, output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (epoch, folder), oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _FOLDER.match(child.name)
        if match and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def read_trainer_state(*, folder: Path) -> dict[str, Any]:
    return json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(
    *, output_dir: Path, epoch: int, model, tokenizer, training_state: dict[str, Any], trainer_state: dict[str, Any]
) -> Path:
    """Save model (or peft adapter) + tokenizer + training state, then rename into place."""
    import torch

    final = checkpoint_dir(output_dir=output_dir, epoch=epoch)
    staging = final.with_name(final.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    torch.save(training_state, staging / TRAINING_STATE)
    (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)
    return final


def load_training_state(*, folder: Path) -> dict[str, Any]:
    import torch

    # Our own file (optimizer, scheduler and RNG states hold numpy/python objects).
    return torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=False)
