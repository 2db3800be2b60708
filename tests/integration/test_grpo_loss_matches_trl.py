"""Our GRPO loss (posttrain/trainer/grpo_loss.py) equals TRL 1.16's ``GRPOTrainer._compute_loss``
on one fixed batch: a real ``GRPOTrainer`` built on the tiny model, fed the inputs dict its
``_compute_loss`` reads (prompt/completion ids and masks, advantages, old and reference log-probs),
against our loss on the same model and tensors, for every loss type, token and sequence importance
sampling, beta 0 and beta > 0: the loss, its gradient, and the kl / entropy / clip-ratio metrics."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from posttrain.trainer.grpo_loss import (  # noqa: E402
    GrpoLossConfig,
    completion_logps_and_entropy,
    group_advantages,
    grpo_loss,
)

NUM_GENERATIONS = 4
MAX_COMPLETION = 6
TEMPERATURE = 0.7


def _reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _batch(vocab: int, pad_id: int):
    """Two prompts x four completions, left-padded prompts, completions of unequal lengths."""
    generator = torch.Generator().manual_seed(0)
    rows = 2 * NUM_GENERATIONS
    prompt_ids = torch.randint(5, vocab, (rows, 5), generator=generator)
    prompt_mask = torch.ones(rows, 5, dtype=torch.long)
    prompt_mask[NUM_GENERATIONS:, :2] = 0  # the second prompt is shorter: left padding
    prompt_ids[prompt_mask == 0] = pad_id
    completion_ids = torch.randint(5, vocab, (rows, MAX_COMPLETION), generator=generator)
    lengths = torch.tensor([6, 3, 5, 1, 4, 6, 2, 5])
    completion_mask = (torch.arange(MAX_COMPLETION).unsqueeze(0) < lengths.unsqueeze(1)).long()
    completion_ids[completion_mask == 0] = pad_id
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 2.0, 1.0, 0.0])
    return prompt_ids, prompt_mask, completion_ids, completion_mask, rewards


@pytest.fixture(scope="module")
def grpo_setup(tiny_model_path, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    return model, tokenizer, Dataset.from_dict({"prompt": ["pick a colour"] * 8}), tmp_path_factory


def _trl_trainer(setup, *, loss_type: str, beta: float, level: str, bias_correction: bool = True):
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer, dataset, tmp = setup
    args = GRPOConfig(output_dir=str(tmp.mktemp("trl-grpo")), per_device_train_batch_size=2 * NUM_GENERATIONS,
                      num_generations=NUM_GENERATIONS, max_completion_length=MAX_COMPLETION, beta=beta,
                      loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, temperature=TEMPERATURE,
                      importance_sampling_level=level, use_bias_correction_kl=bias_correction,
                      report_to="none", use_cpu=True, bf16=False, fp16=False,
                      logging_steps=1, save_strategy="no", disable_dropout=True)
    trainer = GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


CASES = [(loss_type, beta, "token", True) for loss_type in ("grpo", "dr_grpo", "dapo", "bnpo") for beta in (0.0, 0.04)]
CASES += [("grpo", 0.04, "sequence", True), ("grpo", 0.04, "token", False), ("dapo", 0.1, "token", False)]


@pytest.mark.parametrize(("loss_type", "beta", "level", "bias_correction"), CASES)
def test_loss_gradient_and_metrics_match_trl(grpo_setup, loss_type, beta, level, bias_correction):
    trainer = _trl_trainer(grpo_setup, loss_type=loss_type, beta=beta, level=level, bias_correction=bias_correction)
    model = trainer.model
    model.train()
    prompt_ids, prompt_mask, completion_ids, completion_mask, rewards = _batch(
        model.config.vocab_size, trainer.processing_class.pad_token_id)
    advantages, _ = group_advantages(rewards, num_generations=NUM_GENERATIONS, scale_rewards="group")
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    with torch.no_grad():
        current, _ = completion_logps_and_entropy(model, input_ids, attention_mask, completion_mask,
                                                  temperature=TEMPERATURE)
    noise = torch.Generator().manual_seed(1)
    # Old and reference log-probs off the current ones by enough that some ratios leave the clip range.
    old = (current + 0.3 * torch.randn(current.shape, generator=noise)) * completion_mask
    ref = (current + 0.2 * torch.randn(current.shape, generator=noise)) * completion_mask
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
              "num_items_in_batch": completion_mask.sum()}
    if beta:
        inputs["ref_per_token_logps"] = ref
    params = [p for p in model.parameters() if p.requires_grad]

    trainer._metrics["train"].clear()
    theirs = trainer._compute_loss(model, inputs)
    their_grads = torch.autograd.grad(theirs, params)
    their_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    config = GrpoLossConfig(beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                            importance_sampling_level=level, max_completion_length=MAX_COMPLETION,
                            use_bias_correction_kl=bias_correction)
    logps, entropies = completion_logps_and_entropy(model, input_ids, attention_mask, completion_mask,
                                                    temperature=TEMPERATURE)
    ours, metrics = grpo_loss(logps, completion_mask, advantages, config=config, old_per_token_logps=old,
                              ref_per_token_logps=ref if beta else None, entropies=entropies,
                              num_items_in_batch=completion_mask.sum())
    our_grads = torch.autograd.grad(ours, params)

    assert abs(float(theirs.detach())) > 1e-4  # a batch whose loss is not trivially zero
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for mine, trl_grad in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(mine, trl_grad, rtol=1e-4, atol=1e-6)
    assert metrics["entropy"] == pytest.approx(their_metrics["entropy"], rel=1e-5)
    assert metrics["clip_ratio_low"] == pytest.approx(their_metrics["clip_ratio/low_mean"], abs=1e-7)
    assert metrics["clip_ratio_high"] == pytest.approx(their_metrics["clip_ratio/high_mean"], abs=1e-7)
    assert metrics["clip_ratio_region"] == pytest.approx(their_metrics["clip_ratio/region_mean"], abs=1e-7)
    assert metrics["clip_ratio_region"] > 0  # the clipped branch is exercised
    if beta:
        assert metrics["kl"] == pytest.approx(their_metrics["kl"], rel=1e-5)
    else:
        assert "kl" not in metrics and "kl" not in their_metrics


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_match_trl_formula(scale_rewards):
    """TRL's advantage computation, written out with its own ``nanstd``, on rewards with a NaN
    (unscorable) entry and a zero-std group."""
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.5, float("nan"), 2.0, 2.0, 2.0, 2.0])
    ours, zero_std = group_advantages(rewards, num_generations=4, scale_rewards=scale_rewards)
    means = torch.nanmean(rewards.view(-1, 4), dim=1).repeat_interleave(4)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(rewards.view(-1, 4), dim=1).repeat_interleave(4)
    expected = rewards - means
    if scale_rewards != "none":
        expected = expected / (std + 1e-4)
    torch.testing.assert_close(ours, torch.nan_to_num(expected, nan=0.0))
    assert zero_std.tolist() == torch.isclose(std, torch.zeros_like(std)).tolist()
    assert ours[3] == 0.0
