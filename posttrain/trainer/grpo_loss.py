"""GRPO's formulas, as TRL 1.16's ``GRPOTrainer`` computes them (trl/trainer/grpo_trainer.py).

Kept apart from the job loop (``grpo.py``) so one fixed batch can be put through this module and
through TRL's ``GRPOTrainer._compute_loss`` and the two compared
(tests/integration/test_grpo_loss_matches_trl.py).

- ``completion_logps_and_entropy``: TRL's ``_get_per_token_logps_and_entropies``: the prompt and
  completion run through the model as one sequence (``input_ids``, ``attention_mask``, no cache),
  the logits at the completion positions are divided by the sampling temperature, and each
  completion token gets its log-probability and the distribution's entropy; masked positions are 0.
- ``group_advantages``: from ``_generate_and_score_completions``: each reward minus its group's mean
  (the ``num_generations`` completions of one prompt), divided by ``std + 1e-4`` where
  ``scale_rewards`` is ``group`` (the group's std, Bessel-corrected) or ``batch`` (the whole batch's),
  not divided for ``none``. NaN rewards (unscorable) are left out of the mean and std and get 0.
- ``grpo_loss``: ``_compute_loss``: ratio ``exp(logp - old_logp)`` per token (or, for
  ``importance_sampling_level="sequence"``, the exp of the mean per-token log-ratio of the
  completion), clipped to ``[1 - epsilon_low, 1 + epsilon_high]``; per-token loss
  ``-min(ratio * A, clipped * A) + beta * KL`` with the k3 estimator
  ``KL = exp(ref - logp) - (ref - logp) - 1``, times the ratio when ``use_bias_correction_kl`` (TRL's
  default);  then normalised by ``loss_type``:
  ``grpo`` mean over each completion's tokens, then over completions; ``bnpo`` mean over all tokens
  of the micro-batch; ``dr_grpo`` sum over ``completions * max_completion_length``; ``dapo`` sum over
  the tokens of the whole optimizer step (``num_items_in_batch``). The first three are divided by the
  accumulation steps, as TRL does, so summed micro-batch gradients make one step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from posttrain.trainer.forward import attention_for_batch, base_model, contiguous_head_input

GrpoLossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]
ScaleRewards = Literal["group", "batch", "none"]
ImportanceSamplingLevel = Literal["token", "sequence"]


@dataclass(frozen=True)
class GrpoLossConfig:
    """The knobs ``grpo_loss`` reads (TRL's ``GRPOConfig`` names)."""

    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: GrpoLossType = "dapo"
    importance_sampling_level: ImportanceSamplingLevel = "token"
    max_completion_length: int = 256
    #: TRL's default: the KL term times the importance ratio (DeepSeek-V3.2's unbiased reverse-KL gradient).
    use_bias_correction_kl: bool = True
    #: Two-sided GRPO: the unclipped ratio capped at ``delta`` too; None: standard clipping.
    delta: float | None = None


def completion_logps_and_entropy(model, input_ids, attention_mask, completion_mask, *, temperature: float = 1.0,
                                 with_entropy: bool = True):
    """Per-token log-probs ``[B, T]`` of the last ``T = completion_mask.shape[1]`` tokens of
    ``input_ids`` (the completion), and their entropies (or None); 0 where ``completion_mask`` is 0."""
    import torch

    keep = completion_mask.shape[1]
    kwargs = {"logits_to_keep": keep + 1} if _keeps_logits(model) else {}
    # The attention SFT and DPO train with (plain attention for short batches on a CPU, whose
    # bf16 backward is several times faster than SDPA's there); the kept positions are a strided
    # view of the hidden states, which the head gets contiguous.
    with attention_for_batch(model, input_ids, device=input_ids.device.type), contiguous_head_input(model):
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    logits = outputs.logits[:, -keep - 1 : -1, :].float() / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    targets = input_ids[:, -keep:]
    logps = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = completion_mask.bool()
    logps = logps.masked_fill(~mask, 0.0)
    if not with_entropy:
        return logps, None
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logps, entropy.masked_fill(~mask, 0.0)


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (TRL's check): then the output head runs
    on the completion's positions only, not on the prompt's, as TRL's log-probs do."""
    import inspect

    return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters


def _nanstd(values, dim=None):
    """TRL's ``nanstd``: the Bessel-corrected std over the non-NaN values (NaN for fewer than two)."""
    import torch

    if dim is None:
        values = values.reshape(-1)
        dim = 0
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim)
    count = (~torch.isnan(values)).sum(dim=dim)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    return torch.sqrt(variance * correction)


def group_advantages(rewards, *, num_generations: int, scale_rewards: ScaleRewards = "group"):
    """Advantages ``[B]`` of rewards ``[B]`` laid out as consecutive groups of ``num_generations``
    completions of one prompt; and whether each row's std is zero (``frac_reward_zero_std``)."""
    import torch

    grouped = rewards.view(-1, num_generations)
    means = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards in ("group", "none"):
        std = _nanstd(grouped, dim=1).repeat_interleave(num_generations)
    elif scale_rewards == "batch":
        std = _nanstd(rewards).expand_as(rewards)
    else:
        raise ValueError(f"scale_rewards must be group, batch or none, not {scale_rewards!r}")
    advantages = rewards - means
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), zero_std


def _masked_mean(values, mask) -> float:
    if values.shape[1] == 1:  # one value per sequence
        return float(values.sum() / max(values.shape[0], 1))
    return float((values * mask).sum() / mask.sum().clamp(min=1.0))


def grpo_loss(per_token_logps, completion_mask, advantages, *, config: GrpoLossConfig, old_per_token_logps=None,
              ref_per_token_logps=None, entropies=None, num_items_in_batch: Any = None,
              accumulation_steps: int = 1) -> tuple[Any, dict[str, float]]:
    """The micro-batch's loss (a scalar with grad) and its metrics: ``kl`` (when beta > 0),
    ``entropy`` (when given), ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_region``
    (the fractions of completion tokens whose ratio left the clip range on the side that matters for
    their advantage's sign), ``policy_loss`` (the loss before the accumulation division).

    ``old_per_token_logps`` None: the batch is on-policy (TRL's ``num_iterations == 1``), the ratio is 1
    with the gradient of ``logp``. ``num_items_in_batch``: the completion tokens of the whole
    optimizer step (``dapo`` only; default: this micro-batch's).
    """
    import torch

    mask = completion_mask.to(per_token_logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    log_ratio = per_token_logps - old
    if config.importance_sampling_level == "token":
        log_weights = log_ratio
    elif config.importance_sampling_level == "sequence":
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(f"importance_sampling_level must be token or sequence, not {config.importance_sampling_level!r}")
    coef_1 = torch.exp(log_weights)
    coef_2 = torch.clamp(coef_1, 1 - config.epsilon_low, 1 + config.epsilon_high)
    per_token_kl = None
    if config.beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("beta > 0 needs the reference model's log-probs")
        gap = ref_per_token_logps - per_token_logps
        per_token_kl = torch.exp(gap) - gap - 1
        if config.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    capped = coef_1 if config.delta is None else torch.clamp(coef_1, max=config.delta)
    per_token_loss = -torch.min(capped * advantages, coef_2 * advantages)
    if per_token_kl is not None:
        per_token_loss = per_token_loss + config.beta * per_token_kl

    if config.loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        policy_loss, loss = loss.detach(), loss / accumulation_steps
    elif config.loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
        policy_loss, loss = loss.detach(), loss / accumulation_steps
    elif config.loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * config.max_completion_length)
        policy_loss, loss = loss.detach(), loss / accumulation_steps
    elif config.loss_type == "dapo":
        items = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=mask.dtype)
        loss = (per_token_loss * mask).sum() / items.clamp(min=1.0)
        policy_loss = loss.detach()
    else:
        raise ValueError(f"loss_type must be grpo, dr_grpo, dapo or bnpo, not {config.loss_type!r}")

    low = ((coef_1 < 1 - config.epsilon_low) & (advantages < 0)).float()
    high = ((coef_1 > 1 + config.epsilon_high) & (advantages > 0)).float()
    metrics = {"clip_ratio_low": _masked_mean(low, mask), "clip_ratio_high": _masked_mean(high, mask),
               "clip_ratio_region": _masked_mean(torch.maximum(low, high), mask),
               "policy_loss": float(policy_loss)}
    if per_token_kl is not None:
        metrics["kl"] = _masked_mean(per_token_kl.detach(), mask)
    if entropies is not None:
        metrics["entropy"] = _masked_mean(entropies.detach(), mask)
    return loss, metrics
