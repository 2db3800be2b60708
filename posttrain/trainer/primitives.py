"""The steps a reinforcement job is made of, held by one long-lived trainer process: ``sample``
(completions from the current policy), ``forward_backward`` (a named loss over a sampled batch,
gradients accumulated), ``optim_step`` (clip, step, schedule, clear) and ``save`` (the epoch
checkpoint, through the same ``epoch_checkpoints`` SFT and DPO write).

The model, optimizer and tokenizer stay loaded between calls, so a step costs its compute only.
The job loop (``grpo.py``) calls them in order each step; they know nothing of when.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from posttrain.trainer import sampling
from posttrain.trainer.epoch_checkpoints import write_epoch_checkpoint
from posttrain.trainer.grpo_loss import GrpoLossConfig, completion_logps_and_entropy, grpo_loss
from posttrain.trainer.optimization import Optimization, apply_gradients
from posttrain.trainer.precision import Precision
from posttrain.trainer.reporting import Reporter


@dataclass
class Primitives:
    model: Any
    tokenizer: Any
    run: Optimization
    precision: Precision
    temperature: float

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

    def forward_backward(self, loss: str, samples: sampling.Samples, *, advantages, config: GrpoLossConfig,
                         ref_logps=None, num_items_in_batch: int, accumulation_steps: int) -> tuple[float,
                                                                                                     dict[str, float]]:
        """The named loss over one sampled micro-batch, its gradient added to the parameters'."""
        if loss != "grpo":
            raise ValueError(f"no primitive loss named {loss!r}")
        self.model.train()
        with self.precision.autocast_context():
            logps, entropies = completion_logps_and_entropy(self.model, samples.input_ids(), samples.attention_mask(),
                                                            samples.completion_mask, temperature=self.temperature)
        value, metrics = grpo_loss(logps, samples.completion_mask, advantages.to(logps.device), config=config,
                                   ref_per_token_logps=ref_logps, entropies=entropies,
                                   num_items_in_batch=num_items_in_batch, accumulation_steps=accumulation_steps)
        scaler = self.run.scaler
        (scaler.scale(value) if scaler else value).backward()
        return float(value.detach()), metrics

    def optim_step(self) -> None:
        apply_gradients(self.model, optimizer=self.run.optimizer, scheduler=self.run.scheduler, scaler=self.run.scaler)

    def zero_grad(self) -> None:
        self.run.optimizer.zero_grad(set_to_none=True)

    def save(self, reporter: Reporter, **checkpoint: Any) -> None:
        """The epoch checkpoint of the policy as it stands, with its optimizer and schedule:
        ``epoch_checkpoints.write_epoch_checkpoint``, the writer SFT and DPO use (``checkpoint``
        holds its job, folder, epoch, step, losses and metrics)."""
        write_epoch_checkpoint(reporter, model=self.model, tokenizer=self.tokenizer, run=self.run, **checkpoint)
