"""Direct preference optimization: our own torch loop on a LoRA adapter, one checkpoint per epoch.

The same loop shape as SFT (``sft.py``: events, checkpoints, resume, stop), on preference rows.
DPO always trains a LoRA adapter (the recipe's ``adapter``); the reference model is the same
weights with that adapter switched off (``model.disable_adapter()``, no grad), so there is never a
second copy of the model in memory. With the plan's ``adapter`` (an SFT LoRA checkpoint), that adapter
is merged into the base first: the merged model is both the starting policy and the reference,
and the checkpoints hold the two adapters stacked into one for the base (``dpo_checkpoint_layout``).

Each micro-batch puts its B chosen and B rejected sequences through the model as one batch of 2B
rows; the loss and its rewards (TRL's formulas) are ``dpo_loss.py``'s, computed through the trainer
primitives' ``forward_backward("dpo", ...)`` like SFT's cross-entropy and GRPO's loss. The loss of
an optimizer step is the mean over its pairs, so gradient accumulation matches one large batch.

On several ranks (``trainer/distributed.py``) DPO is data parallel like SFT's LoRA jobs: each
optimizer step's micro-batches are shared out over the ranks (``distributed.shard``), the policy's
forward runs through torch's ``DistributedDataParallel`` (``data_parallel``), so the adapter's
gradients are averaged over the ranks, and each rank scales its loss by the world size over the
pairs of the whole global batch: the update one process makes from the same batches. The reference
forward (adapter off, no grad) needs no sync: each rank computes and caches the reference log-probs
of its own pairs. The step's metrics are summed over the ranks; rank 0 evaluates, reports and writes.
"""

from __future__ import annotations

import math
import random
from typing import Any

from posttrain.domain.protocol import Started
from posttrain.domain.recipes import DPOLoss, JobPlan, Recipe, TrainerSpec
from posttrain.trainer import checkpoints, distributed
from posttrain.trainer.adapters import enable_activation_checkpointing, lora_model
from posttrain.trainer.batching import length_grouped_batches, read_rows
from posttrain.trainer.compiling import Compiler
from posttrain.trainer.data_parallel import DataParallel
from posttrain.trainer.dpo_checkpoint_layout import adapter_layout, resume_adapter
from posttrain.trainer.dpo_loss import ChosenNLL, ReferenceLogps, answer_logp_sums_and_hits, pair_batch, pair_losses
from posttrain.trainer.epoch_checkpoints import emit_checkpoint
from posttrain.trainer.epochs import EpochLoop, StepResult
from posttrain.trainer.errors import TrainerConfigError
from posttrain.trainer.formats import normalize_preference_row
from posttrain.trainer.loading import load_model
from posttrain.trainer.optimization import prepare_optimization
from posttrain.trainer.preference_data import encode_preference_rows, pair_length
from posttrain.trainer.primitives import Primitives
from posttrain.trainer.reporting import Reporter, StopFlag
from posttrain.trainer.resume_points import ResumePoints, resume_source
from posttrain.trainer.run_setup import base_resources, batch_resources, set_up_run
from posttrain.trainer.stacked_adapters import LoraWeights, capture


class _Totals:
    """Pair-weighted sums of the step's loss and rewards."""

    def __init__(self) -> None:
        self.pairs = 0
        self.loss = self.chosen = self.rejected = self.correct = 0.0

    def add(self, losses, chosen, rejected) -> None:
        n = int(chosen.numel())
        self.pairs += n
        self.loss += float(losses.detach().mean()) * n
        self.chosen += float(chosen.sum())
        self.rejected += float(rejected.sum())
        self.correct += float((chosen > rejected).float().sum())

    def summed_over_ranks(self) -> None:
        """Every rank's sums added together (a no-op in one process)."""
        summed = distributed.all_reduce_sum([self.pairs, self.loss, self.chosen, self.rejected, self.correct])
        self.pairs = int(summed[0])
        self.loss, self.chosen, self.rejected, self.correct = summed[1:]

    def means(self) -> dict[str, float]:
        n = max(self.pairs, 1)
        return {"loss": self.loss / n, "reward_margin": (self.chosen - self.rejected) / n,
                "reward_accuracy": self.correct / n, "chosen_reward": self.chosen / n,
                "rejected_reward": self.rejected / n}


def _train_step(prims: Primitives, micro_batches, *, config: DPOLoss, stop: StopFlag,
                reference_logps: ReferenceLogps, weights: list[float] | None = None):
    """One optimizer step over this rank's micro-batches; returns the step's mean metrics over the
    whole global batch (every rank's), or None when stopped between micro-batches (one process only:
    ranks stop together at step boundaries). ``weights`` 0 marks a stand-in batch of a rank with no
    share of a short last step: it runs only so the rank joins DDP's gradient sync."""
    weights = weights or [1.0] * len(micro_batches)
    total_pairs = max(1.0, distributed.all_reduce_sum(
        [sum(w * b["pairs"] for w, b in zip(weights, micro_batches, strict=True))])[0])
    totals, chosen_tokens = _Totals(), ChosenNLL()
    one_process = prims.parallel is None or not prims.parallel.world.distributed
    for index, (batch, weight) in enumerate(zip(micro_batches, weights, strict=True)):
        if index and one_process and stop.is_set():
            prims.zero_grad()
            return None
        losses, chosen, rejected = prims.forward_backward(
            "dpo", batch, sync=index == len(micro_batches) - 1, weight=weight, total_pairs=total_pairs, config=config,
            reference_logps=reference_logps, chosen_nll=chosen_tokens if weight else None)
        if weight:
            totals.add(losses, chosen, rejected)
    prims.optim_step()
    totals.summed_over_ranks()
    chosen_tokens.summed_over_ranks()
    return {**totals.means(), "train_mean_token_accuracy": chosen_tokens.accuracy()}


def _evaluate(model, examples, *, config: DPOLoss, recipe: Recipe, pad_id: int, seed: int, precision,
              reference_logps: ReferenceLogps) -> dict[str, float]:
    """Pair-mean DPO loss and rewards over a fixed random sample of validation batches, and the
    policy's per-token NLL and token accuracy of those pairs' chosen answers (``chosen_nll``,
    ``chosen_token_accuracy``)."""
    import torch

    model.eval()
    batches = length_grouped_batches([pair_length(e) for e in examples], batch_size=recipe.data.batch_size,
                                     shuffle=True, rng=random.Random(f"{seed}:validation"))
    batches = batches[: recipe.schedule.max_validation_steps]
    totals, chosen_nll = _Totals(), ChosenNLL()
    with torch.no_grad():
        for indices in batches:
            batch = pair_batch(examples, indices, pad_id=pad_id)
            totals.add(*pair_losses(model, batch, config=config, precision=precision,
                                     reference_logps=reference_logps, chosen_nll=chosen_nll))
    if not totals.pairs:
        return {"loss": math.nan, "chosen_nll": math.nan, "chosen_token_accuracy": math.nan}
    return {**totals.means(), "chosen_nll": chosen_nll.mean(), "chosen_token_accuracy": chosen_nll.accuracy()}


def _load_base(*, plan: JobPlan, precision, trust: bool) -> tuple[Any, LoraWeights | None]:
    """The starting policy (and reference): the model, with the plan's ``adapter`` merged in if set;
    and that adapter's weights (to stack with the DPO adapter in the checkpoints), or None."""
    if not plan.adapter:
        return load_model(path=plan.model, precision=precision, lora=True, trust_remote_code=trust), None
    from peft import PeftModel

    # Merge in fp32, then drop to the compute dtype the frozen base uses.
    base = load_model(path=plan.model, precision=precision, lora=False, trust_remote_code=trust)
    starting = PeftModel.from_pretrained(base, plan.adapter)
    weights = capture(starting)
    return starting.merge_and_unload().to(precision.torch_dtype()), weights


def _disable_dropout(model) -> None:
    """Dropout off in every layer, as TRL's DPOTrainer does by default (``disable_dropout``): the
    policy and the reference (the same weights, adapter off) must see the same network, or their
    log-ratios differ by noise and a fresh adapter does not start at the loss of equal models."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def run_dpo(*, spec: TrainerSpec, reporter: Reporter, stop: StopFlag) -> str:
    """Train as the spec says, reporting events; returns "completed", "cancelled" or "paused".

    Checkpoints carry ``train_loss`` and ``validation_loss`` (the DPO loss) and ``perplexity``, the
    policy's language-model perplexity on the validation pairs' chosen answers (exp of the mean
    per-token NLL of those tokens; exp of a DPO loss would be no perplexity). Their adapter loads on
    the base into the trained model, also after a start from an SFT adapter (``dpo_checkpoint_layout``).

    OpenAI's metrics, for DPO: ``train_mean_token_accuracy`` (each step, and its epoch mean at a
    checkpoint) and ``valid_mean_token_accuracy`` (a checkpoint's validation sample) are the policy's
    token accuracy on the chosen answers, the text the job teaches it to prefer; DPO reports no
    per-step ``valid_loss`` and no ``full_valid_*``.
    """
    recipe, plan = spec.recipe, spec.plan
    if recipe.dpo is None or recipe.adapter is None:
        raise TrainerConfigError("a DPO recipe needs its dpo options and the adapter it trains")
    dpo, adapter = recipe.dpo, recipe.adapter
    # Check every row's layout before the slow imports and model load: a bad row fails in a second.
    train_rows = read_rows(plan.train_rows_path)
    validation_rows = read_rows(plan.validation_rows_path) if plan.validation_rows_path else []
    for rows in (train_rows, validation_rows):
        for index, row in enumerate(rows):
            normalize_preference_row(row, row_index=index)
    if not train_rows:
        raise TrainerConfigError("the training dataset has no rows")

    run_setup = set_up_run(spec)
    trust, seed, job_uuid = run_setup.trust_remote_code, run_setup.seed, run_setup.job_uuid
    output_dir, threads, precision = run_setup.output_dir, run_setup.threads, run_setup.precision
    tokenizer, max_length = run_setup.tokenizer, run_setup.max_length
    train = encode_preference_rows(train_rows, tokenizer=tokenizer, max_length=max_length)
    validation = encode_preference_rows(validation_rows, tokenizer=tokenizer, max_length=max_length) or train

    found = checkpoints.find_checkpoints(output_dir=output_dir)
    if found and (not (found[-1][1] / "adapter_config.json").is_file()
                  or checkpoints.read_trainer_state(folder=found[-1][1]).get("method") != "dpo"):
        raise TrainerConfigError(f"{found[-1][1]} is not a DPO checkpoint; use a new output_dir")
    points = ResumePoints(spec.resume_dir, every_seconds=spec.resume_every_seconds)
    source = resume_source(found=found, points=points)
    resume = source[1] if source else None
    base, starting_adapter = _load_base(plan=plan, precision=precision, trust=trust)
    model = lora_model(base, adapter, resume=resume_adapter(resume) if resume is not None else None)
    _disable_dropout(model)
    if recipe.activation_checkpointing:
        enable_activation_checkpointing(model)

    world = distributed.world()
    parallel = DataParallel(model, precision=precision, compute=answer_logp_sums_and_hits)
    run = prepare_optimization(model, recipe=recipe, micro_batches=math.ceil(len(train) / recipe.data.batch_size),
                               precision=precision, resume_folder=resume, world_size=world.size)

    reporter.emit(Started(
        resources={**base_resources(model, precision=precision, threads=threads), **batch_resources(recipe),
                   "parallelism": parallel.kind, "method": "dpo",
                   "loss_type": dpo.loss_type, "beta": dpo.beta, "merged_adapter": plan.adapter},
        total_steps=run.total_steps,
        resumed_from=f"{job_uuid}-{source[0]}" if source else None,
    ))
    if precision.dtype != precision.requested:
        reporter.log(f"dtype {precision.requested} was requested; computing in {precision.dtype} on {precision.device}",
                     level="warning")
    layout = adapter_layout(spec, model=model, tokenizer=tokenizer, starting=starting_adapter, trust_remote_code=trust)
    if plan.adapter:
        reporter.log(f"merged the adapter {plan.adapter} into the model; it is the starting policy and the "
                     "reference" + ("" if layout.warning else "; the checkpoints hold it and the DPO adapter stacked, "
                                    "one adapter for the base"))
    if layout.warning:
        reporter.log(layout.warning, level="warning")
    for _epoch, folder in found:
        emit_checkpoint(reporter, job_uuid=job_uuid, folder=folder, state=checkpoints.read_trainer_state(folder=folder))

    pad_id = tokenizer.pad_token_id

    # The validation pairs are the training pairs when the job names no validation dataset.
    train_reference = ReferenceLogps()
    validation_reference = train_reference if validation is train else ReferenceLogps()

    epoch_accuracies: list[float] = []  # this epoch's steps run by this process
    prims = Primitives(model=model, tokenizer=tokenizer, run=run, precision=precision, parallel=parallel)

    def step(group: list[list[int]]) -> StepResult | None:
        share = distributed.shard(group)  # every rank's share of the global batch, in one process's order
        micro = [pair_batch(train, indices, pad_id=pad_id) for indices in share or group[:1]]
        weights = None if share else [0.0]
        means = _train_step(prims, micro, config=dpo, stop=stop, reference_logps=train_reference, weights=weights)
        if means is None:
            return None
        loss = means.pop("loss")
        epoch_accuracies.append(means["train_mean_token_accuracy"])
        real, total = distributed.all_reduce_sum([
            sum(b["real_tokens"] for b in micro) if share else 0, sum(b["total_tokens"] for b in micro) if share else 0])
        return StepResult(loss=loss, real_tokens=int(real), total_tokens=int(total), metrics=means)

    def end_epoch(epoch: int, global_step: int, losses: list[float]) -> None:
        if not world.reporting:  # rank 0 evaluates and writes the checkpoint; the others wait at the next step
            epoch_accuracies.clear()
            return
        evaluation = _evaluate(model, validation, config=dpo, recipe=recipe, pad_id=pad_id, seed=seed,
                               precision=precision, reference_logps=validation_reference)
        token_metrics = {"valid_mean_token_accuracy": evaluation["chosen_token_accuracy"]}
        if epoch_accuracies:
            token_metrics["train_mean_token_accuracy"] = sum(epoch_accuracies) / len(epoch_accuracies)
        epoch_accuracies.clear()
        prims.save(
            reporter, job_uuid=job_uuid, output_dir=output_dir, epoch=epoch, global_step=global_step, losses=losses,
            validation_loss=evaluation["loss"], nll_for_perplexity=evaluation["chosen_nll"],
            state={"lora": True, "method": "dpo", "loss_type": dpo.loss_type, "beta": dpo.beta,
                   "merged_adapter": plan.adapter, **layout.state,
                   "validation": {f"validation_{k}": v for k, v in evaluation.items() if k != "loss"}},
            merge_base=layout.merge_base, save_model=layout.save_model, token_metrics=token_metrics,
            keep=spec.keep_checkpoints)

    loop = EpochLoop(model=model, run=run, recipe=recipe, unit_lengths=[pair_length(e) for e in train], seed=seed,
                     precision=precision, compiler=Compiler(spec.compile),
                     points=points if world.reporting else ResumePoints(None, every_seconds=None), reporter=reporter,
                     stop=stop)
    return loop.train(step=step, end_epoch=end_epoch)
