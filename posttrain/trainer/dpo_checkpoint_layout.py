"""How a DPO checkpoint holds its adapter so that it loads into the model that was trained.

A DPO job on the plain base writes its adapter, as SFT does. A job started from an SFT adapter
(the plan's ``adapter``) trained its adapter on base + SFT merged; its checkpoints hold:

- stacked (plain LoRA adapters, the usual case): at the top, one adapter that is the SFT and the
  DPO adapters stacked (``stacked_adapters``), naming the raw base: the README's recipe
  ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), checkpoint)`` gives
  exactly the trained model. ``dpo_adapter/`` keeps the DPO adapter alone, which a resumed job
  continues training on the merged starting model (it does not apply on the raw base).
- on its starting model (DoRA and other adapters that do not stack): the DPO adapter, whose
  ``base_model_name_or_path`` names ``base/`` in the checkpoint, the starting model (base + SFT
  merged) written there; the job's log says so.

Both always write ``merged/``, the trained model as a plain folder.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.domain.recipes import TrainerSpec
from posttrain.trainer.loading import load_merge_base
from posttrain.trainer.stacked_adapters import LoraWeights, capture, save_stacked, set_adapter_base, why_not_stackable

DPO_ADAPTER = "dpo_adapter"
STARTING_MODEL = "base"


@dataclass
class AdapterLayout:
    """What ``checkpoints.write_checkpoint`` gets for a DPO job: how to save the model, what
    ``merged/`` is made from, and what trainer_state.json records about the layout."""

    save_model: Callable[[Path, Path], None] | None
    merge_base: Callable[[], Any] | None
    state: dict[str, Any] = field(default_factory=dict)
    warning: str | None = None


def adapter_layout(spec: TrainerSpec, *, model, tokenizer, starting: LoraWeights | None,
                   trust_remote_code: bool) -> AdapterLayout:
    """The layout of this job's checkpoints; ``starting`` is the SFT adapter merged at the start."""
    base_model, starting_adapter = spec.plan.model, spec.plan.adapter
    raw_base = functools.partial(load_merge_base, path=base_model, trust_remote_code=trust_remote_code)
    if starting is None:
        return AdapterLayout(save_model=None, merge_base=raw_base if spec.save_merged else None)
    why = why_not_stackable(starting, capture(model))
    if why is None:
        def save_stacked_adapter(staging: Path, final: Path) -> None:
            save_stacked(staging, starting, capture(model), base_model_name_or_path=base_model)
            model.save_pretrained(staging / DPO_ADAPTER)

        return AdapterLayout(save_model=save_stacked_adapter, merge_base=raw_base,
                             state={"adapter_layout": "stacked", "resume_adapter": DPO_ADAPTER})

    starting_model = functools.partial(load_merge_base, path=base_model, adapter=starting_adapter,
                                       trust_remote_code=trust_remote_code)

    def save_on_starting_model(staging: Path, final: Path) -> None:
        model.save_pretrained(staging)
        set_adapter_base(staging, str(final / STARTING_MODEL))
        start = starting_model()
        start.save_pretrained(staging / STARTING_MODEL)
        tokenizer.save_pretrained(staging / STARTING_MODEL)
        del start

    return AdapterLayout(
        save_model=save_on_starting_model, merge_base=starting_model,
        state={"adapter_layout": "on_starting_model", "adapter_base": STARTING_MODEL},
        warning=(f"the adapter {starting_adapter} and the DPO adapter cannot be stacked into one adapter for the "
                 f"base ({why}); each checkpoint holds the DPO adapter for its {STARTING_MODEL}/ folder (the base "
                 f"with {starting_adapter} merged, which its adapter_config.json names), and merged/"),
    )


def resume_adapter(folder: Path) -> Path:
    """The adapter a resumed job continues from ``folder`` (a checkpoint or resume point)."""
    alone = folder / DPO_ADAPTER
    return alone if alone.is_dir() else folder
