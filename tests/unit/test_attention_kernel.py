"""Which SDPA kernels a training forward may use (posttrain.trainer.forward.attention_kernel).

The choice is made by switching PyTorch's backend flags for the forward; these tests read the
flags inside the context, which works on a CPU-only build for the CUDA choice too.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from posttrain.trainer.forward import MATH_ATTENTION_MAX_SCORES, attention_kernel
from posttrain.trainer.modeling import Precision


class _Model:
    config = LlamaConfig(num_attention_heads=8)


def _flags() -> dict[str, bool]:
    cuda = torch.backends.cuda
    return {"flash": cuda.flash_sdp_enabled(), "efficient": cuda.mem_efficient_sdp_enabled(),
            "math": cuda.math_sdp_enabled(), "cudnn": cuda.cudnn_sdp_enabled()}


def test_on_a_gpu_every_kernel_but_cudnn():
    # torch 2.11 on an H100 sent padded batches to cuDNN, which builds a plan per new batch shape:
    # an SFT LoRA step took ~0.37 s unpacked against ~0.07 s packed (fixed shape) in bench/gpu_session.sh.
    before = _flags()
    with attention_kernel(_Model(), torch.zeros(4, 173, dtype=torch.long), device="cuda"):
        assert _flags() == {"flash": True, "efficient": True, "math": True, "cudnn": False}
    assert _flags() == before


def test_on_a_cpu_math_for_short_batches_only():
    short = torch.zeros(4, 128, dtype=torch.long)
    with attention_kernel(_Model(), short, device="cpu"):
        assert _flags() == {"flash": False, "efficient": False, "math": True, "cudnn": False}
    length = int((MATH_ATTENTION_MAX_SCORES / (4 * 8)) ** 0.5) + 1
    before = _flags()
    with attention_kernel(_Model(), torch.zeros(4, length, dtype=torch.long), device="cpu"):
        assert _flags() == before


def test_gpu_memory_is_reported_on_a_gpu_only():
    assert Precision(device="cpu", dtype="fp32", requested="bf16").memory_fields() == {}
