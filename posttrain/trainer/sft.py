"""Supervised fine-tuning: our own torch loop, LoRA or full, one checkpoint per epoch.

A plain loop rather than HF Trainer/TRL: we need to report after every optimizer step, stop
between micro-batches on SIGTERM, and keep length-grouped dynamic padding, without fighting a
framework's callbacks. The loss is the mean token cross-entropy over the label (answer) tokens of
a whole optimizer step, so gradient accumulation gives the same update as one large batch.

With ``data_config.packed`` the rows are packed into sequences of up to the model's max length
(block-diagonal causal attention, positions restarting per row: see ``batching.collate_packed``),
which gives the same loss as the rows unpacked. Speed on a CPU comes from spending nothing on
padding, applying the output head only at label positions, and the fused Adam(W) step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random

from posttrain.domain.protocol import Started
from posttrain.domain.recipes import Recipe, TrainerSpec
from posttrain.trainer import checkpoints, distributed, forward, fully_sharded, qat
from posttrain.trainer.adapters import enable_activation_checkpointing, lora_model
from posttrain.trainer.batching import (
    collate,
    collate_packed,
    encode_rows,
    length_grouped_batches,
    pack_rows,
    read_rows,
)
from posttrain.trainer.compiling import Compiler
from posttrain.trainer.data_parallel import DataParallel
from posttrain.trainer.epoch_checkpoints import emit_checkpoint
from posttrain.trainer.epochs import EpochLoop, StepResult
from posttrain.trainer.errors import TrainerConfigError
from posttrain.trainer.formats import normalize_sft_row
from posttrain.trainer.loading import BASE_QUANTIZATION, load_merge_base, load_model, quantized_layers
from posttrain.trainer.optimization import prepare_optimization
from posttrain.trainer.precision import Precision
from posttrain.trainer.primitives import Primitives
from posttrain.trainer.reporting import Reporter, StopFlag
from posttrain.trainer.resume_points import ResumePoints, resume_source
from posttrain.trainer.run_setup import base_resources, batch_resources, set_up_run

#: About how many steps of a job with a validation dataset also report the loss and token accuracy
#: of one validation batch (OpenAI's per-step ``valid_loss``): every ``total_steps // 20`` steps.
VALIDATION_POINTS = 20


def _loss_sum(model, batch, *, precision: Precision):
    """Summed next-token cross-entropy over the label tokens of one (padded or packed) batch
    (the output head runs at those positions only: see ``forward.label_logits``)."""
    return _loss_sum_and_hits(model, batch, precision=precision)[0]


def _loss_sum_and_hits(model, batch, *, precision: Precision):
    """``_loss_sum``, and how many of the label tokens are the model's most likely next token
    (the argmax of the logits that predict them, shifted like the loss)."""
    import torch.nn.functional as F

    logits, targets, _ = forward.label_logits(model, batch, precision=precision)
    correct = int((logits.detach().argmax(dim=-1) == targets).sum())
    return F.cross_entropy(logits, targets, reduction="sum"), correct


def _train_step(prims: Primitives, micro_batches, *, stop: StopFlag, weights: list[float] | None = None):
    """One optimizer step over this rank's micro-batches: ``(loss, token accuracy, token counts)``
    over the label tokens of the whole global batch (every rank's); None when stopped between
    micro-batches (one process only: ranks stop together at step boundaries). ``weights`` 0 marks a
    stand-in batch of a rank with no share of a short last step: it runs only so the rank joins
    DDP's gradient sync, and counts for nothing."""
    weights = weights or [1.0] * len(micro_batches)
    counts = distributed.all_reduce_sum([sum(w * b[key] for w, b in zip(weights, micro_batches, strict=True))
                                         for key in ("label_tokens", "real_tokens", "total_tokens")])
    label_tokens = max(1.0, counts[0])
    total, correct = 0.0, 0.0
    one_process = prims.parallel is None or not prims.parallel.world.distributed
    for index, (batch, weight) in enumerate(zip(micro_batches, weights, strict=True)):
        if index and one_process and stop.is_set():
            prims.zero_grad()
            return None
        loss_sum, hits = prims.forward_backward("cross_entropy", batch, sync=index == len(micro_batches) - 1,
                                                weight=weight, label_tokens=label_tokens)
        total += weight * loss_sum
        correct += weight * hits
    prims.optim_step()
    total, correct = distributed.all_reduce_sum([total, correct])
    return total / label_tokens, correct / label_tokens, counts


def _validation_batches(examples, *, recipe: Recipe, seed: int) -> list[list[int]]:
    """Every validation batch in a fixed random order (the same every epoch); the epoch's
    ``validation_loss`` is on the first ``max_validation_steps`` of them."""
    return length_grouped_batches([len(e["input_ids"]) for e in examples], batch_size=recipe.data.batch_size,
                                  shuffle=True, rng=random.Random(f"{seed}:validation"))


def _evaluate(model, examples, batches: list[list[int]], *, pad_id: int, precision,
              label_logits=None) -> tuple[float, float]:
    """Token-mean loss and token accuracy over these batches of ``examples`` (through
    ``label_logits``, a ``DataParallel.eval_logits``, when given: a sharded model's forward)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, correct, tokens = 0.0, 0, 0
    with torch.no_grad():
        for indices in batches:
            batch = collate([examples[i] for i in indices], pad_id=pad_id)
            if label_logits is None:
                loss_sum, hits = _loss_sum_and_hits(model, batch, precision=precision)
            else:
                logits, targets, _ = label_logits(batch)
                loss_sum, hits = F.cross_entropy(logits, targets, reduction="sum"), int(
                    (logits.argmax(dim=-1) == targets).sum())
            total += float(loss_sum)
            correct += hits
            tokens += batch["label_tokens"]
    return (total / tokens, correct / tokens) if tokens else (math.nan, math.nan)


def run_sft(*, spec: TrainerSpec, reporter: Reporter, stop: StopFlag) -> str:
    """Train as the spec's recipe says, reporting events; returns "completed", "cancelled" or "paused"."""
    recipe, plan = spec.recipe, spec.plan
    data = recipe.data
    # Check every row's layout before the slow imports and model load: a bad row fails in a second.
    train_rows = read_rows(plan.train_rows_path)
    validation_rows = read_rows(plan.validation_rows_path) if plan.validation_rows_path else []
    for rows in (train_rows, validation_rows):
        for index, row in enumerate(rows):
            normalize_sft_row(row, data_format=data.data_format, row_index=index)
    if not train_rows:
        raise TrainerConfigError("the training dataset has no rows")

    adapter, quantization = recipe.adapter, recipe.qat
    lora = adapter is not None
    run_setup = set_up_run(spec)
    trust, seed, job_uuid = run_setup.trust_remote_code, run_setup.seed, run_setup.job_uuid
    output_dir, threads, precision = run_setup.output_dir, run_setup.threads, run_setup.precision
    tokenizer, max_length = run_setup.tokenizer, run_setup.max_length
    encode = dict(tokenizer=tokenizer, data_format=data.data_format, train_on_input=data.train_on_input,
                  max_length=max_length)
    train = encode_rows(train_rows, **encode)
    validation = encode_rows(validation_rows, **encode) or train
    validation_batches = _validation_batches(validation, recipe=recipe, seed=seed)
    sampled = validation_batches[: recipe.schedule.max_validation_steps]

    found = checkpoints.find_checkpoints(output_dir=output_dir)
    points = ResumePoints(spec.resume_dir, every_seconds=spec.resume_every_seconds)
    source = resume_source(found=found, points=points)
    resume = source[1] if source else None
    if resume and lora != (resume / "adapter_config.json").is_file():
        raise TrainerConfigError(f"{resume} is not a {'LoRA' if lora else 'full'} checkpoint; use a new output_dir")
    quantize_base = adapter is not None and adapter.quantize_base
    if adapter is not None:
        base = load_model(path=plan.model, precision=precision, lora=True, trust_remote_code=trust,
                          quantize_base=quantize_base)
        model = lora_model(base, adapter, resume=resume)
    else:
        model = load_model(path=str(resume) if resume else plan.model, precision=precision,
                           lora=False, trust_remote_code=trust)
    fake_quantized = qat.prepare(model, quantization) if quantization is not None else 0
    if recipe.activation_checkpointing:
        enable_activation_checkpointing(model)
    world = distributed.world()
    parallel = DataParallel(model, precision=precision, sharded=not lora)
    if parallel.sharded and quantization is not None:
        raise TrainerConfigError("quantization-aware training runs on one device or with LoRA on several")

    lengths = [len(e["input_ids"]) for e in train]
    # Packed: rows are packed once (deterministic), and the packs are batched and shuffled like rows.
    packs = pack_rows(lengths, max_length=max_length, keep_order=not data.shuffle) if data.packed else None
    micro_batches = math.ceil((len(packs) if packs is not None else len(train)) / data.batch_size)
    run = prepare_optimization(model, recipe=recipe, micro_batches=micro_batches, precision=precision,
                               resume_folder=resume, world_size=world.size,
                               load_optimizer=_sharded_optimizer_loader(model, reporter) if parallel.sharded else None)

    reporter.emit(Started(
        resources={**base_resources(model, precision=precision, threads=threads), **batch_resources(recipe),
                   "parallelism": parallel.kind,
                   **({"qat": {"type": "QAT", **quantization.model_dump(), "fake_quantized_layers": fake_quantized}}
                      if quantization is not None else {}),
                   **({"base_quantization": {"scheme": BASE_QUANTIZATION,
                                             "layers": quantized_layers(model)}} if quantize_base else {})},
        total_steps=run.total_steps,
        resumed_from=f"{job_uuid}-{source[0]}" if source else None,
    ))
    if precision.dtype != precision.requested:
        reporter.log(f"dtype {precision.requested} was requested; computing in {precision.dtype} on {precision.device}",
                     level="warning")
    if packs is not None:
        reporter.log(f"packed=true: {len(train)} rows in {len(packs)} sequences of up to {max_length} tokens")
    if quantization is not None:
        reporter.log(f"quantization-aware training: {fake_quantized} linear layers fake-quantized (int8 dynamic "
                     f"activations, int4 weights in groups of {quantization.group_size}); checkpoints hold the "
                     "trained full-precision weights; quantize one for serving with torchao: "
                     "posttrain.trainer.qat.convert(model, algorithm_config), i.e. quantize_(model, "
                     "Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup("
                     f"{quantization.group_size})))")
    if quantize_base:
        reporter.log(f"quantize_base: the base model's linear layers are {BASE_QUANTIZATION}; the LoRA "
                     "adapters train in full precision; compiling is off for this job")
    for _epoch, folder in found:
        emit_checkpoint(reporter, job_uuid=job_uuid, folder=folder, state=checkpoints.read_trainer_state(folder=folder))

    def make_batch(indices: list[int]):
        if packs is None:
            return collate([train[i] for i in indices], pad_id=tokenizer.pad_token_id)
        return collate_packed([[train[i] for i in packs[p]] for p in indices], pad_id=tokenizer.pad_token_id)

    unit_lengths = [sum(lengths[i] for i in pack) for pack in packs] if packs is not None else lengths
    merge_base = functools.partial(load_merge_base, path=plan.model, trust_remote_code=trust)

    # OpenAI's metrics: the token accuracy of every step; with a validation dataset, one validation
    # batch's loss and accuracy every ``valid_every`` steps (cycling through them) and, at each
    # checkpoint, those of the whole validation set (``full_valid_*``).
    valid_every = max(1, run.total_steps // VALIDATION_POINTS)
    prims = Primitives(model=model, tokenizer=tokenizer, run=run, precision=precision, parallel=parallel)
    steps_done = [run.global_step]
    epoch_accuracies: list[float] = []  # this epoch's steps run by this process

    def step(group: list[list[int]]) -> StepResult | None:
        share = distributed.shard(group)  # every rank's share of the global batch, in one process's order
        micro = [make_batch(indices) for indices in share or group[:1]]
        result = _train_step(prims, micro, stop=stop, weights=None if share else [0.0])
        if result is None:
            return None
        loss, accuracy, counts = result
        steps_done[0] += 1
        epoch_accuracies.append(accuracy)
        metrics = {"train_mean_token_accuracy": accuracy}
        if (world.reporting or parallel.sharded) and validation_rows and steps_done[0] % valid_every == 0:
            probe = validation_batches[(steps_done[0] // valid_every - 1) % len(validation_batches)]
            valid_loss, valid_accuracy = _evaluate(model, validation, [probe], pad_id=tokenizer.pad_token_id,
                                                   precision=precision, label_logits=parallel.eval_logits)
            metrics |= {"valid_loss": valid_loss, "valid_mean_token_accuracy": valid_accuracy}
        return StepResult(loss=loss, real_tokens=int(counts[1]), total_tokens=int(counts[2]), metrics=metrics)

    def end_epoch(epoch: int, global_step: int, losses: list[float]) -> None:
        # Rank 0 evaluates and writes the checkpoint; the others wait at the next step. Sharded
        # (FSDP2), every forward and the gathering of the weights are collectives: all ranks
        # evaluate and gather, rank 0 alone writes.
        if not world.reporting and not parallel.sharded:
            epoch_accuracies.clear()
            return
        evaluate = functools.partial(_evaluate, model, validation, pad_id=tokenizer.pad_token_id, precision=precision,
                                     label_logits=parallel.eval_logits)
        validation_loss, valid_accuracy = evaluate(sampled)
        token_metrics = {"valid_mean_token_accuracy": valid_accuracy}
        if epoch_accuracies:
            token_metrics["train_mean_token_accuracy"] = sum(epoch_accuracies) / len(epoch_accuracies)
        if validation_rows:
            full = (validation_loss, valid_accuracy) if len(sampled) == len(validation_batches) else evaluate(
                validation_batches)
            token_metrics |= {"full_valid_loss": full[0], "full_valid_mean_token_accuracy": full[1]}
        epoch_accuracies.clear()
        written, save_model = run, None
        if parallel.sharded:
            weights = fully_sharded.full_model_state(model)
            written = dataclasses.replace(run, optimizer=fully_sharded.GatheredOptimizer(
                fully_sharded.full_optimizer_state(model, run.optimizer)))
            if not world.reporting:
                return

            def save_model(staging, _final):
                model.save_pretrained(staging, state_dict=weights)
        prims.save(reporter, run=written, job_uuid=job_uuid, output_dir=output_dir, epoch=epoch, global_step=global_step,
                   losses=losses, validation_loss=validation_loss, state={"lora": lora},
                   merge_base=merge_base if spec.save_merged and lora else None, token_metrics=token_metrics,
                   keep=spec.keep_checkpoints, save_model=save_model)

    # Not compiled over bitsandbytes' 4-bit layers: never tried here, and a failed compile would cost
    # minutes of a job for nothing.
    loop = EpochLoop(model=model, run=run, recipe=recipe, unit_lengths=unit_lengths, seed=seed, precision=precision,
                     compiler=Compiler("off" if quantize_base or parallel.sharded else spec.compile),
                     # Sharded (FSDP2): no mid-epoch resume points (writing one would be a collective
                     # at a moment only rank 0 knows); a lost or paused job resumes from its newest epoch.
                     points=points if world.reporting and not parallel.sharded else ResumePoints(None, every_seconds=None),
                     reporter=reporter, stop=stop)
    return loop.train(step=step, end_epoch=end_epoch)


def _sharded_optimizer_loader(model, reporter: Reporter):
    """``prepare_optimization``'s ``load_optimizer`` for FSDP2: a saved full state into this rank's
    shards; a one-process checkpoint's state (keyed by index) is skipped with a warning."""

    def load(optimizer, state) -> bool:
        loaded = fully_sharded.load_optimizer_state(model, optimizer, state)
        if not loaded:
            reporter.log("the checkpoint's optimizer state is a one-process job's: the optimizer's moments "
                         "start afresh on the sharded job", level="warning")
        return loaded

    return load
