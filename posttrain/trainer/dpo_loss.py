"""The DPO loss and what it is computed from, shared by the trainer primitives' ``"dpo"`` loss
and DPO's validation pass (``dpo.py``).

A micro-batch puts its B chosen and B rejected sequences through the model as ONE batch of 2B
rows, padded to the longest; the summed log-probability of each answer's tokens gives

    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)

and the loss types follow TRL's ``DPOTrainer.dpo_loss`` (trl/trainer/dpo_trainer.py, TRL <= 0.12;
``kto_pair`` is the form TRL had before it was removed in favour of ``KTOTrainer``):

- ``sigmoid`` (DPO, Rafailov et al. 2023): ``-logsigmoid(beta * logits)``
- ``hinge`` (SLiC, Zhao et al. 2023): ``relu(1 - beta * logits)``
- ``ipo`` (Azar et al. 2023, eq. 17): ``(logits - 1 / (2 * beta)) ** 2``, on length-averaged
  log-probs, as TRL computes them for ipo
- ``kto_pair`` (HALOs report, eq. 7): with ``chosen_KL``/``rejected_KL`` the batch means of the
  policy/reference log-ratios clamped at 0, ``1 - sigmoid(beta * (chosen_logratios - rejected_KL))``
  for the chosen half and ``1 - sigmoid(beta * (chosen_KL - rejected_logratios))`` for the rejected
  half (2B losses).

Rewards are TRL's implicit ones: ``beta * (policy - reference)`` log-probs of each answer. The loss
of an optimizer step is the mean over its pairs, so gradient accumulation matches one large batch.
The reference log-probs of a pair are computed the first time it is met and cached
(``ReferenceLogps``): later epochs run the policy only.
"""

from __future__ import annotations

import math

from posttrain.domain.recipes import DPOLoss
from posttrain.trainer import distributed, forward
from posttrain.trainer.precision import Precision
from posttrain.trainer.preference_data import collate_pairs


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, *, beta: float, loss_type: str):
    """Per-example losses and the chosen/rejected rewards, as TRL's ``DPOTrainer.dpo_loss``.

    Returns ``(losses, chosen_rewards, rejected_rewards)``; losses has B entries, or 2B for kto_pair.
    """
    import torch
    import torch.nn.functional as F

    chosen_logratios = policy_chosen - reference_chosen
    rejected_logratios = policy_rejected - reference_rejected
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "kto_pair":
        chosen_kl = chosen_logratios.mean().clamp(min=0)
        rejected_kl = rejected_logratios.mean().clamp(min=0)
        losses = torch.cat((1 - torch.sigmoid(beta * (chosen_logratios - rejected_kl)),
                            1 - torch.sigmoid(beta * (chosen_kl - rejected_logratios))), 0)
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def answer_logps(model, batch, *, precision: Precision, average: bool):
    """Summed (or, with ``average``, mean) log-prob of each row's label tokens: shape [2B]."""
    summed, tokens = answer_logp_sums(model, batch, precision=precision)
    return summed / tokens.clamp(min=1) if average else summed


def answer_logp_sums(model, batch, *, precision: Precision):
    """Summed log-prob of each row's label tokens and how many there are: two tensors of shape [2B]."""
    summed, tokens, _ = answer_logp_sums_and_hits(model, batch, precision=precision)
    return summed, tokens


def answer_logp_sums_and_hits(model, batch, *, precision: Precision):
    """``answer_logp_sums``, and how many of each row's label tokens the model predicts (argmax)."""
    import torch

    log_probs, rows, hits = forward.token_log_probs_and_hits(model, batch, precision=precision)
    count = batch["input_ids"].shape[0]
    summed = torch.zeros(count, device=log_probs.device).index_add(0, rows, log_probs)
    return summed, torch.bincount(rows, minlength=count), torch.bincount(rows, weights=hits.float(), minlength=count)


class ReferenceLogps:
    """The reference model's answer log-probs for each preference pair, computed the first time the
    pair is met and reused after.

    The reference (the base with the adapter off) does not change while a job trains, so a pair's
    reference log-probs are the same in every epoch: from the second epoch on, a step needs only
    the policy's forward and backward (the reference forward is a third of a DPO step's FLOPs).
    TRL offers the same as ``precompute_ref_log_probs``, as a pass over the whole dataset before
    the first step; filling the cache as batches come keeps the first step immediate and costs
    nothing for pairs a short job never meets. Two floats a pair; a resumed job starts empty.
    """

    def __init__(self) -> None:
        self._pairs: dict[int, tuple[float, float]] = {}  # pair index -> (chosen, rejected)

    def __len__(self) -> int:
        return len(self._pairs)

    def of(self, model, batch, *, precision, average: bool):
        """``[2B]`` reference log-probs of ``batch`` (chosen then rejected), whose pairs are
        ``batch["pair_ids"]`` (their indices in the dataset)."""
        import torch

        ids = batch["pair_ids"]
        if all(i in self._pairs for i in ids):
            chosen, rejected = zip(*(self._pairs[i] for i in ids), strict=True)
            return torch.tensor(chosen + rejected, dtype=torch.float32, device=precision.device)
        with torch.no_grad(), model.disable_adapter():
            reference = answer_logps(model, batch, precision=precision, average=average)
        self._pairs.update(zip(ids, zip(reference[: len(ids)].tolist(), reference[len(ids):].tolist(), strict=True),
                               strict=True))
        return reference


def pair_batch(examples: list[dict], indices: list[int], *, pad_id: int) -> dict:
    """The batch of the pairs ``indices``, which it records for the reference cache."""
    return {**collate_pairs([examples[i] for i in indices], pad_id=pad_id), "pair_ids": list(indices)}


def pair_losses(model, batch, *, config: DPOLoss, precision, reference_logps: ReferenceLogps,
                 chosen_nll: ChosenNLL | None = None, policy=None):
    """Reference log-probs (adapter off, no grad; cached per pair), then the policy's, then TRL's loss.
    With ``chosen_nll``, the policy's log-probs of the chosen answers are added to it too.
    ``policy(batch)``: the policy's ``answer_logp_sums_and_hits`` (through DDP on several ranks)."""
    average = config.loss_type == "ipo"
    pairs = batch["pairs"]
    reference = reference_logps.of(model, batch, precision=precision, average=average)
    if policy is None:
        summed, tokens, hits = answer_logp_sums_and_hits(model, batch, precision=precision)
    else:
        summed, tokens, hits = policy(batch)
    policy = summed / tokens.clamp(min=1) if average else summed
    if chosen_nll is not None:
        chosen_nll.add(summed[:pairs], tokens[:pairs], hits[:pairs])
    return dpo_loss(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], beta=config.beta,
                    loss_type=config.loss_type)


class ChosenNLL:
    """The policy's negative log-likelihood of the chosen answers' tokens, summed over a validation
    pass: ``mean`` per token is what a DPO checkpoint's ``perplexity`` is exp of (the language-model
    perplexity of the answers the job teaches the model to prefer). ``accuracy``: the fraction of
    those tokens that are the policy's most likely next token, DPO's ``*_mean_token_accuracy``."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.tokens = 0
        self.hits = 0

    def add(self, summed_logps, tokens, hits) -> None:
        self.nll -= float(summed_logps.detach().sum())
        self.tokens += int(tokens.sum())
        self.hits += int(hits.sum())

    def summed_over_ranks(self) -> None:
        """Every rank's sums added together (a no-op in one process)."""
        nll, tokens, hits = distributed.all_reduce_sum([self.nll, self.tokens, self.hits])
        self.nll, self.tokens, self.hits = nll, int(tokens), int(hits)

    def mean(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan

    def accuracy(self) -> float:
        return self.hits / self.tokens if self.tokens else math.nan
