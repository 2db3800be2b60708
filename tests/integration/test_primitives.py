"""The trainer primitives SFT, DPO and GRPO step through (``posttrain.trainer.primitives``), called
as a user's own training loop would call them: ``forward_backward("cross_entropy")`` then
``optim_step`` makes the update a plain torch step of the same loss makes; two micro-batches
accumulated make the update of one batch holding both; an unknown loss is refused by name before
any gradient is touched."""

from __future__ import annotations

import pytest

from posttrain.demo import colour_rows
from posttrain.domain.recipes import Optimizer
from posttrain.trainer import loading, optimization
from posttrain.trainer.batching import collate, encode_rows
from posttrain.trainer.precision import Precision
from posttrain.trainer.primitives import LOSSES, Primitives

PRECISION = Precision(device="cpu", dtype="fp32", requested="fp32")
LR = 0.5


def _primitives(path) -> Primitives:
    import torch

    torch.manual_seed(0)
    model = loading.load_model(path=str(path), precision=PRECISION, lora=False, trust_remote_code=False)
    optimizer = optimization.build_optimizer(model, Optimizer(optimizer_type="sgd", lr=LR, weight_decay=0.0))
    scheduler = optimization.build_scheduler(optimizer, warmup_steps=0, total_steps=10)
    run = optimization.Optimization(optimizer=optimizer, scheduler=scheduler, scaler=None, total_steps=10,
                                    steps_per_epoch=10)
    tokenizer = loading.load_tokenizer(path=str(path), trust_remote_code=False)
    return Primitives(model=model, tokenizer=tokenizer, run=run, precision=PRECISION)


def _examples(prims: Primitives) -> list[dict]:
    return encode_rows(colour_rows(repeat=1)[:4], tokenizer=prims.tokenizer, data_format="instruct",
                       train_on_input=False, max_length=256)


def _weights(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _plain_torch_step(prims: Primitives, batch) -> None:
    """The same step written out: the mean next-token cross-entropy of the label tokens, the
    gradient clipped as every step of ours is, one SGD step at the schedule's first learning rate."""
    import torch
    import torch.nn.functional as F

    model = prims.model
    model.train()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum") / batch["label_tokens"]
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(trainable, optimization.MAX_GRAD_NORM)
    with torch.no_grad():
        for p in trainable:
            p -= LR * p.grad
            p.grad = None


def _assert_same_weights(a: dict, b: dict, *, moved_from: dict) -> None:
    import torch

    moved = max(float((a[name] - moved_from[name]).abs().max()) for name in a)
    assert moved > 1e-3  # the step changed the weights: the comparison is of two real updates
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_forward_backward_and_optim_step_make_the_update_of_a_plain_torch_step(tiny_model_path):
    ours, plain = _primitives(tiny_model_path), _primitives(tiny_model_path)
    before = _weights(ours.model)
    batch = collate(_examples(ours), pad_id=ours.tokenizer.pad_token_id)

    loss_sum, hits = ours.forward_backward("cross_entropy", batch, weight=1.0, label_tokens=batch["label_tokens"])
    ours.optim_step()
    _plain_torch_step(plain, batch)

    assert loss_sum > 0 and 0 <= hits <= batch["label_tokens"]
    _assert_same_weights(_weights(ours.model), _weights(plain.model), moved_from=before)


def test_two_accumulated_micro_batches_make_the_update_of_one_batch_of_both(tiny_model_path):
    split, whole = _primitives(tiny_model_path), _primitives(tiny_model_path)
    before = _weights(split.model)
    examples = _examples(split)
    pad = split.tokenizer.pad_token_id
    halves = [collate(examples[:2], pad_id=pad), collate(examples[2:], pad_id=pad)]
    label_tokens = sum(h["label_tokens"] for h in halves)

    for index, half in enumerate(halves):
        split.forward_backward("cross_entropy", half, sync=index == 1, weight=1.0, label_tokens=label_tokens)
    split.optim_step()
    both = collate(examples, pad_id=pad)
    assert both["label_tokens"] == label_tokens
    whole.forward_backward("cross_entropy", both, weight=1.0, label_tokens=label_tokens)
    whole.optim_step()

    _assert_same_weights(_weights(split.model), _weights(whole.model), moved_from=before)


def test_an_unknown_loss_is_refused_by_name_and_touches_no_gradient(tiny_model_path):
    prims = _primitives(tiny_model_path)
    batch = collate(_examples(prims), pad_id=prims.tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="no primitive loss named 'ppo'") as refused:
        prims.forward_backward("ppo", batch)
    for name in LOSSES:
        assert name in str(refused.value)
    assert all(p.grad is None for p in prims.model.parameters())
