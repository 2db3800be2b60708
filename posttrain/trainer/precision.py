"""Where and how a job computes: the device, the dtype actually used and the one asked for.

Chosen once per job (``resolve_precision``); the forward passes, the optimizer's grad scaler and the
per-step memory figure all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.trainer.errors import TrainerConfigError


@dataclass(frozen=True)
class Precision:
    """Where and how we compute: ``dtype`` is what we actually use, ``requested`` what was asked."""

    device: str
    dtype: str  # "fp32" | "bf16" | "fp16"
    requested: str

    @property
    def autocast(self) -> bool:
        return self.dtype != "fp32"

    def autocast_context(self):
        """Mixed precision for the forward pass (and so the backward): a no-op in fp32."""
        import contextlib

        import torch

        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=self.torch_dtype())

    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]

    def memory_fields(self) -> dict[str, float]:
        """The GPU memory peak so far, for each step's metric: what a user sizes batch and model by
        on a GPU (the worker's RSS figure says nothing of it). Nothing on a CPU."""
        if self.device != "cuda":
            return {}
        import torch

        return {"gpu_memory_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def resolve_precision(*, device: str, requested_dtype: str | None, cpu_bf16: bool = True) -> Precision:
    """What a job computes in. On a CPU: bf16 when asked for and the CPU has it natively (and the
    operator left ``cpu_bf16`` on), else fp32 (emulated bf16 and CPU fp16 are several times slower
    than fp32). On CUDA: as asked, with fp16 for bf16 on GPUs without bf16."""
    import torch

    requested = (requested_dtype or "bf16").lower()
    if requested not in {"bf16", "fp16", "fp32"}:
        raise TrainerConfigError(f"training_config.dtype must be bf16, fp16 or fp32, not {requested_dtype!r}")
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainerConfigError("device 'cuda' was asked for but no CUDA device is available")
    if device == "cpu":
        native = cpu_bf16 and requested == "bf16" and cpu_has_native_bf16()
        return Precision(device="cpu", dtype="bf16" if native else "fp32", requested=requested)
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        return Precision(device=device, dtype="fp16", requested=requested)
    return Precision(device=device, dtype=requested, requested=requested)


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there bf16 matmuls run
    faster than fp32 ones; elsewhere bf16 is emulated and slower than fp32 (docs/performance.md)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
