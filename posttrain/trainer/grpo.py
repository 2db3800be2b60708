"""Group relative policy optimization: the reinforcement job loop, LoRA or full, one checkpoint per epoch.

Each optimizer step takes ``gradient_accumulation_steps`` micro-batches of ``batch_size`` prompts
(the training lines' ``messages``, rendered with the generation prompt) and, through the
``primitives``: samples ``num_generations`` completions of each prompt; scores them with the
recipe's grader against the line's own fields (``rewards.py``); turns the rewards into
group-relative advantages; runs the loss of ``grpo_loss.py`` (TRL's formulas) forward and backward
on each micro-batch; and steps the optimizer once. The batch is on-policy (one optimization pass
per generation, TRL's ``num_iterations=1``), so the ratio is 1 with the policy's gradient.

With ``beta > 0`` (LoRA only, the recipe says why) the reference log-probs are the base's, the
adapter switched off. Everything about *when* (epochs, resume, resume points, pause, cancel, the
per-step ``metric`` event) is the ``EpochLoop`` SFT and DPO share; the checkpoint is the same
``epoch_<E>`` folder theirs is. Every ``eval_interval`` steps the mean reward of ``eval_samples``
completions of each validation prompt is reported (``valid_reward_mean``).

Per-step metrics (``extra`` of the ``metric`` event): ``reward_mean``, ``reward_std``,
``reward/<grader>`` for each named (sub-)grader, ``kl`` (beta > 0), ``clip_ratio_low/high/region``,
``entropy``, ``completion_length`` (mean tokens a completion), ``frac_reward_zero_std``; and where
the step's time went, in seconds: ``sample_seconds`` (generation), ``score_seconds`` (the grader),
``reference_seconds`` (the reference log-probs, beta > 0), ``forward_backward_seconds`` and
``optim_seconds`` (bench/grpo.py reads them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

from posttrain.domain.protocol import Started
from posttrain.domain.recipes import GRPO, TrainerSpec
from posttrain.domain.rows import normalize_prompt_row
from posttrain.trainer import checkpoints
from posttrain.trainer.adapters import enable_activation_checkpointing, lora_model
from posttrain.trainer.batching import read_rows
from posttrain.trainer.compiling import Compiler
from posttrain.trainer.epoch_checkpoints import emit_checkpoint
from posttrain.trainer.epochs import EpochLoop, StepResult
from posttrain.trainer.errors import TrainerConfigError
from posttrain.trainer.grpo_loss import GrpoLossConfig, group_advantages
from posttrain.trainer.loading import load_model
from posttrain.trainer.optimization import prepare_optimization
from posttrain.trainer.primitives import Primitives
from posttrain.trainer.reporting import Reporter, StopFlag
from posttrain.trainer.resume_points import ResumePoints, resume_source
from posttrain.trainer.rewards import Scorer, failure_note, scorer_for
from posttrain.trainer.run_setup import base_resources, set_up_run


def render_prompt(tokenizer, chat: list[dict[str, str]]) -> str:
    """The chat as text, ending where the assistant's answer begins (the chat template's
    generation prompt; 'role: content' lines for a tokenizer without one, as SFT renders them)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    text = tokenizer.bos_token or ""
    return text + "".join(f"{m['role']}: {m['content']}\n" for m in chat) + "assistant: "


def loss_config(grpo: GRPO) -> GrpoLossConfig:
    return GrpoLossConfig(beta=grpo.beta, epsilon_low=grpo.epsilon, epsilon_high=grpo.upper_epsilon,
                          loss_type=grpo.loss_type, importance_sampling_level=grpo.importance_sampling_level,
                          max_completion_length=grpo.max_completion_length)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return math.nan
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


class _StepMetrics:
    """Token-weighted means of the loss metrics over a step's micro-batches, and its rewards."""

    def __init__(self) -> None:
        self.rewards: list[float] = []
        self.per_grader: dict[str, list[float]] = {}
        self.lengths: list[int] = []
        self.zero_std: list[float] = []
        self.weighted: dict[str, float] = {}
        self.tokens = 0

    def add_scores(self, rewards: list[float], per_grader: dict[str, list[float]], lengths: list[int]) -> None:
        self.rewards += rewards
        self.lengths += lengths
        for name, values in per_grader.items():
            self.per_grader.setdefault(name, []).extend(values)

    def add_loss(self, metrics: dict[str, float], tokens: int) -> None:
        self.tokens += tokens
        for name, value in metrics.items():
            self.weighted[name] = self.weighted.get(name, 0.0) + value * tokens

    def means(self) -> dict[str, float]:
        out = {"reward_mean": _mean(self.rewards), "reward_std": _std(self.rewards),
               "completion_length": _mean([float(n) for n in self.lengths]),
               "frac_reward_zero_std": _mean(self.zero_std)}
        out |= {f"reward/{name}": _mean(values) for name, values in self.per_grader.items()}
        out |= {name: total / max(self.tokens, 1) for name, total in self.weighted.items() if name != "policy_loss"}
        return out


class _PhaseTimer:
    """Wall-clock seconds per phase of one step (``<phase>_seconds``), summed over its micro-batches."""

    PHASES = ("sample", "score", "reference", "forward_backward", "optim")

    def __init__(self) -> None:
        self.seconds = {f"{phase}_seconds": 0.0 for phase in self.PHASES}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"{phase}_seconds"] += time.perf_counter() - started


def run_grpo(*, spec: TrainerSpec, reporter: Reporter, stop: StopFlag) -> str:
    """Train as the spec says, reporting events; returns "completed", "cancelled" or "paused"."""
    recipe, plan = spec.recipe, spec.plan
    if recipe.grpo is None:
        raise TrainerConfigError("a GRPO recipe needs its grpo options")
    grpo = recipe.grpo
    train_rows = read_rows(plan.train_rows_path)
    validation_rows = read_rows(plan.validation_rows_path) if plan.validation_rows_path else []
    train_chats = [normalize_prompt_row(row, row_index=i) for i, row in enumerate(train_rows)]
    validation_chats = [normalize_prompt_row(row, row_index=i) for i, row in enumerate(validation_rows)]
    if not train_rows:
        raise TrainerConfigError("the training dataset has no rows")
    scorer: Scorer = scorer_for(grpo.grader, hidden_paths=spec.grader_hidden_paths, judges=plan.judges)

    adapter = recipe.adapter
    run_setup = set_up_run(spec)
    trust, seed, job_uuid = run_setup.trust_remote_code, run_setup.seed, run_setup.job_uuid
    output_dir, threads, precision, tokenizer = run_setup.output_dir, run_setup.threads, run_setup.precision, \
        run_setup.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_prompts = [render_prompt(tokenizer, chat) for chat in train_chats]
    if validation_rows:
        validation_prompts, validation_items = [render_prompt(tokenizer, c) for c in validation_chats], validation_rows
    else:
        validation_prompts, validation_items = train_prompts, train_rows
    limit = recipe.schedule.max_validation_steps * recipe.data.batch_size
    validation_prompts, validation_items = validation_prompts[:limit], validation_items[:limit]

    found = checkpoints.find_checkpoints(output_dir=output_dir)
    if found and checkpoints.read_trainer_state(folder=found[-1][1]).get("method") != "grpo":
        raise TrainerConfigError(f"{found[-1][1]} is not a GRPO checkpoint; use a new output_dir")
    points = ResumePoints(spec.resume_dir, every_seconds=spec.resume_every_seconds)
    source = resume_source(found=found, points=points)
    resume = source[1] if source else None
    lora = adapter is not None
    if resume and lora != (resume / "adapter_config.json").is_file():
        raise TrainerConfigError(f"{resume} is not a {'LoRA' if lora else 'full'} checkpoint; use a new output_dir")
    if adapter is not None:
        base = load_model(path=plan.model, precision=precision, lora=True, trust_remote_code=trust)
        model = lora_model(base, adapter, resume=resume)
    else:
        model = load_model(path=str(resume) if resume else plan.model, precision=precision, lora=False,
                           trust_remote_code=trust)
    if recipe.activation_checkpointing:
        enable_activation_checkpointing(model)
    run = prepare_optimization(model, recipe=recipe, micro_batches=math.ceil(len(train_rows) / recipe.data.batch_size),
                               precision=precision, resume_folder=resume)
    reporter.emit(Started(
        resources={**base_resources(model, precision=precision, threads=threads), "method": "grpo",
                   "loss_type": grpo.loss_type, "beta": grpo.beta, "num_generations": grpo.num_generations},
        total_steps=run.total_steps, resumed_from=f"{job_uuid}-{source[0]}" if source else None))
    if precision.dtype != precision.requested:
        reporter.log(f"dtype {precision.requested} was requested; computing in {precision.dtype} on {precision.device}",
                     level="warning")
    for _epoch, folder in found:
        emit_checkpoint(reporter, job_uuid=job_uuid, folder=folder, state=checkpoints.read_trainer_state(folder=folder))

    prims = Primitives(model=model, tokenizer=tokenizer, run=run, precision=precision, temperature=grpo.temperature)
    config = loss_config(grpo)
    steps_done = [run.global_step]
    epoch_rewards: list[float] = []

    def validate(*, with_nll: bool = False) -> tuple[float, float]:
        """The mean reward of ``eval_samples`` completions of each validation prompt, and (with
        ``with_nll``) the policy's mean negative log-likelihood per token of those completions."""
        rewards: list[float] = []
        nll, tokens = 0.0, 0
        size = recipe.data.batch_size
        for start in range(0, len(validation_prompts), size):
            samples = prims.sample(validation_prompts[start : start + size], num_generations=grpo.eval_samples,
                                   top_p=grpo.top_p, max_new_tokens=grpo.max_completion_length)
            items = [item for item in validation_items[start : start + size] for _ in range(grpo.eval_samples)]
            rewards += scorer(samples.texts, items).rewards
            if with_nll:
                batch_nll, batch_tokens = prims.policy_nll(samples)
                nll, tokens = nll + batch_nll, tokens + batch_tokens
        return _mean(rewards), nll / tokens if tokens else math.nan

    def validation_reward() -> float:
        return validate()[0]

    def step(group: list[list[int]]) -> StepResult | None:
        import torch

        totals = _StepMetrics()
        timer = _PhaseTimer()
        sampled = []
        for indices in group:  # one generation batch for the whole optimizer step, as TRL's
            if stop.is_set():
                return None
            with timer("sample"):
                samples = prims.sample([train_prompts[i] for i in indices], num_generations=grpo.num_generations,
                                       top_p=grpo.top_p, max_new_tokens=grpo.max_completion_length)
            items = [train_rows[i] for i in indices for _ in range(grpo.num_generations)]
            with timer("score"):
                scores = scorer(samples.texts, items)
            if (note := failure_note(scores.errors)) is not None:
                reporter.log(note, level="warning")
            rewards = torch.tensor(scores.rewards, dtype=torch.float32)
            advantages, zero_std = group_advantages(rewards, num_generations=grpo.num_generations,
                                                    scale_rewards=grpo.scale_rewards)
            totals.add_scores(scores.rewards, scores.per_grader, samples.completion_mask.sum(dim=1).tolist())
            totals.zero_std += zero_std.float().tolist()
            with timer("reference"):
                ref = prims.reference_logps(samples) if grpo.beta > 0 else None
            sampled.append((samples, advantages, ref))
        step_tokens = sum(s.completion_tokens for s, _, _ in sampled)
        loss_total = 0.0
        for index, (samples, advantages, ref) in enumerate(sampled):
            if index and stop.is_set():
                prims.zero_grad()
                return None
            with timer("forward_backward"):
                value, metrics = prims.forward_backward("grpo", samples, advantages=advantages, config=config,
                                                        ref_logps=ref, num_items_in_batch=step_tokens,
                                                        accumulation_steps=len(sampled))
            loss_total += value
            totals.add_loss(metrics, samples.completion_tokens)
        with timer("optim"):
            prims.optim_step()
        steps_done[0] += 1
        metrics = totals.means() | timer.seconds
        epoch_rewards.append(metrics["reward_mean"])
        if steps_done[0] % grpo.eval_interval == 0:
            metrics["valid_reward_mean"] = validation_reward()
        real = sum(int(s.attention_mask().sum()) for s, _, _ in sampled)
        total = sum(s.attention_mask().numel() for s, _, _ in sampled)
        return StepResult(loss=loss_total, real_tokens=real, total_tokens=total, metrics=metrics)

    def end_epoch(epoch: int, global_step: int, losses: list[float]) -> None:
        reward, nll = validate(with_nll=True)
        state = {"lora": lora, "method": "grpo", "loss_type": grpo.loss_type, "beta": grpo.beta,
                 "validation": {"validation_reward_mean": reward, "validation_completion_nll": nll},
                 "train_reward_mean": _mean(epoch_rewards)}
        epoch_rewards.clear()
        prims.save(reporter, job_uuid=job_uuid, output_dir=output_dir, epoch=epoch, global_step=global_step,
                   losses=losses, validation_loss=-reward, nll_for_perplexity=nll, state=state, merge_base=None,
                   keep=spec.keep_checkpoints)
        reporter.log(f"epoch {epoch}: mean validation reward {reward:.4f}")

    loop = EpochLoop(model=model, run=run, recipe=recipe, unit_lengths=[len(p) for p in train_prompts], seed=seed,
                     precision=precision, compiler=Compiler("off"), points=points, reporter=reporter, stop=stop)
    return loop.train(step=step, end_epoch=end_epoch)
