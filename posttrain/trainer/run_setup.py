"""What every training method settles before it reads a batch: output folder, threads, seeds,
precision, tokenizer and max sequence length, and what the ``started`` event reports about them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.domain.recipes import Recipe, TrainerSpec
from posttrain.trainer import distributed
from posttrain.trainer.loading import load_tokenizer, model_max_length, pin_paths
from posttrain.trainer.precision import Precision, resolve_precision


def set_threads(threads: int | None) -> int:
    """The trainer's CPU threads: the spec's (``POSTTRAIN_TRAINER_THREADS``), else OpenMP's own
    ``OMP_NUM_THREADS`` when the environment sets it, else every core; shared out among the ranks
    of a job on several processes of this machine (torch's launcher sets ``OMP_NUM_THREADS=1`` for
    each rank, so there the default is every core, divided)."""
    import torch

    world = distributed.world().size
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # "4,2": nested levels, the first counts
    from_env = int(omp) if world == 1 and omp.isdigit() else 0
    count = max(1, int(threads or from_env or os.cpu_count() or 1) // world)
    torch.set_num_threads(count)
    return count


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def base_resources(model, *, precision: Precision, threads: int) -> dict[str, Any]:
    """What the ``started`` event reports about the job's device and model, for every method."""
    import torch

    parameters, trainable = count_parameters(model)
    return {"device": precision.device, "dtype": precision.dtype, "requested_dtype": precision.requested,
            "threads": threads, "parameters": parameters, "trainable_parameters": trainable,
            "torch": torch.__version__, **distributed.resources(),
            **({"cuda_visible_devices": os.environ["CUDA_VISIBLE_DEVICES"]} if "CUDA_VISIBLE_DEVICES" in os.environ else {})}


def batch_resources(recipe: Recipe) -> dict[str, int]:
    """What one optimizer step takes: the batch on each device, the micro-batches it sums, and
    their product over the ranks, the global batch (in rows, or packs when packed)."""
    per_device, accumulate = recipe.data.batch_size, recipe.schedule.gradient_accumulation_steps
    return {"per_device_batch_size": per_device, "gradient_accumulation_steps": accumulate,
            "global_batch_size": per_device * accumulate * distributed.world().size}


@dataclass
class RunSetup:
    """What every training method settles before it reads a batch."""

    job_uuid: str
    seed: int
    trust_remote_code: bool
    output_dir: Path
    threads: int
    precision: Precision
    tokenizer: Any
    max_length: int


def set_up_run(spec: TrainerSpec) -> RunSetup:
    """Output folder, threads, seeds, precision, tokenizer and max sequence length, from the spec."""
    trust, seed, model = spec.trust_remote_code, spec.recipe.seed, spec.plan.model
    pin_paths(spec.plan.pins)  # what submit checked still holds (PathChangedError if not)
    output_dir = Path(spec.plan.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    threads = set_threads(spec.threads)
    seed_everything(seed)
    precision = resolve_precision(device=spec.device, requested_dtype=spec.recipe.dtype, cpu_bf16=spec.cpu_bf16)
    tokenizer = load_tokenizer(path=model, trust_remote_code=trust)
    max_length = model_max_length(model_path=model, tokenizer=tokenizer, trust_remote_code=trust)
    return RunSetup(job_uuid=spec.job_uuid, seed=seed, trust_remote_code=trust, output_dir=output_dir,
                    threads=threads, precision=precision, tokenizer=tokenizer, max_length=max_length)
