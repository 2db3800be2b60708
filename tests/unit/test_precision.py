"""What a job computes in on a CPU, for each dtype a request may carry."""

from __future__ import annotations

import pytest

from posttrain.trainer.precision import cpu_has_native_bf16, resolve_precision


@pytest.mark.parametrize("requested", ["fp32", "fp16"])
def test_cpu_computes_in_fp32_unless_bf16_is_asked_for(requested):
    precision = resolve_precision(device="cpu", requested_dtype=requested)
    assert precision.dtype == "fp32" and precision.requested == requested and not precision.autocast


def test_bf16_on_a_cpu_follows_the_hardware_and_the_operator():
    native = cpu_has_native_bf16()
    asked = resolve_precision(device="cpu", requested_dtype="bf16")
    assert (asked.dtype, asked.autocast) == (("bf16", True) if native else ("fp32", False))
    refused = resolve_precision(device="cpu", requested_dtype="bf16", cpu_bf16=False)
    assert refused.dtype == "fp32" and refused.requested == "bf16" and not refused.autocast


def test_a_request_without_dtype_means_bf16():
    assert resolve_precision(device="cpu", requested_dtype=None).requested == "bf16"


def test_unknown_dtype_is_refused():
    from posttrain.trainer.errors import TrainerConfigError

    with pytest.raises(TrainerConfigError, match="bf16, fp16 or fp32"):
        resolve_precision(device="cpu", requested_dtype="int8")
