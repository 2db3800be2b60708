"""DPO's reference log-probs are computed once per pair (posttrain.trainer.dpo_loss.ReferenceLogps):
the cached values are the adapter-off model's, a cached pair costs no forward, and training with
the cache gives the losses of training without it."""

from __future__ import annotations

import pytest

from posttrain.domain.recipes import DPOLoss, Optimizer
from posttrain.trainer import adapters, dpo, dpo_loss, loading, optimization
from posttrain.trainer.data_parallel import DataParallel
from posttrain.trainer.forward import base_model
from posttrain.trainer.precision import Precision
from posttrain.trainer.preference_data import encode_preference_rows
from posttrain.trainer.primitives import Primitives
from posttrain.trainer.reporting import StopFlag
from tests.integration.test_dpo_trainer import LORA, preference_rows
from tests.trainer_specs import lora_recipe

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

PRECISION = Precision(device="cpu", dtype="fp32", requested="fp32")
CONFIG = DPOLoss(beta=0.1, loss_type="sigmoid")


def _policy(path, *, seed: int = 1):
    import torch

    model = loading.load_model(path=str(path), precision=PRECISION, lora=True, trust_remote_code=False)
    torch.manual_seed(seed)
    model = adapters.lora_model(model, lora_recipe(LORA))
    for name, param in model.named_parameters():  # lora_B starts at zero: make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model


def _examples(path):
    tokenizer = loading.load_tokenizer(path=str(path), trust_remote_code=False)
    return encode_preference_rows(preference_rows(), tokenizer=tokenizer, max_length=512), tokenizer.pad_token_id


def test_cached_values_are_the_adapter_off_log_probs_and_cost_no_forward(tiny_model_path):
    import torch

    model = _policy(tiny_model_path)
    examples, pad_id = _examples(tiny_model_path)
    forwards = []
    base_model(model).model.register_forward_pre_hook(lambda *_: forwards.append(1))
    cache = dpo_loss.ReferenceLogps()
    batch = dpo_loss.pair_batch(examples, [3, 0, 7, 5], pad_id=pad_id)

    first = cache.of(model, batch, precision=PRECISION, average=False)
    assert len(forwards) == 1 and len(cache) == 4
    with torch.no_grad(), model.disable_adapter():
        adapter_off = dpo_loss.answer_logps(model, batch, precision=PRECISION, average=False)
    with torch.no_grad():
        adapter_on = dpo_loss.answer_logps(model, batch, precision=PRECISION, average=False)
    torch.testing.assert_close(first, adapter_off)
    assert not torch.allclose(first, adapter_on, atol=1e-3)  # the adapter matters, and was off

    forwards.clear()
    regrouped = dpo_loss.pair_batch(examples, [5, 3], pad_id=pad_id)  # other batch, other padding
    again = cache.of(model, regrouped, precision=PRECISION, average=False)
    assert forwards == []
    # [chosen 5, chosen 3, rejected 5, rejected 3] of the first batch [chosen 3, 0, 7, 5, rejected 3, 0, 7, 5]
    torch.testing.assert_close(again, torch.stack([first[3], first[0], first[7], first[4]]))

    cache.of(model, dpo_loss.pair_batch(examples, [5, 9], pad_id=pad_id), precision=PRECISION, average=False)
    assert len(forwards) == 1 and len(cache) == 5  # one new pair: the batch's reference is computed


def _train(path, steps: list[list[int]], *, cached: bool) -> list[float]:
    """Three epochs of the same steps; one cache for the run, or a new (empty) one every step."""
    model = _policy(path)
    examples, pad_id = _examples(path)
    optimizer = optimization.build_optimizer(model, Optimizer(optimizer_type="adamw", lr=1e-2))
    scheduler = optimization.build_scheduler(optimizer, warmup_steps=0, total_steps=3 * len(steps))
    cache = dpo_loss.ReferenceLogps()
    parallel = DataParallel(model, precision=PRECISION, compute=dpo_loss.answer_logp_sums_and_hits)  # one process
    run = optimization.Optimization(optimizer=optimizer, scheduler=scheduler, scaler=None, total_steps=3 * len(steps),
                                    steps_per_epoch=len(steps))
    prims = Primitives(model=model, tokenizer=None, run=run, precision=PRECISION, parallel=parallel)
    losses = []
    for _ in range(3):
        for indices in steps:
            means = dpo._train_step(prims, [dpo_loss.pair_batch(examples, indices, pad_id=pad_id)], config=CONFIG,
                                    stop=StopFlag(), reference_logps=cache if cached else dpo_loss.ReferenceLogps())
            losses.append(means["loss"])
    return losses


def test_training_with_the_cache_gives_the_losses_of_training_without_it(tiny_model_path):
    steps = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    without = _train(tiny_model_path, steps, cached=False)
    with_cache = _train(tiny_model_path, steps, cached=True)
    assert with_cache == pytest.approx(without, rel=1e-4)
    assert without[-1] < without[0]  # it trained: the comparison is over a moving policy
