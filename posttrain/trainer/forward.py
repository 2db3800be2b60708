"""The forward pass SFT and DPO share: model inputs for padded or packed batches, mixed precision,
the attention kernel for the batch, and the output head applied only where a token has a label.

Why these exist, measured on a 2-core CPU with a ~30M-parameter Llama (``bench/train_throughput.py``):
- The output head over the whole vocabulary at every position is a large share of the compute,
  and most positions (prompt, padding) have no label; applying it at label positions only gives the
  same loss for less work.
- For short sequences, PyTorch's fused CPU flash-attention backward was ~25% of a bf16 LoRA step;
  the plain "math" attention (one batched matmul, softmax, matmul) is several times faster there and
  its score matrices are small. Long sequences keep the flash kernel, whose memory does not grow
  with the square of the length.
"""

from __future__ import annotations

import contextlib

from posttrain.trainer.batching import packed_attention_mask
from posttrain.trainer.formats import IGNORE_INDEX

#: Model types whose ``ForCausalLM.forward`` computes logits as plain ``lm_head(body(...)[0])``
#: (no soft-capping or scaling after the head, no auxiliary loss): for these we run the body and
#: apply the head to the label positions only. Any other model goes through its own forward.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3", "gemma"})

#: Largest attention score tensor (batch x heads x length x length elements, per layer) for which the
#: math attention kernel is used on a CPU: 16M elements is 32-64 MB per layer kept for the backward.
MATH_ATTENTION_MAX_SCORES = 4 * 1024 * 1024


def base_model(model):
    """The transformers model itself, unwrapped from peft's ``PeftModel`` when there is one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def plain_head_parts(model):
    """``(body, lm_head)`` of a causal LM whose logits are ``lm_head(last_hidden_state)``, else None."""
    base = base_model(model)
    if getattr(getattr(base, "config", None), "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    if not type(base).__module__.startswith("transformers.models."):  # remote code: trust only its forward
        return None
    body, head = getattr(base, "model", None), base.get_output_embeddings()
    if body is None or head is None:
        return None
    return body, head


def model_inputs(model, batch, *, device: str) -> dict:
    """Forward kwargs: input ids plus, for padded batches, the 2D padding mask; for packed
    batches, per-row ``position_ids`` and the block-diagonal causal mask in the form the model's
    attention implementation takes (a 4D bool mask for SDPA, a 4D additive mask for eager; the
    flash/flex kernels get no mask and find the rows from the restarting ``position_ids``)."""
    inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True)}
    if "segment_ids" not in batch:
        inputs["attention_mask"] = batch["attention_mask"].to(device, non_blocking=True)
        return inputs
    inputs["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
    implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
    segments = batch["segment_ids"].to(device, non_blocking=True)
    if implementation == "sdpa":
        inputs["attention_mask"] = packed_attention_mask(segments)
    elif implementation == "eager":
        inputs["attention_mask"] = packed_attention_mask(segments, dtype=model.get_input_embeddings().weight.dtype)
    return inputs


def attention_kernel(model, input_ids, *, device: str):
    """The SDPA kernel for this batch: math for short sequences on a CPU; on a GPU any kernel but
    cuDNN's, which builds a plan for every new batch shape (padded batches change shape each step)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device == "cuda":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    if device != "cpu":
        return contextlib.nullcontext()
    heads = getattr(model.config, "num_attention_heads", None) or 1
    rows, length = input_ids.shape
    if rows * heads * length * length > MATH_ATTENTION_MAX_SCORES:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def same_attention_kernel_on_recompute():
    """``context_fn`` for ``torch.utils.checkpoint`` (activation checkpointing): the backward
    recomputes a checkpointed layer outside ``label_logits``' ``attention_kernel`` context, where
    SDPA would pick another kernel than the forward did (flash instead of math on a CPU), save
    differently shaped tensors, and checkpoint refuses the step. The recompute re-enters the
    kernel choice that was in force when the layer ran forward."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flags = {
        SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
        SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
        SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
        SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
    }
    in_force = [backend for backend, enabled in flags.items() if enabled()]
    return contextlib.nullcontext(), sdpa_kernel(in_force)


def label_logits(model, batch, *, precision):
    """``(logits, targets, keep)`` at the positions that have a label (next-token prediction):
    logits [n, vocab] in fp32, targets [n], and ``keep`` [batch, length - 1], the mask that picked
    those positions (DPO finds each label's row from it; SFT needs no more)."""
    labels = batch["labels"].to(precision.device, non_blocking=True)[:, 1:]
    keep = labels != IGNORE_INDEX
    inputs = model_inputs(model, batch, device=precision.device)
    parts = plain_head_parts(model)
    with precision.autocast_context(), attention_kernel(model, inputs["input_ids"], device=precision.device):
        if parts is not None:
            body, head = parts
            hidden = body(**inputs, use_cache=False).last_hidden_state
            logits = head(hidden[:, :-1][keep])
        else:
            logits = model(**inputs, use_cache=False).logits[:, :-1][keep]
    return logits.float(), labels[keep], keep


def token_log_probs(model, batch, *, precision):
    """Log-probability of every label token, and each one's row: ``(log_probs [n], rows [n])``."""
    import torch.nn.functional as F

    logits, targets, keep = label_logits(model, batch, precision=precision)
    return -F.cross_entropy(logits, targets, reduction="none"), keep.nonzero()[:, 0]
