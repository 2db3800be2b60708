"""An epoch's checkpoint, SFT's or DPO's: its metrics, the folder, and its ``checkpoint`` event.

Both methods end an epoch the same way: evaluate, write ``epoch_<E>`` (model or adapter, tokenizer,
optimizer/scheduler/RNG state, ``trainer_state.json`` with the metrics), and report it; on resume
the checkpoints already on disk are reported again from their ``trainer_state.json``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from posttrain.domain.protocol import CHECKPOINT_METRICS, CheckpointWritten
from posttrain.trainer import checkpoints
from posttrain.trainer.optimization import Optimization
from posttrain.trainer.reporting import Reporter


def perplexity(loss: float) -> float:
    """exp(loss) for a mean per-token negative log-likelihood; infinite past float range."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def write_epoch_checkpoint(reporter: Reporter, *, job_uuid: str, output_dir: Path, model, tokenizer,
                           run: Optimization, epoch: int, global_step: int, losses: list[float],
                           validation_loss: float, state: dict[str, Any], merge_base,
                           nll_for_perplexity: float | None = None, save_model=None,
                           token_metrics: dict[str, float] | None = None, keep: int | None = None) -> None:
    """An epoch's checkpoint, SFT's or DPO's: the train/validation metrics, the method's own
    ``state`` in trainer_state.json, the optimizer/scheduler/RNG state to resume from, and its
    ``checkpoint`` event with the time the write took.

    ``perplexity`` is exp of ``nll_for_perplexity``, a mean per-token negative log-likelihood: by default
    the validation loss (SFT's loss is one); DPO passes its policy's NLL of the chosen answers, since
    exp of a DPO loss is no perplexity. ``save_model`` as in ``checkpoints.write_checkpoint``.
    ``token_metrics``: any of ``protocol.CHECKPOINT_METRICS`` the method measured.

    With ``keep`` (the spec's ``keep_checkpoints``), the checkpoints older than the newest ``keep``
    are deleted once this one is written and reported, so a job of many tiny epochs holds a
    bounded number of folders; the launcher deletes their rows when it records this one."""
    nll = validation_loss if nll_for_perplexity is None else nll_for_perplexity
    metrics = {"train_loss": sum(losses) / len(losses), "validation_loss": validation_loss,
               "perplexity": perplexity(nll), **(token_metrics or {})}
    trainer_state = {"epoch": epoch, "global_step": global_step, "total_steps": run.total_steps, **state,
                     "metrics": metrics}
    training_state = checkpoints.training_state(optimizer=run.optimizer, scheduler=run.scheduler, epoch=epoch,
                                                global_step=global_step)
    writing = time.perf_counter()
    folder = checkpoints.write_checkpoint(output_dir=output_dir, epoch=epoch, model=model, tokenizer=tokenizer,
                                          training_state=training_state, trainer_state=trainer_state,
                                          merge_base=merge_base, save_model=save_model)
    emit_checkpoint(reporter, job_uuid=job_uuid, folder=folder, state=trainer_state,
                    write_seconds=time.perf_counter() - writing)
    if keep is not None:
        checkpoints.prune_checkpoints(output_dir=output_dir, keep=keep)


def emit_checkpoint(reporter: Reporter, *, job_uuid: str, folder: Path, state: dict[str, Any],
                    write_seconds: float | None = None) -> None:
    """The ``checkpoint`` event of a folder whose ``trainer_state.json`` is ``state``; without
    ``write_seconds`` for one found on resume (nothing was written)."""
    epoch, metrics = int(state["epoch"]), state["metrics"]
    reporter.emit(CheckpointWritten(
        identifier=f"{job_uuid}-epoch-{epoch}", epoch=epoch, step=int(state["global_step"]), path=str(folder.resolve()),
        train_loss=metrics["train_loss"], validation_loss=metrics["validation_loss"], perplexity=metrics["perplexity"],
        write_seconds=write_seconds, **{name: metrics.get(name) for name in CHECKPOINT_METRICS}))
