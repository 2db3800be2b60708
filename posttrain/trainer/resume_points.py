"""Resume points: mid-epoch saves that let a job lost in the middle of a long epoch continue from
where it was, not from the start of the epoch.

Epoch checkpoints are the user's artifacts (the API lists them); resume points are the service's
own: written every ``every_seconds`` of training into the job's work folder (``spec["resume_dir"]``,
never the user's checkpoint folder), each one a checkpoint-shaped folder (model or adapter,
optimizer, scheduler, RNG state) plus the position in the data, i.e. how many optimizer steps of the
epoch are done (the epoch's batch order is a function of the seed and the epoch, so the run skips
exactly those batches), and those steps' losses. Only the newest is kept, and all are removed once
an epoch checkpoint supersedes them. Writing one is best effort: a failure is logged and training
goes on, since the epoch checkpoints still protect the job.

A pause (``EpochLoop`` on SIGUSR1) writes one at once, whenever the last was written, so the job
continues from exactly the step where it stopped.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from posttrain.trainer import checkpoints

_FOLDER = re.compile(r"^step_(\d+)$")


class ResumePoints:
    """Where a job's resume points live and when the next one is due."""

    def __init__(self, folder: str | Path | None, *, every_seconds: float | None) -> None:
        self.folder = Path(folder) if folder else None
        self.every_seconds = every_seconds if self.folder is not None else None
        self._last = time.monotonic()

    def newest(self) -> tuple[int, Path] | None:
        """The newest complete resume point as (global step, folder)."""
        if self.folder is None or not self.folder.is_dir():
            return None
        found = [(int(m.group(1)), child) for child in self.folder.iterdir()
                 if (m := _FOLDER.match(child.name)) and (child / checkpoints.TRAINER_STATE).is_file()]
        return max(found) if found else None

    def due(self) -> bool:
        return self.every_seconds is not None and time.monotonic() - self._last >= self.every_seconds

    def save(self, *, model, optimizer, scheduler, epoch: int, steps_done_in_epoch: int, global_step: int,
             losses: list[float], reporter) -> Path | None:  # reporter: reporting.Reporter
        """Write a resume point after ``global_step``, then drop the older ones; its folder, or
        None when none could be written."""
        if self.folder is None:
            return None  # never due: the job has no resume folder
        self._last = time.monotonic()
        training_state = checkpoints.training_state(optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                                                    global_step=global_step, steps_done_in_epoch=steps_done_in_epoch,
                                                    losses=list(losses))
        trainer_state = {"epoch": epoch, "global_step": global_step, "steps_done_in_epoch": steps_done_in_epoch}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            written = checkpoints.write_folder(self.folder / f"step_{global_step}", model=model, tokenizer=None,
                                               training_state=training_state, trainer_state=trainer_state)
        except OSError as exc:
            reporter.log(f"could not write a resume point at step {global_step}: {exc}", level="warning")
            return None
        self._remove(keep=written)
        return written

    def clear(self) -> None:
        """Drop every resume point: an epoch checkpoint now holds everything they held."""
        self._last = time.monotonic()
        self._remove(keep=None)

    def _remove(self, *, keep: Path | None) -> None:
        if self.folder is None or not self.folder.is_dir():
            return
        for child in self.folder.iterdir():
            if child != keep:
                shutil.rmtree(child, ignore_errors=True)


def resume_source(*, found: list[tuple[int, Path]], points: ResumePoints) -> tuple[str, Path] | None:
    """What a run resumes from: the newest epoch checkpoint, or a resume point written after it.
    Returns (label for ``resumed_from``, folder), or None for a fresh start."""
    best, best_step = None, 0
    if found:
        epoch, folder = found[-1]
        best = (f"epoch-{epoch}", folder)
        best_step = int(checkpoints.read_trainer_state(folder=folder).get("global_step", 0))
    point = points.newest()
    if point is not None and (best is None or point[0] > best_step):
        step, folder = point
        best = (f"epoch-{checkpoints.read_trainer_state(folder=folder)['epoch']}-step-{step}", folder)
    return best
