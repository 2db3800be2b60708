"""The optimizer side of a training loop: optimizer, warmup+decay schedule, fp16 grad scaler, the
step that applies an accumulated gradient, and restoring all of it from a checkpoint on resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.domain.recipes import Optimizer, Recipe
from posttrain.trainer.checkpoints import load_training_state, restore_rng_state
from posttrain.trainer.errors import TrainerConfigError
from posttrain.trainer.precision import Precision

MAX_GRAD_NORM = 1.0  # as HF Trainer does by default


def build_optimizer(model, optimizer: Optimizer):  # model: a torch module
    import torch

    kind, lr, weight_decay = optimizer.optimizer_type, optimizer.lr, optimizer.weight_decay
    params = [p for p in model.parameters() if p.requires_grad]
    if kind in ("adamw", "adam"):
        adam = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        # torch's fused kernel does a parameter's whole update in one pass instead of a dozen tensor
        # ops: the same update in a fraction of the time (docs/performance.md). Plain Adam where this
        # device or dtype has no fused kernel.
        try:
            return adam(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError, TypeError):
            return adam(params, lr=lr, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise TrainerConfigError(f"optimizer_config.optimizer_type must be adam, adamw or sgd, not {kind!r}")


def build_scheduler(optimizer, *, warmup_steps: int, total_steps: int):
    """Linear warmup, then linear decay to zero over the planned steps."""
    from transformers import get_scheduler

    return get_scheduler("linear", optimizer, num_warmup_steps=max(0, warmup_steps),
                         num_training_steps=max(total_steps, 1))


def replan_scheduler(optimizer, scheduler) -> None:
    """After loading a saved schedule, set the learning rates from *this* run's plan.

    The saved optimizer carries the rate of the old plan (zero at the end of a finished run), and
    a resumed job may plan more epochs; without this, the first resumed step would use it.
    """
    rates = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates


@dataclass
class Optimization:
    """What a training loop steps: optimizer, schedule, fp16 scaler, and where the count stands."""

    optimizer: Any
    scheduler: Any
    scaler: Any
    total_steps: int
    steps_per_epoch: int
    global_step: int = 0
    start_epoch: int = 1
    #: Resuming mid-epoch (from a resume point): optimizer steps of ``start_epoch`` already done, and their losses.
    steps_done_in_epoch: int = 0
    epoch_losses: list[float] = field(default_factory=list)


def prepare_optimization(model, *, recipe: Recipe, micro_batches: int, precision: Precision,
                         resume_folder: Path | None = None, world_size: int = 1,
                         load_optimizer: Callable[[Any, dict[str, Any]], bool] | None = None) -> Optimization:
    """Plan the steps (``max_steps_per_epoch`` optimizer steps an epoch at most; a step takes
    ``gradient_accumulation_steps`` micro-batches on each of ``world_size`` ranks), build the optimizer,
    the warmup+decay schedule and, for fp16 on CUDA, a grad scaler; restore them from a checkpoint
    (``load_optimizer(optimizer, saved state)`` in place of ``optimizer.load_state_dict``: FSDP2's)."""
    import math

    import torch

    schedule = recipe.schedule
    steps_per_epoch = max(1, min(schedule.max_steps_per_epoch,
                                 math.ceil(micro_batches / (schedule.gradient_accumulation_steps * world_size))))
    total_steps = schedule.n_epochs * steps_per_epoch
    optimizer = build_optimizer(model, recipe.optimizer)
    scheduler = build_scheduler(optimizer, warmup_steps=recipe.optimizer.num_warmup_steps, total_steps=total_steps)
    scaler = torch.amp.GradScaler("cuda") if precision.autocast and precision.dtype == "fp16" else None
    run = Optimization(optimizer=optimizer, scheduler=scheduler, scaler=scaler, total_steps=total_steps,
                       steps_per_epoch=steps_per_epoch)
    if resume_folder is not None:
        run.global_step, run.start_epoch, run.steps_done_in_epoch, run.epoch_losses = resume_training(
            folder=resume_folder, optimizer=optimizer, scheduler=scheduler, load_optimizer=load_optimizer)
    return run


def resume_training(*, folder: Path, optimizer, scheduler,
                    load_optimizer: Callable[[Any, dict[str, Any]], bool] | None = None,
                    ) -> tuple[int, int, int, list[float]]:
    """Restore optimizer, scheduler and RNG from a checkpoint or a resume point; return the global
    step, the epoch to train next, the optimizer steps of that epoch already done (their batches are
    skipped) and those steps' losses (for the epoch's train loss).

    The learning rates are then set from *this* run's plan (it may have more epochs than the
    interrupted one), not from the saved schedule. ``load_optimizer`` returns False when it could
    not use the saved optimizer state (the moments then start afresh).
    """
    state = load_training_state(folder=folder)
    if load_optimizer is None:
        optimizer.load_state_dict(state["optimizer"])
    else:
        load_optimizer(optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    replan_scheduler(optimizer, scheduler)
    restore_rng_state(state["rng"])
    if "steps_done_in_epoch" in state:  # a resume point, mid-epoch
        return int(state["global_step"]), int(state["epoch"]), int(state["steps_done_in_epoch"]), list(state["losses"])
    return int(state["global_step"]), int(state["epoch"]) + 1, 0, []


def apply_gradients(model, *, optimizer, scheduler, scaler) -> None:
    """The end of every optimizer step, SFT's and DPO's: unscale (fp16), clip the trainable
    parameters' gradient to ``MAX_GRAD_NORM``, step the optimizer (through the scaler for fp16) and
    the schedule, and clear the gradients for the next step."""
    import torch

    if scaler:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
