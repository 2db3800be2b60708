"""Two LoRA adapters saved as one: what a DPO job started from an SFT adapter checkpoints.

Such a job merges the SFT adapter into the base, then trains a fresh DPO adapter on that merged
model. Saved alone, the DPO adapter names the raw base, and loaded there (the README's recipe) it
gives another model than the one trained. But two LoRAs on one layer are one LoRA of their ranks
stacked::

    s1 B1 A1 + s2 B2 A2 = [s1 B1 | s2 B2] @ [A1 ; A2]

so the checkpoint's adapter is that stack, with each adapter's scaling folded into its B and
``lora_alpha`` equal to the rank (peft's scaling is then 1); a layer only one adapter adapts keeps
that adapter's rank. On the raw base it gives exactly base + SFT + DPO, the trained model.

This holds for plain LoRA on linear layers only: a DoRA adapter rescales the whole adapted weight
by a learned magnitude, and adapter biases or ``modules_to_save`` are no low-rank sum. ``LoraWeights``
says why when a pair cannot be stacked, and the job falls back (see ``dpo.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoraWeights:
    """One adapter as its product terms: module name -> (A, scaling * B), fp32 on the CPU, or
    ``unstackable`` saying why the adapter is no plain sum of low-rank products."""

    layers: dict = field(default_factory=dict)  # str -> (torch.Tensor [r, in], torch.Tensor [out, r])
    fan_in_fan_out: bool = False
    unstackable: str | None = None


def capture(model) -> LoraWeights:  # model: a peft PeftModel
    """The active adapter of ``model`` as product terms (a copy: training may go on)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    name = model.active_adapter
    config = model.peft_config[name]
    problems = []
    if getattr(config, "use_dora", False):
        problems.append("it is a DoRA adapter")
    if getattr(config, "bias", "none") != "none" or getattr(config, "lora_bias", False):
        problems.append("it trains biases")
    if getattr(config, "modules_to_save", None):
        problems.append("it saves whole modules (modules_to_save)")
    weights = LoraWeights(fan_in_fan_out=bool(getattr(config, "fan_in_fan_out", False)))
    for module_name, module in model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if type(module) is not LoraLinear:
            problems.append(f"{module_name} is a {type(module).__name__}, not a plain linear LoRA layer")
            continue
        if name not in module.lora_A:
            continue
        a = module.lora_A[name].weight.detach().float().cpu().clone()
        b = (module.lora_B[name].weight.detach().float() * module.scaling[name]).cpu()
        weights.layers[module_name] = (a, b)
    if not weights.layers:
        problems.append("it adapts no layer")
    weights.unstackable = "; ".join(dict.fromkeys(problems)) or None
    return weights


def why_not_stackable(first: LoraWeights, second: LoraWeights) -> str | None:
    """None when the two adapters stack exactly, else why not."""
    for label, weights in (("the starting adapter", first), ("the trained adapter", second)):
        if weights.unstackable:
            return f"{label}: {weights.unstackable}"
    if first.fan_in_fan_out != second.fan_in_fan_out:
        return "the adapters disagree on fan_in_fan_out"
    return None


def stack(first: LoraWeights, second: LoraWeights) -> tuple[dict, dict]:
    """The stacked adapter as (adapter_config fields, peft state dict): ``first`` then ``second``."""
    import torch

    state, ranks = {}, {}
    for module_name in sorted(set(first.layers) | set(second.layers)):
        terms = [w.layers[module_name] for w in (first, second) if module_name in w.layers]
        a = torch.cat([t[0] for t in terms], dim=0).contiguous()
        b = torch.cat([t[1] for t in terms], dim=1).contiguous()
        state[f"base_model.model.{module_name}.lora_A.weight"] = a
        state[f"base_model.model.{module_name}.lora_B.weight"] = b
        ranks[module_name] = a.shape[0]
    rank = max(ranks.values())
    # Per-layer ranks by the layer's own name (q_proj, gate_proj, ...) when every layer of that
    # name has the same rank, as in adapters built from the Llama Stack options; else by full name.
    by_leaf: dict[str, set[int]] = {}
    for module_name, r in ranks.items():
        by_leaf.setdefault(module_name.rsplit(".", 1)[-1], set()).add(r)
    if all(len(rs) == 1 for rs in by_leaf.values()):
        pattern = {leaf: rs.pop() for leaf, rs in by_leaf.items()}
    else:
        import re

        pattern = {re.escape(module_name): r for module_name, r in ranks.items()}
    pattern = {key: r for key, r in sorted(pattern.items()) if r != rank}
    config = {
        "r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        # Exact module names: peft adapts these layers and no others.
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": first.fan_in_fan_out, "task_type": "CAUSAL_LM",
    }
    return config, state


def save_stacked(folder: Path, first: LoraWeights, second: LoraWeights, *, base_model_name_or_path: str) -> None:
    """Write the stacked adapter into ``folder`` as peft saves one (config and safetensors)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    fields, state = stack(first, second)
    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(base_model_name_or_path=base_model_name_or_path, **fields).save_pretrained(str(folder))
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def set_adapter_base(folder: Path, base: str) -> None:
    """Point a saved adapter's ``base_model_name_or_path`` at ``base``."""
    path = folder / ADAPTER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
