"""Mixed-adapter batches through stacked LoRA weights (``posttrain.serving.mixed_lora``) give the
logits peft's own mixed batches (``adapter_names``) give: rows of two adapters of different ranks
and targets, a base row, left padding, a prefill and a cached decode step; outside a mixed batch,
once peft's ``set_adapter`` has run, the model is peft's again. A base with a LoRA
variant peft alone computes (DoRA) gets no stacks."""

from __future__ import annotations

import pytest

from posttrain.serving.mixed_lora import MixedLora
from tests.fixtures_tiny import build_tiny_model
from tests.integration.test_serving_engine import make_adapter

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

BASE_ROW = "__base__"


def _served(base_path, adapters: dict[str, object]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(adapters)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapters[names[0]],
                                      adapter_name=names[0], is_trainable=False)
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name, is_trainable=False)
    return model.eval()


def _left_padded(rows: list[list[int]], pad: int = 0):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _prefill_and_one_step(model, adapters: list[str], *, stacks: MixedLora | None):
    """Logits of a prefill and of one decode step after it, mixed by peft or by ``stacks``."""
    import contextlib

    import torch
    from transformers import DynamicCache

    ids, mask, positions = _left_padded([[5, 9, 14, 3, 8], [7, 2], [11, 4, 6], [3, 3, 12, 9]])
    cache = DynamicCache(config=model.config)
    extra = {} if stacks is not None else {"adapter_names": adapters}
    if stacks is not None:
        stacks.silence_peft()
    mixing = stacks.applied(adapters) if stacks is not None else contextlib.nullcontext()
    with torch.no_grad(), mixing:
        first = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                      use_cache=True, **extra).logits[:, -1]
        following = first.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones((len(adapters), 1), dtype=mask.dtype)], 1)
        second = model(input_ids=following, attention_mask=mask, position_ids=positions[:, -1:] + 1,
                       past_key_values=cache, use_cache=True, **extra).logits[:, -1]
    return first, second


def test_stacked_mixed_batches_give_peft_s_logits(tmp_path_factory):
    import torch

    base = build_tiny_model(tmp_path_factory)
    folder = tmp_path_factory.mktemp("mixed-lora")
    model = _served(base, {
        "a": make_adapter(base, folder / "a", 1, rank=4, alpha=8, targets=["q_proj", "v_proj"]),
        "b": make_adapter(base, folder / "b", 2, rank=8, alpha=16, targets=["q_proj", "k_proj", "o_proj"]),
    })
    rows = ["a", "b", BASE_ROW, "a"]
    stacks = MixedLora.of(model, ["a", "b"])
    assert stacks is not None and len(stacks.layers) > 0

    peft_first, peft_second = _prefill_and_one_step(model, rows, stacks=None)
    ours_first, ours_second = _prefill_and_one_step(model, rows, stacks=stacks)
    torch.testing.assert_close(ours_first, peft_first, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours_second, peft_second, atol=1e-4, rtol=1e-4)
    # The adapters matter, so the equality is of three different computations.
    assert not torch.allclose(peft_first[0], peft_first[2], atol=1e-3)
    assert not torch.allclose(peft_first[1], peft_first[2], atol=1e-3)
    # Outside ``applied``, once peft's set_adapter has run, the model is peft's again (the hooks add nothing).
    model.set_adapter("b")
    with torch.no_grad():
        ids, mask, _ = _left_padded([[5, 9, 14]])
        again = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        expected = model(input_ids=ids, attention_mask=mask, adapter_names=["b"]).logits[:, -1]
    torch.testing.assert_close(again, expected)
    stacks.close()
    assert all(not layer.module._forward_hooks for layer in stacks.layers)


def test_a_dora_adapter_gets_no_stacks(tmp_path_factory):
    base = build_tiny_model(tmp_path_factory)
    folder = tmp_path_factory.mktemp("mixed-dora")
    model = _served(base, {
        "a": make_adapter(base, folder / "a", 1, rank=4, alpha=8, targets=["q_proj", "v_proj"]),
        "d": make_adapter(base, folder / "d", 3, rank=4, alpha=8, targets=["q_proj", "v_proj"], dora=True),
    })
    assert MixedLora.of(model, ["a", "d"]) is None
    assert MixedLora.of(model, ["a"]) is not None  # a plain adapter of the same base is stacked
