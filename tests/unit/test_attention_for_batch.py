"""How a training forward attends (posttrain.trainer.forward.attention_for_batch).

On a GPU the choice is made by switching PyTorch's SDPA backend flags, which these tests read
inside the context (that works on a CPU-only build too). On a CPU, short batches switch the
model to transformers' eager attention for the forward; that must give the same logits as SDPA.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.trainer import forward
from posttrain.trainer.forward import PLAIN_ATTENTION_MAX_SCORES, attention_for_batch
from posttrain.trainer.precision import Precision


def _llama(cls=LlamaForCausalLM):
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=64, max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(config)


class _CannotSwitch(LlamaForCausalLM):
    """A model whose attention cannot be switched after loading (as transformers judges some
    remote-code models)."""

    _can_set_attn_implementation_cached_value = False


def _flags() -> dict[str, bool]:
    cuda = torch.backends.cuda
    return {"flash": cuda.flash_sdp_enabled(), "efficient": cuda.mem_efficient_sdp_enabled(),
            "math": cuda.math_sdp_enabled(), "cudnn": cuda.cudnn_sdp_enabled()}


def test_on_a_gpu_every_kernel_but_cudnn():
    # torch 2.11 on an H100 sent padded batches to cuDNN, which builds a plan per new batch shape:
    # an SFT LoRA step took ~0.37 s unpacked against ~0.07 s packed (fixed shape) in bench/gpu_session.sh.
    model, before = _llama(), _flags()
    with attention_for_batch(model, torch.zeros(4, 173, dtype=torch.long), device="cuda"):
        assert _flags() == {"flash": True, "efficient": True, "math": True, "cudnn": False}
        assert model.config._attn_implementation == "sdpa"
    assert _flags() == before


def test_on_a_cpu_short_batches_attend_eagerly_for_the_forward_only():
    model, before = _llama(), _flags()
    with attention_for_batch(model, torch.zeros(4, 128, dtype=torch.long), device="cpu"):
        assert model.config._attn_implementation == "eager"
        assert _flags() == before
    assert model.config._attn_implementation == "sdpa"


def test_on_a_cpu_long_batches_keep_sdpa_and_its_kernels():
    model, before = _llama(), _flags()
    length = int((PLAIN_ATTENTION_MAX_SCORES / (4 * 8)) ** 0.5) + 1
    with attention_for_batch(model, torch.zeros(4, length, dtype=torch.long), device="cpu"):
        assert model.config._attn_implementation == "sdpa"
        assert _flags() == before


def test_a_model_that_cannot_switch_gets_the_math_kernel():
    model = _llama(_CannotSwitch)
    with attention_for_batch(model, torch.zeros(4, 128, dtype=torch.long), device="cpu"):
        assert model.config._attn_implementation == "sdpa"
        assert _flags() == {"flash": False, "efficient": False, "math": True, "cudnn": False}


def test_eager_attention_gives_the_logits_and_gradients_of_sdpa(monkeypatch):
    """A right-padded batch of rows of different lengths, in fp32: eager attention (short batch)
    and SDPA's flash kernel (the threshold set to 0) agree."""
    model = _llama()
    lengths = [7, 19, 12]
    input_ids = torch.randint(1, 64, (3, 19))
    attention_mask = (torch.arange(19)[None, :] < torch.tensor(lengths)[:, None]).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    precision = Precision(device="cpu", dtype="fp32", requested="fp32")

    def logits_and_grads():
        model.zero_grad(set_to_none=True)
        logits, _, _ = forward.label_logits(model, batch, precision=precision)
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    eager_logits, eager_grads = logits_and_grads()
    monkeypatch.setattr(forward, "PLAIN_ATTENTION_MAX_SCORES", 0)
    sdpa_logits, sdpa_grads = logits_and_grads()
    assert eager_logits.shape[0] == sum(lengths) - 3
    torch.testing.assert_close(eager_logits, sdpa_logits, rtol=1e-5, atol=1e-5)
    for name, grad in sdpa_grads.items():
        torch.testing.assert_close(eager_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gpu_memory_is_reported_on_a_gpu_only():
    assert Precision(device="cpu", dtype="fp32", requested="bf16").memory_fields() == {}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_model_attends_as_loaded_after_a_failed_forward(device):
    model = _llama()
    with pytest.raises(RuntimeError), attention_for_batch(model, torch.zeros(4, 16, dtype=torch.long), device=device):
        raise RuntimeError("the forward failed")
    assert model.config._attn_implementation == "sdpa"
