"""The forward pass SFT and DPO share: model inputs for padded or packed batches, mixed precision,
the attention kernel for the batch, and the output head applied only where a token has a label.

Why these exist (the measurements are in docs/performance.md):
- The output head over the whole vocabulary at every position is a large share of the compute,
  and most positions (prompt, padding) have no label; applying it at label positions only gives the
  same loss for less work.
- For short sequences, PyTorch's fused CPU flash-attention backward is a large share of a bf16
  LoRA step; plain attention (one batched matmul, softmax, matmul) is several times faster there and
  its score matrices are small. Of the plain ones, transformers' own "eager" attention multiplies in
  the autocast dtype (bf16), where SDPA's "math" kernel upcasts bf16 to fp32 on a CPU and runs its
  matmuls at half the speed. Long sequences keep SDPA's flash kernel, whose memory does not grow with the
  square of the length.
"""

from __future__ import annotations

import contextlib

from posttrain.trainer.batching import packed_attention_mask
from posttrain.trainer.formats import IGNORE_INDEX

#: Model types whose ``ForCausalLM.forward`` computes logits as plain ``lm_head(body(...)[0])``
#: (no soft-capping or scaling after the head, no auxiliary loss): for these we run the body and
#: apply the head to the label positions only. Any other model goes through its own forward.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3", "gemma"})

#: Largest attention score tensor (batch x heads x length x length elements, per layer) for which
#: plain (eager) attention is used on a CPU: 4M elements keep ~24 MB per layer for the backward (the
#: fp32 softmax and its bf16 copy).
PLAIN_ATTENTION_MAX_SCORES = 4 * 1024 * 1024


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


@contextlib.contextmanager
def contiguous_head_input(model):
    """The output head gets a contiguous input inside the context (sampling, and the GRPO
    log-probs that keep only the completion's logits).

    ``generate``'s first step applies the head to the last position only (``hidden[:, -1:]``, a
    strided view of the prompt's hidden states). On a CPU, a bf16 linear over such a 3D view goes
    through ``bmm`` with the head's weight expanded to every row and copied (rows x hidden x vocab
    elements): that copy was most of a short generation's time with a bf16-weight base. The same
    values made contiguous take the plain 2D matmul; the logits are unchanged."""
    head = base_model(model).get_output_embeddings()
    if head is None:
        yield
        return

    def make_contiguous(_module, args):
        return (args[0].contiguous(), *args[1:]) if args else None

    handle = head.register_forward_pre_hook(make_contiguous)
    try:
        yield
    finally:
        handle.remove()


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


@contextlib.contextmanager
def attention_for_batch(model, input_ids, *, device: str):
    """The attention a training forward uses for this batch.

    On a GPU: SDPA with any kernel but cuDNN's, which builds a plan for every new batch shape
    (padded batches change shape each step). On a CPU, batches whose score matrices are small
    (``PLAIN_ATTENTION_MAX_SCORES``): transformers' eager attention, switched on for the forward
    (``set_attn_implementation``) and back off after it; a model that cannot switch (remote code)
    gets SDPA's math kernel instead. Longer batches on a CPU: SDPA as loaded (its flash kernel).
    ``model_inputs`` must run inside this context: a packed batch's mask takes the form of the
    attention in force."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device == "cuda":
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            yield
        return
    heads = getattr(model.config, "num_attention_heads", None) or 1
    rows, length = input_ids.shape
    if device != "cpu" or rows * heads * length * length > PLAIN_ATTENTION_MAX_SCORES:
        yield
        return
    base = base_model(model)
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        yield  # eager already, or an implementation the operator chose
    elif not base._can_set_attn_implementation():
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    else:
        with attention_implementation(base, "eager"):
            yield


@contextlib.contextmanager
def attention_implementation(model, implementation: str):
    """``model`` (a transformers model) attends with ``implementation`` inside the context."""
    before = model.config._attn_implementation
    if before == implementation:
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def same_attention_on_recompute(model):
    """A ``context_fn`` for ``torch.utils.checkpoint`` (activation checkpointing) on ``model``: the
    backward recomputes a checkpointed layer outside ``label_logits``' ``attention_for_batch``
    context, where the layer would attend another way than its forward did (SDPA's flash kernel
    instead of eager attention on a CPU), save differently shaped tensors, and checkpoint refuses
    the step. The recompute re-enters the attention implementation and SDPA kernels that were in
    force when the layer ran forward."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flags = {
        SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
        SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
        SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
        SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
    }
    base = base_model(model)

    @contextlib.contextmanager
    def recompute(kernels, implementation: str):
        with sdpa_kernel(kernels), attention_implementation(base, implementation):
            yield

    def context_fn():
        in_force = [backend for backend, enabled in flags.items() if enabled()]
        return contextlib.nullcontext(), recompute(in_force, base.config._attn_implementation)

    return context_fn


def label_logits(model, batch, *, precision):
    """``(logits, targets, keep)`` at the positions that have a label (next-token prediction):
    logits [n, vocab] in fp32, targets [n], and ``keep`` [batch, length - 1], the mask that picked
    those positions (DPO finds each label's row from it; SFT needs no more)."""
    labels = batch["labels"].to(precision.device, non_blocking=True)[:, 1:]
    keep = labels != IGNORE_INDEX
    parts = plain_head_parts(model)
    with precision.autocast_context(), attention_for_batch(model, batch["input_ids"], device=precision.device):
        inputs = model_inputs(model, batch, device=precision.device)
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


def token_log_probs_and_hits(model, batch, *, precision):
    """``token_log_probs``, and whether each label token is the model's most likely next token
    (``hits [n]``, bool: the argmax of the logits that predict it, for a token accuracy)."""
    import torch.nn.functional as F

    logits, targets, keep = label_logits(model, batch, precision=precision)
    hits = logits.detach().argmax(dim=-1) == targets
    return -F.cross_entropy(logits, targets, reduction="none"), keep.nonzero()[:, 0], hits
