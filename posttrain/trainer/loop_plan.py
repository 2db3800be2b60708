"""The plan of a training loop, SFT's or DPO's: how many epochs and steps, how batches are formed,
and which parts of the recipe shape them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoopPlan:
    """The parts of the Llama Stack ``TrainingConfig`` the loop uses, with spec defaults."""

    n_epochs: int
    max_steps_per_epoch: int
    gradient_accumulation_steps: int
    max_validation_steps: int
    batch_size: int
    shuffle: bool
    data_format: str
    train_on_input: bool
    packed: bool
    warmup_steps: int
    activation_checkpointing: bool

    @classmethod
    def from_training_config(cls, config: dict[str, Any]) -> LoopPlan:
        data = config.get("data_config") or {}
        optimizer = config.get("optimizer_config") or {}
        efficiency = config.get("efficiency_config") or {}
        return cls(
            n_epochs=int(config.get("n_epochs") or 1),
            max_steps_per_epoch=int(config.get("max_steps_per_epoch") or 1),
            gradient_accumulation_steps=max(1, int(config.get("gradient_accumulation_steps") or 1)),
            max_validation_steps=int(config.get("max_validation_steps") or 1),
            batch_size=max(1, int(data.get("batch_size") or 1)),
            shuffle=bool(data.get("shuffle", True)),
            data_format=str(data.get("data_format") or "instruct"),
            train_on_input=bool(data.get("train_on_input")),
            packed=bool(data.get("packed")),
            warmup_steps=int(optimizer.get("num_warmup_steps") or 0),
            activation_checkpointing=bool(efficiency.get("enable_activation_checkpointing")),
        )
