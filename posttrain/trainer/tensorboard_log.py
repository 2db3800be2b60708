"""The job's TensorBoard log: the trainer's own metric and checkpoint events, as event files.

The recipe's ``tensorboard`` (a request's ``logger_config`` ``{"type": "tensorboard"}``) asks for it. Rather than thread a second
logger through the SFT and DPO loops, it wraps the Reporter: every protocol event is forwarded
unchanged, and the ones that carry numbers (``metric`` per optimizer step, ``checkpoint`` per
epoch) are also written as TensorBoard scalars, so the log and the job's events never disagree.
The files go into ``<output_dir>/tensorboard``, next to the checkpoints, where
``tensorboard --logdir`` finds them; a resumed run appends its own event file to the same folder.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from posttrain.domain.protocol import CheckpointWritten, LogLine, Started, StepMetric, TrainerEvent
from posttrain.domain.recipes import TrainerSpec

FOLDER = "tensorboard"

#: Metric fields that are not measurements: the x axis, and the run's plan.
_NOT_SCALARS = {"step", "total_steps"}

#: Checkpoint fields under the names TensorBoard users look for; other ``validation_*`` fields
#: (DPO's reward margin and accuracy) become ``validation/<rest>``.
_CHECKPOINT_TAGS = {"validation_loss": "validation/loss", "perplexity": "validation/perplexity",
                    "train_loss": "train/epoch_loss"}


def _number(value: Any) -> float | None:
    """A value TensorBoard can plot: a real int or float (bools and None are not measurements)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


#: Metric fields measured on the validation rows, not the step's batch: a GRPO job's mean reward
#: on the validation prompts every ``eval_interval`` steps, beside the checkpoints' validation loss.
_VALIDATION_METRICS = {"valid_reward_mean": "validation/reward_mean"}


def metric_scalars(fields: dict[str, Any]) -> dict[str, float]:
    """Every numeric field of a ``metric`` event, as ``train/<name>`` (a GRPO step's
    ``reward_mean``, ``reward_std``, ``reward/<grader>``, ``kl``, ``entropy``, clip ratios and
    ``completion_length`` among them), but ``_VALIDATION_METRICS`` under ``validation/``."""
    scalars = {}
    for name, value in fields.items():
        number = _number(value)
        if name not in _NOT_SCALARS and number is not None:
            scalars[_VALIDATION_METRICS.get(name, f"train/{name}")] = number
    return scalars


def checkpoint_scalars(fields: dict[str, Any]) -> dict[str, float]:
    """The losses of a ``checkpoint`` event: validation loss and perplexity, the epoch's train loss."""
    scalars = {}
    for name, value in fields.items():
        number = _number(value)
        if number is None:
            continue
        if name in _CHECKPOINT_TAGS:
            scalars[_CHECKPOINT_TAGS[name]] = number
        elif name.startswith("validation_"):
            scalars[f"validation/{name[len('validation_'):]}"] = number
    return scalars


class TensorBoardReporter:
    """A Reporter (same ``emit``/``log``) that also writes the run's scalars to TensorBoard.

    The event file is opened at the first optimizer step, not before: a run stopped while loading
    leaves no empty file behind, and the run knows its first step then. It passes that step as
    tensorboardX's ``purge_step``, so TensorBoard hides whatever the folder already holds from that
    step on (an earlier attempt's steps past its last checkpoint, which this run trains again)
    instead of drawing two curves over the same steps.
    """

    def __init__(self, reporter: Any, *, logdir: Path, flush_secs: int = 10) -> None:
        self._reporter = reporter
        self.logdir = logdir
        self._flush_secs = flush_secs
        self._writer: Any = None
        self._broken = False

    # -- the Reporter interface ----------------------------------------------------------------

    def emit(self, event: TrainerEvent) -> None:
        if isinstance(event, Started):
            event = self._on_started(event)
        self._reporter.emit(event)
        if isinstance(event, StepMetric):
            self._write(metric_scalars(event.to_dict()), step=event.step)
        elif isinstance(event, CheckpointWritten) and event.write_seconds is not None:
            # Without write_seconds it is a checkpoint an earlier attempt wrote, re-sent on resume;
            # that attempt logged it already.
            self._write(checkpoint_scalars(event.to_dict()), step=event.step, flush=True)

    def log(self, message: str, *, level: str = "info") -> None:
        self.emit(LogLine(message=message, level=level))

    def close(self) -> None:
        """Flush and close the event file; called on every way out of the run (done, cancelled,
        failed), so what was logged before a failure is on disk to look at."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except OSError as exc:
                self._give_up(exc)

    # -- the log ---------------------------------------------------------------------------------

    def _on_started(self, event: Started) -> Started:
        """Name the folder in the job's resources, where users look for what the job holds."""
        try:
            self.logdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._give_up(exc)
        return dataclasses.replace(event, resources={**event.resources, "tensorboard_dir": str(self.logdir)})

    def _write(self, scalars: dict[str, float], *, step: Any, flush: bool = False) -> None:
        if self._broken or not scalars or _number(step) is None:
            return
        try:
            writer = self._writer or self._open(purge_step=int(step))
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, global_step=int(step))
            if flush:
                writer.flush()  # a checkpoint is a natural point for the log to be complete on disk
        except OSError as exc:
            self._give_up(exc)

    def _open(self, *, purge_step: int) -> Any:
        from tensorboardX import SummaryWriter  # imports torch: only a run that logs pays for it

        self._writer = SummaryWriter(
            logdir=str(self.logdir), flush_secs=self._flush_secs, purge_step=purge_step,
            # tensorboardX names files by the second and host; the pid keeps two attempts apart.
            filename_suffix=f".{os.getpid()}",
        )
        return self._writer

    def _give_up(self, exc: OSError) -> None:
        """A log that cannot be written (disk full, folder gone) must not fail the training: say so
        once in the job's events and train on without it."""
        if not self._broken:
            self._broken = True
            self._reporter.log(f"the TensorBoard log in {self.logdir} could not be written and is off "
                               f"from here: {exc}", level="warning")


def reporter_for(spec: TrainerSpec, reporter: Any) -> Any:
    """The reporter a run should use: ``reporter`` itself, or wrapped in a TensorBoard log when the
    recipe asks for one."""
    if not spec.recipe.tensorboard:
        return reporter
    return TensorBoardReporter(reporter, logdir=Path(spec.plan.output_dir).resolve() / FOLDER)
