"""``data_config.packed``: rows packed into shared sequences train exactly as the rows one by one.

In-process: on the same rows and weights, the loss (and gradient) of a packed batch equals the
token-weighted loss of the rows in ordinary padded batches, for SDPA and eager attention, LoRA or
not, with the label-positions-only head and with the model's own forward. Then the trainer process
with ``packed: true`` completes and spends fewer of its step tokens on padding.
"""

from __future__ import annotations

import random

import pytest

from posttrain.trainer import adapters, forward, sft
from posttrain.trainer.batching import (
    collate,
    collate_packed,
    encode_rows,
    pack_rows,
    packed_attention_mask,
)
from posttrain.trainer.formats import IGNORE_INDEX
from posttrain.trainer.precision import resolve_precision
from tests.fixtures_tiny import build_tiny_model
from tests.integration.test_trainer_process import make_spec, run
from tests.trainer_specs import lora_recipe

pytestmark = [pytest.mark.slow]

WORDS = ["the", "cat", "sees", "a", "red", "apple", "and", "blue", "sea", "my", "friend", "likes", "green", "leaves"]
LORA = {"type": "LoRA", "lora_attn_modules": ["q_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True,
        "apply_lora_to_output": True, "rank": 8, "alpha": 16}


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory)


def varied_rows(count: int, *, seed: int = 0, longest: int = 60) -> list[dict]:
    """Question/answer rows of very different lengths (about 40 to 40 + 1.5 * ``longest`` tokens)."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    return [{"question": text(rng.randint(1, longest)), "answer": text(rng.randint(1, longest // 2))}
            for _ in range(count)]


def test_pack_rows_is_first_fit_decreasing_within_the_limit():
    lengths = [5, 9, 3, 7, 2, 12, 4]
    packs = pack_rows(lengths, max_length=12)
    assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in pack) <= 12 for pack in packs)
    # longest first: 12 | 9+3 | 7+5 | 4+2, each row into the first pack with room
    assert packs == [[5], [1, 2], [3, 0], [6, 4]]
    assert pack_rows([20, 3], max_length=10) == [[0], [1]]  # too long: a pack of its own
    assert pack_rows([], max_length=10) == []


def test_collate_packed_restarts_positions_and_masks_row_boundaries():
    import torch

    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [IGNORE_INDEX, 5]},
            {"input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]}]
    batch = collate_packed([[rows[0], rows[1]], [rows[2]]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 7, 8, 9, -100]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]]
    assert (batch["real_tokens"], batch["label_tokens"], batch["total_tokens"]) == (9, 6, 10)
    mask = packed_attention_mask(batch["segment_ids"])
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                         [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert mask.any(-1).all()  # the padding tail attends to itself: no fully masked row, no NaN
    additive = packed_attention_mask(batch["segment_ids"], dtype=torch.float32)
    assert ((additive == 0) == mask).all() and additive.min() == torch.finfo(torch.float32).min


def _model(path, *, attention: str, lora: bool):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)
    if lora:
        torch.manual_seed(1)
        model = adapters.apply_lora(model, lora_recipe(LORA))
        for name, param in model.named_parameters():  # lora_B starts at zero: make the adapter matter
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
    return model


def _loss_and_grads(model, batches, precision):
    model.zero_grad(set_to_none=True)
    tokens = sum(b["label_tokens"] for b in batches)
    total = 0.0
    for batch in batches:
        loss_sum = sft._loss_sum(model, batch, precision=precision)
        (loss_sum / tokens).backward()
        total += float(loss_sum.detach())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return total / tokens, grads


@pytest.mark.parametrize(("attention", "lora", "plain_head"), [
    ("sdpa", False, True), ("sdpa", True, True), ("sdpa-flash", True, True), ("eager", False, True),
    ("sdpa", False, False), ("eager", True, False),
])
def test_packed_loss_equals_token_weighted_unpacked_loss(tiny_model_path, monkeypatch, attention, lora, plain_head):
    """``sdpa`` switches to eager attention for these short CPU batches; ``sdpa-flash`` keeps SDPA with its
    fused kernel."""
    import torch
    from transformers import AutoTokenizer

    if attention == "sdpa-flash":
        monkeypatch.setattr(forward, "PLAIN_ATTENTION_MAX_SCORES", 0)
        attention = "sdpa"
    if not plain_head:  # the model's own forward, full-vocabulary logits
        monkeypatch.setattr(forward, "PLAIN_HEAD_MODEL_TYPES", frozenset())
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    examples = encode_rows(varied_rows(14), tokenizer=tokenizer, data_format="instruct", train_on_input=False,
                           max_length=512)
    lengths = [len(e["input_ids"]) for e in examples]
    assert max(lengths) > 2 * min(lengths)
    precision = resolve_precision(device="cpu", requested_dtype="fp32")
    model = _model(tiny_model_path, attention=attention, lora=lora)

    unpacked = [collate(examples[i : i + 4], pad_id=tokenizer.pad_token_id) for i in range(0, len(examples), 4)]
    packs = pack_rows(lengths, max_length=256)
    assert 1 < len(packs) < len(examples) and any(len(p) > 2 for p in packs)
    packed = collate_packed([[examples[i] for i in pack] for pack in packs], pad_id=tokenizer.pad_token_id)
    assert packed["label_tokens"] == sum(b["label_tokens"] for b in unpacked)
    assert packed["real_tokens"] == sum(lengths)

    expected, expected_grads = _loss_and_grads(model, unpacked, precision)
    got, got_grads = _loss_and_grads(model, [packed], precision)
    assert got == pytest.approx(expected, rel=1e-4)
    assert got_grads.keys() == expected_grads.keys() and got_grads
    for name, grad in got_grads.items():
        assert torch.allclose(grad, expected_grads[name], rtol=1e-3, atol=1e-6), name


def test_plain_head_gives_the_models_own_loss(tiny_model_path):
    """The label-positions-only head is the same loss as the full forward (padded batches too)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    examples = encode_rows(varied_rows(6, seed=3), tokenizer=tokenizer, data_format="instruct",
                           train_on_input=False, max_length=512)
    batch = collate(examples, pad_id=tokenizer.pad_token_id)
    model = _model(tiny_model_path, attention="sdpa", lora=True)
    assert forward.plain_head_parts(model) is not None
    precision = resolve_precision(device="cpu", requested_dtype="fp32")
    labels = batch["labels"].clone()
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    with torch.no_grad():
        plain = float(sft._loss_sum(model, batch, precision=precision))
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    assert plain / batch["label_tokens"] == pytest.approx(float(own), rel=1e-5)


def _padding_tokens(metrics: list[dict]) -> float:
    return sum(m["tokens"] * m["padding_fraction"] / (1 - m["padding_fraction"]) for m in metrics)


def test_packed_trainer_run_completes_with_less_padding(tiny_model_path, tmp_path):
    rows = varied_rows(48, seed=1, longest=80)
    results = {}
    for packed in (False, True):
        folder = tmp_path / ("packed" if packed else "padded")
        folder.mkdir()
        spec = make_spec(folder, tiny_model_path, rows=rows, n_epochs=1, max_steps_per_epoch=100,
                         data_config={"dataset_id": "toy", "batch_size": 8, "shuffle": True,
                                      "data_format": "instruct", "packed": packed})
        events, code = run(spec, folder)
        assert code == 0, (folder / "stderr.txt").read_text()[-3000:]
        assert events[-1] == {"event": "completed"}
        metrics = [e for e in events if e["event"] == "metric"]
        assert metrics and all(0 <= m["padding_fraction"] < 1 and m["tokens"] > 0 for m in metrics)
        assert events[-2]["event"] == "checkpoint" and events[-2]["train_loss"] > 0
        results[packed] = metrics
    padded, packed = results[False], results[True]
    assert sum(m["tokens"] for m in packed) == sum(m["tokens"] for m in padded)  # every row, once
    assert len(packed) < len(padded)
    assert _padding_tokens(packed) < _padding_tokens(padded)
    fraction = {k: _padding_tokens(v) / (_padding_tokens(v) + sum(m["tokens"] for m in v)) for k, v in results.items()}
    assert fraction[True] < fraction[False]
