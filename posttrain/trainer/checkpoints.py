"""Per-epoch checkpoint folders: written atomically, found and read back on resume.

A checkpoint is built in ``epoch_<E>.tmp`` and renamed to ``epoch_<E>`` only when complete, with
``trainer_state.json`` written last, so any ``epoch_<E>`` folder holding that file always loads: a
crash or kill mid-write leaves only a ``.tmp`` folder, which is ignored and later replaced.
"""

from __future__ import annotations

import errno
import importlib
import io
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.trainer.errors import CheckpointRefusedError, CheckpointWriteError
from posttrain.trainer.loading import check_pinned, check_pinned_descriptor

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


def prune_checkpoints(*, output_dir: Path, keep: int) -> list[Path]:
    """Delete the complete checkpoints older than the newest ``keep`` (``keep`` >= 1); the folders
    deleted, oldest first. The newest is always kept, and it is the one a resume starts from (a
    mid-epoch resume point lives in the job's own folder and holds its own weights)."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    older = [folder for _epoch, folder in find_checkpoints(output_dir=output_dir)][:-keep]
    for folder in older:
        # Renamed out of the epoch_<N> pattern first: a kill mid-delete leaves no half folder that
        # looks complete. The .tmp name is one write_folder already ignores and replaces.
        doomed = folder.with_name(folder.name + ".tmp")
        if doomed.exists():
            shutil.rmtree(doomed, ignore_errors=True)
        os.rename(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    if older:
        _fsync_dir(output_dir)
    return older


def read_trainer_state(*, folder: Path) -> dict[str, Any]:
    return json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))


def rng_state() -> dict[str, Any]:
    """The RNG states as plain data (tensors, ints, floats, strings, tuples), so the file loads
    under ``torch.load(weights_only=True)``: numpy's state (a ``(str, uint32 array, int, int,
    float)`` tuple) is kept as a dict with its keys in an int64 tensor."""
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                   "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    saved = state["numpy"]
    if isinstance(saved, tuple):  # written before the states were plain data: numpy's own tuple
        np.random.set_state(saved)
    else:
        np.random.set_state((saved["bit_generator"], np.asarray(saved["keys"].numpy(), dtype=np.uint32),
                             saved["pos"], saved["has_gauss"], saved["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


MERGED = "merged"


def write_checkpoint(
    *,
    output_dir: Path,
    epoch: int,
    model,
    tokenizer,
    training_state: dict[str, Any],
    trainer_state: dict[str, Any],
    merge_base: Callable[[], Any] | None = None,
    save_model: Callable[[Path, Path], None] | None = None,
) -> Path:
    """Save model (or peft adapter) + tokenizer + training state, then rename into place.

    With ``merge_base`` (a LoRA model), ``merged/`` also holds the adapter just saved merged into
    the model that ``merge_base()`` loads: a plain Hugging Face model folder that loads without
    peft. That base is loaded afresh as stored (not the training copy, which may be rounded to
    bf16), so the merged model gives the logits of base + adapter. It costs one more model in
    memory while it is written.

    ``save_model(staging, final)``, when given, writes the model (or adapter) files into the
    staging folder instead of ``model.save_pretrained``; ``final`` is where they will end up.

    Every file is fsynced before the rename and the folder after it, so a checkpoint that exists
    under its final name is complete on disk even after a power loss.
    """
    final = checkpoint_dir(output_dir=output_dir, epoch=epoch)
    return write_folder(final, model=model, tokenizer=tokenizer, training_state=training_state,
                        trainer_state=trainer_state, merge_base=merge_base, save_model=save_model)


def write_folder(final: Path, *, model, tokenizer, training_state: dict[str, Any], trainer_state: dict[str, Any],
                 merge_base: Callable[[], Any] | None = None,
                 save_model: Callable[[Path, Path], None] | None = None) -> Path:
    """Write a checkpoint-shaped folder atomically at ``final`` (see ``write_checkpoint``);
    without a tokenizer when ``tokenizer`` is None (a resume point's model comes with its job)."""
    import torch

    output_dir = final.parent
    check_pinned(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)  # a resume point's folder; an output folder exists
    # Every write below goes through a descriptor of the folder just checked: swapping the folder
    # (or a folder above it) for a link afterwards cannot send a checkpoint anywhere else.
    anchor_fd = os.open(output_dir, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        check_pinned_descriptor(output_dir, anchor_fd)
        anchor = Path(f"/proc/self/fd/{anchor_fd}") if os.path.isdir("/proc/self/fd") else output_dir
        _write_staged(anchor / (final.name + ".tmp"), anchor / final.name, final, model=model, tokenizer=tokenizer,
                      training_state=training_state, trainer_state=trainer_state, merge_base=merge_base,
                      save_model=save_model, torch=torch)
    finally:
        os.close(anchor_fd)
    return final


def _write_staged(staging: Path, target: Path, final: Path, *, model, tokenizer, training_state: dict[str, Any],
                  trainer_state: dict[str, Any], merge_base: Callable[[], Any] | None,
                  save_model: Callable[[Path, Path], None] | None, torch: Any) -> None:
    """``write_folder``'s body: ``staging`` and ``target`` are reached through the output folder's
    descriptor, ``final`` is the checkpoint's real path (what callbacks and messages name)."""
    output_dir = final.parent
    try:
        if staging.is_symlink():
            staging.unlink()
        elif staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        if save_model is None:
            model.save_pretrained(staging)
        else:
            save_model(staging, final)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if merge_base is not None and hasattr(model, "merge_and_unload"):
            from peft import PeftModel

            merged = PeftModel.from_pretrained(merge_base(), staging).merge_and_unload()
            merged.save_pretrained(staging / MERGED)
            tokenizer.save_pretrained(staging / MERGED)
            del merged
        buffer = io.BytesIO()  # serialise first: a full disk then fails as an OSError, not inside torch
        torch.save(training_state, buffer)
        (staging / TRAINING_STATE).write_bytes(buffer.getvalue())
        (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
        _fsync_tree(staging)
        check_pinned(output_dir)  # once more before the checkpoint appears under its name
        if target.is_symlink():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
        _fsync_dir(target.parent)
    except Exception as exc:
        full = _out_of_space(exc, output_dir)
        shutil.rmtree(staging, ignore_errors=True)
        if full:
            code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.ENOSPC  # safetensors' errors have none
            raise CheckpointWriteError(
                code, f"no space left on the device while writing checkpoint {final.name} in {output_dir}; "
                "the earlier checkpoints are kept"
            ) from exc
        raise


def _out_of_space(exc: Exception, folder: Path) -> bool:
    """ENOSPC and friends; or any write error (safetensors and torch raise their own) on a disk
    with next to nothing left."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return True
    try:
        return shutil.disk_usage(folder).free < 1024 * 1024
    except OSError:
        return False


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def training_state(*, optimizer, scheduler, epoch: int, global_step: int, **position: Any) -> dict[str, Any]:
    """What ``optimization.resume_training`` restores: optimizer, scheduler and RNG state, where the count stands,
    and for a resume point its position in the epoch (``steps_done_in_epoch``, ``losses``)."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
            "epoch": epoch, "global_step": global_step, **position}


def load_training_state(*, folder: Path) -> dict[str, Any]:
    """The training state saved in ``folder``, read with ``weights_only=True``: tensors and plain
    data only, never an arbitrary pickle. The folder may lie in a tenant's own file area, so a
    planted ``training_state.pt`` must not run code as the server's user when the job resumes.
    Checkpoints written before the RNG states were plain data hold numpy's state as a numpy
    array: the few numpy globals that rebuild an array (and run nothing else) are allowed, so
    those resume too. A file that holds anything else (a crafted pickle) is refused with
    ``CheckpointRefusedError``."""
    import pickle

    import numpy as np
    import torch

    path = folder / TRAINING_STATE
    reconstruct = importlib.import_module("numpy._core.multiarray")._reconstruct
    array_globals = [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(array_globals):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f"it names {found.group(1)}" if found else f"{type(exc).__name__}: {str(exc)[:200]}"
        raise CheckpointRefusedError(
            f"{path} holds more than tensors and plain data, so it was not loaded and nothing in it ran ({what}); "
            "a checkpoint written by an older server version, or a file this server did not write"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointRefusedError(f"{path} is not a training state (a {type(state).__name__}, not a dict)")
    return state
