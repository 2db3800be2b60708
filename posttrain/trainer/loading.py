"""Loading what a job trains on: the model (optionally with a 4-bit base), the tokenizer, its
usable sequence length, and the model a merged checkpoint is made from.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from posttrain.domain.pins import PathPin, pin_problem
from posttrain.trainer.errors import PathChangedError
from posttrain.trainer.precision import Precision

#: The folders this job's plan pinned at submit (``domain.pins``); each load below, and each
#: checkpoint write, re-checks the pin covering its path right before it reads or writes.
_pins: tuple[PathPin, ...] = ()


def pin_paths(pins: Iterable[PathPin]) -> None:
    """Take this job's pins (a warm trainer drops the previous job's) and check them all now."""
    global _pins
    _pins = tuple(pins)
    check_pinned(*(pin.path for pin in _pins))


def check_pinned(*paths: str | Path | None) -> None:
    """Raise ``PathChangedError`` when a pin covering one of ``paths`` no longer holds."""
    for path in paths:
        if path is None:
            continue
        text = os.path.abspath(path)
        for pin in _pins:
            if text == pin.path or text.startswith(pin.path.rstrip("/") + "/"):
                problem = pin_problem(pin)
                if problem is not None:
                    raise PathChangedError(problem + "; the trainer did not use it")


def check_pinned_descriptor(path: str | Path, fd: int) -> None:
    """The folder open as ``fd`` is the one pinned for ``path`` (if one is): what was checked by
    name a moment ago is what the descriptor holds."""
    text = os.path.abspath(path)
    for pin in _pins:
        if text == pin.path and os.fstat(fd).st_ino != pin.inode:
            raise PathChangedError(f"the folder checked when the job was submitted ({pin.path}) was replaced; "
                                   "the trainer did not write to it")


def load_model(*, path: str, precision: Precision, lora: bool, trust_remote_code: bool, quantize_base: bool = False):
    """Full fine-tunes keep fp32 master weights (autocast does the rest); LoRA bases load in the
    compute dtype, since they are frozen and only the adapters need fp32.

    ``quantize_base`` (LoRA only, the spec's QLoRA switch): the base's linear layers load as 4-bit
    NF4 with double quantization (bitsandbytes, which runs on CUDA and, since 0.48, on CPUs),
    dequantized to the compute dtype on the fly; about a quarter of the bf16 memory for those
    weights. The norms, embeddings and output head stay in the compute dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    check_pinned(path)
    dtype = precision.torch_dtype() if lora else torch.float32
    if not quantize_base:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        return model.to(precision.device)
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    # A quantized model cannot be moved after loading: place it while loading. On CUDA the job sees
    # only its own GPU (CUDA_VISIBLE_DEVICES), which is device 0.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quantization,
                                                 device_map={"": 0 if precision.device == "cuda" else precision.device},
                                                 trust_remote_code=trust_remote_code)
    for layer in _quantized_layers(model):
        # bitsandbytes 0.50 repacks a layer's weight for its AVX512-BF16 CPU kernel at the first
        # no-grad forward (our validation); that fails for layers whose input size is not a
        # multiple of the block size (e.g. 1376), and the repacked weight is an inference format.
        # The generic dequantizing path serves training and validation alike.
        layer.support_avx512bf16_for_cpu = False
    return model


#: How ``quantize_base`` stores the base (``resources_allocated.base_quantization.scheme``).
BASE_QUANTIZATION = "nf4 4-bit, double quantization (bitsandbytes)"


def quantized_layers(model) -> int:
    """How many of the model's linear layers are bitsandbytes 4-bit layers (a check that the
    quantization happened, reported beside the scheme)."""
    return len(_quantized_layers(model))


def _quantized_layers(model) -> list:
    """bitsandbytes' own 4-bit layers (not peft's LoRA wrappers around them, which share the name)."""
    return [module for module in model.modules()
            if type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")]


def load_merge_base(*, path: str, adapter: str | None = None, trust_remote_code: bool):
    """The model a merged checkpoint is made from: the base as stored (its own dtype, on the CPU),
    with a starting adapter merged in when the job began from one (DPO on an SFT adapter)."""
    from transformers import AutoModelForCausalLM

    check_pinned(path, adapter)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", trust_remote_code=trust_remote_code)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model


def load_tokenizer(*, path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    check_pinned(path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id will do
    return tokenizer


MAX_LENGTH_CAP = 4096  # no max sequence length in the Llama Stack config; keep memory bounded


def model_max_length(*, model_path: str, tokenizer, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    check_pinned(model_path)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length, MAX_LENGTH_CAP]
    return min(int(limit) for limit in limits if limit and limit < 10**8)
