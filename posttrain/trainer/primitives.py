"""The steps every training job is made of, held by one long-lived trainer process: ``sample``
(completions from the current policy), ``forward_backward`` (a named loss over one micro-batch,
its gradient added to the parameters'), ``optim_step`` (clip, step, schedule, clear) and ``save``
(the epoch checkpoint, through ``epoch_checkpoints``).

SFT (``sft.py``), DPO (``dpo.py``) and GRPO (``grpo.py``) are job loops over these: they decide
what and when, the primitives how. The named losses (``LOSSES``) are SFT's ``cross_entropy``,
``dpo`` and ``grpo``; each returns the objective this rank backpropagates and what it reports of
itself. The model, optimizer and tokenizer stay loaded between calls, so a step costs its compute
only, and a later API can hand the same calls to a user's own training loop (the style the Tinker
API made common).

On several ranks ``parallel`` (``data_parallel.DataParallel``) is the policy's forward through DDP
or FSDP2, and ``forward_backward(..., sync=False)`` keeps a micro-batch's gradients local until the
step's last one; each loss scales its objective by ``parallel.loss_scale`` (the world size), so the
averaged gradient is that of the whole global batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain.trainer import forward, sampling
from posttrain.trainer.data_parallel import DataParallel
from posttrain.trainer.dpo_loss import pair_losses
from posttrain.trainer.epoch_checkpoints import write_epoch_checkpoint
from posttrain.trainer.grpo_loss import completion_logps_and_entropy, grpo_loss
from posttrain.trainer.optimization import Optimization, apply_gradients
from posttrain.trainer.precision import Precision
from posttrain.trainer.reporting import Reporter


@dataclass
class Primitives:
    model: Any
    tokenizer: Any
    run: Optimization
    precision: Precision
    #: The policy's forward on this rank (DDP or FSDP2 on several); None: one process, nothing wrapped.
    parallel: DataParallel | None = None
    #: The sampling temperature, which GRPO's log-probs are also taken at.
    temperature: float = 1.0

    @property
    def loss_scale(self) -> int:
        """What each rank multiplies its objective by, so DDP's mean of the gradients is their sum."""
        return self.parallel.loss_scale if self.parallel is not None else 1

    def sample(self, prompts: list[str], *, num_generations: int, top_p: float,
               max_new_tokens: int) -> sampling.Samples:
        with self.precision.autocast_context():
            return sampling.sample(self.model, self.tokenizer, prompts, num_generations=num_generations,
                                   temperature=self.temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                   device=self.precision.device)

    def reference_logps(self, samples: sampling.Samples):
        """The reference model's per-token log-probs: the base with the LoRA adapter switched off
        (peft's ``disable_adapter``), no gradient, never a second copy of the weights."""
        import torch

        with torch.no_grad(), self.model.disable_adapter(), self.precision.autocast_context():
            logps, _ = completion_logps_and_entropy(self.model, samples.input_ids(), samples.attention_mask(),
                                                    samples.completion_mask, temperature=self.temperature,
                                                    with_entropy=False)
        return logps

    def policy_nll(self, samples: sampling.Samples) -> tuple[float, int]:
        """The current policy's summed negative log-likelihood of the sampled completions' tokens
        (at the sampling temperature, no gradient) and how many tokens that is: a GRPO checkpoint's
        perplexity is exp of their ratio on its validation completions."""
        import torch

        with torch.no_grad(), self.precision.autocast_context():
            logps, _ = completion_logps_and_entropy(self.model, samples.input_ids(), samples.attention_mask(),
                                                    samples.completion_mask, temperature=self.temperature,
                                                    with_entropy=False)
        return float(-logps.sum()), samples.completion_tokens

    def forward_backward(self, loss: str, batch: Any, *, sync: bool = True, **inputs: Any) -> Any:
        """The named loss (``LOSSES``) over one micro-batch, its gradient added to the parameters'.
        ``sync=False``: keep the gradient on this rank (all but a step's last micro-batch; nothing
        changes in one process). Returns what the loss reports of itself."""
        compute = LOSSES.get(loss)
        if compute is None:
            raise ValueError(f"no primitive loss named {loss!r}; there are {sorted(LOSSES)}")
        self.model.train()
        deferred = self.parallel is not None and not sync
        with self.parallel.no_sync() if deferred and self.parallel is not None else contextlib.nullcontext():
            objective, report = compute(self, batch, **inputs)
            scaler = self.run.scaler
            (scaler.scale(objective) if scaler else objective).backward()
        return report

    def optim_step(self) -> None:
        apply_gradients(self.model, optimizer=self.run.optimizer, scheduler=self.run.scheduler, scaler=self.run.scaler)

    def zero_grad(self) -> None:
        self.run.optimizer.zero_grad(set_to_none=True)

    def save(self, reporter: Reporter, *, run: Optimization | None = None, **checkpoint: Any) -> None:
        """The epoch checkpoint of the model as it stands, with its optimizer and schedule (``run``:
        another view of them, such as FSDP2's gathered optimizer): ``epoch_checkpoints.
        write_epoch_checkpoint``, whose ``checkpoint`` arguments say the job, folder, epoch, step,
        losses and metrics."""
        write_epoch_checkpoint(reporter, model=self.model, tokenizer=self.tokenizer, run=run or self.run, **checkpoint)


def _cross_entropy(prims: Primitives, batch: Any, *, weight: float, label_tokens: float) -> tuple[Any, tuple[float, int]]:
    """SFT's: the summed next-token cross-entropy of the batch's label tokens over ``label_tokens``
    (those of the whole global batch), times ``weight`` (0: a stand-in batch that counts for
    nothing). Reports the summed loss and how many label tokens are the model's argmax."""
    import torch.nn.functional as F

    if prims.parallel is not None:
        logits, targets, _ = prims.parallel.label_logits(batch)
    else:
        logits, targets, _ = forward.label_logits(prims.model, batch, precision=prims.precision)
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    correct = int((logits.detach().argmax(dim=-1) == targets).sum())
    return loss_sum * (weight * prims.loss_scale) / label_tokens, (float(loss_sum.detach()), correct)


def _dpo(prims: Primitives, batch: Any, *, weight: float, total_pairs: float, **pair: Any) -> tuple[Any, Any]:
    """DPO's (``dpo_loss.pair_losses``; ``pair``: its config, reference cache and chosen-NLL
    tally): the pair-mean loss weighted by the batch's share of the global batch's ``total_pairs``.
    Reports the per-pair losses and the chosen and rejected rewards."""
    policy = prims.parallel.label_logits if prims.parallel is not None else None
    losses, chosen, rejected = pair_losses(prims.model, batch, precision=prims.precision, policy=policy, **pair)
    objective = losses.mean() * (weight * batch["pairs"] * prims.loss_scale / total_pairs)
    return objective, (losses, chosen, rejected)


def _grpo(prims: Primitives, samples: sampling.Samples, *, advantages: Any, **inputs: Any) -> tuple[Any, Any]:
    """GRPO's (``grpo_loss.grpo_loss``; ``inputs``: its config, reference log-probs and token
    counts) over one sampled micro-batch. Reports the loss's value and its metrics."""
    with prims.precision.autocast_context():
        logps, entropies = completion_logps_and_entropy(prims.model, samples.input_ids(), samples.attention_mask(),
                                                        samples.completion_mask, temperature=prims.temperature)
    ref = inputs.pop("ref_logps", None)
    value, metrics = grpo_loss(logps, samples.completion_mask, advantages.to(logps.device),
                               ref_per_token_logps=ref, entropies=entropies, **inputs)
    return value * prims.loss_scale, (float(value.detach()), metrics)


#: The losses ``forward_backward`` knows, by name.
LOSSES: dict[str, Callable[..., tuple[Any, Any]]] = {"cross_entropy": _cross_entropy, "dpo": _dpo, "grpo": _grpo}
