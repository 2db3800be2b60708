"""The epoch loop SFT and DPO share: which batches each optimizer step takes, where a resumed run
picks up, the per-step ``metric`` event, compiling, resume points, cancellation, pausing, and the
end of each epoch.

With several ranks (``trainer/distributed.py``) each optimizer step's group holds the batches of
every rank (``gradient_accumulation_steps`` x world size, in the order one process would take
them) and the ranks agree at each step boundary whether to stop or pause, so all of them stop at
the same step.

The two trainers differ only in what one step computes (``step``) and what an epoch's checkpoint
holds (``end_epoch``); everything that decides *when* something happens lives here once, so a
resume, a cancel or a resume point behaves the same for both.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain.domain.protocol import Paused, StepMetric
from posttrain.domain.recipes import Recipe
from posttrain.trainer import distributed
from posttrain.trainer.batching import length_grouped_batches
from posttrain.trainer.compiling import Compiler
from posttrain.trainer.optimization import Optimization
from posttrain.trainer.precision import Precision
from posttrain.trainer.reporting import Reporter, StopFlag
from posttrain.trainer.resume_points import ResumePoints


@dataclass
class StepResult:
    """What one optimizer step reports: its loss and any method-specific metrics (DPO's rewards),
    plus the token counts the loop turns into throughput and padding figures."""

    loss: float
    real_tokens: int
    total_tokens: int
    metrics: dict[str, float]


#: One optimizer step over the micro-batches of one group (lists of example indices); None if a
#: cancel arrived during the step.
StepFunction = Callable[[list[list[int]]], "StepResult | None"]
#: The end of an epoch: evaluate, write and report the checkpoint; gets (epoch, global_step, losses).
EpochEnd = Callable[[int, int, list[float]], None]


@dataclass
class EpochLoop:
    model: Any
    run: Optimization
    recipe: Recipe
    unit_lengths: list[int]  # length of each example (or pack) in tokens, for length-grouped batches
    seed: int
    precision: Precision
    compiler: Compiler
    points: ResumePoints
    reporter: Reporter
    stop: StopFlag

    def step_groups(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's optimizer steps, each a group of ``gradient_accumulation_steps`` batches
        per rank (each rank trains on its ``distributed.shard`` of the group). Seeded by (seed,
        epoch), so a resumed run, and every rank, sees the same order as the lost one."""
        batches = length_grouped_batches(self.unit_lengths, batch_size=self.recipe.data.batch_size,
                                         shuffle=self.recipe.data.shuffle, rng=random.Random(f"{self.seed}:{epoch}"))
        accumulate = self.recipe.schedule.gradient_accumulation_steps * distributed.world().size
        groups = [batches[i : i + accumulate] for i in range(0, len(batches), accumulate)]
        return groups[: self.run.steps_per_epoch]

    def train(self, *, step: StepFunction, end_epoch: EpochEnd) -> str:
        """Runs the remaining epochs; returns "completed", "cancelled" or "paused" (after emitting
        the ``paused`` event: the pause's resume point is written, the run stops before its next
        step)."""
        run, reporter = self.run, self.reporter
        global_step = run.global_step
        self.compiler.start(self.model, reporter=reporter)
        self.stop.arm()
        for epoch in range(run.start_epoch, self.recipe.schedule.n_epochs + 1):
            groups = self.step_groups(epoch)
            resumed = epoch == run.start_epoch
            done = run.steps_done_in_epoch if resumed else 0  # resumed mid-epoch: skip those steps
            losses = list(run.epoch_losses) if resumed else []
            for index, group in enumerate(groups[done:], start=done + 1):
                stop, pause = distributed.any_rank(self.stop.is_set(), self.stop.pause_requested())
                if stop:
                    return "cancelled"
                if pause:
                    self._pause(epoch=epoch, steps_done_in_epoch=index - 1, global_step=global_step, losses=losses)
                    return "paused"
                started = time.perf_counter()
                lr = run.scheduler.get_last_lr()[0]
                result = step(group)
                if result is None:
                    return "cancelled"
                global_step += 1
                losses.append(result.loss)
                elapsed = max(time.perf_counter() - started, 1e-9)
                reporter.emit(StepMetric(
                    step=global_step, epoch=epoch, loss=result.loss, lr=lr, tokens_per_s=result.real_tokens / elapsed,
                    tokens=result.real_tokens, padding_fraction=1 - result.real_tokens / max(result.total_tokens, 1),
                    step_seconds=elapsed, total_steps=run.total_steps,
                    extra={**result.metrics, **self.precision.memory_fields()}))
                self.compiler.after_step(self.model, step_seconds=elapsed, steps_left=run.total_steps - global_step,
                                         reporter=reporter)
                if index < len(groups) and self.points.due():
                    self.points.save(model=self.model, optimizer=run.optimizer, scheduler=run.scheduler, epoch=epoch,
                                     steps_done_in_epoch=index, global_step=global_step, losses=losses,
                                     reporter=reporter)
            if distributed.any_rank(self.stop.is_set())[0]:
                return "cancelled"
            end_epoch(epoch, global_step, losses)
            self.points.clear()
        return "completed"

    def _pause(self, *, epoch: int, steps_done_in_epoch: int, global_step: int, losses: list[float]) -> None:
        """Write where the run stands (unless the epoch has just begun: the newest epoch checkpoint,
        or the fresh start, is that place already) and report ``paused``."""
        label = None
        if steps_done_in_epoch:
            run = self.run
            written = self.points.save(model=self.model, optimizer=run.optimizer, scheduler=run.scheduler,
                                       epoch=epoch, steps_done_in_epoch=steps_done_in_epoch, global_step=global_step,
                                       losses=losses, reporter=self.reporter)
            if written is None:
                self.reporter.log("paused without a resume point: the job will continue from its newest "
                                  "epoch checkpoint", level="warning")
            else:
                label = f"epoch-{epoch}-step-{global_step}"
        self.reporter.emit(Paused(step=global_step, resume_point=label))
