"""Which GPUs this worker hands out: one job per GPU (or per ``POSTTRAIN_DEVICES_PER_JOB`` GPUs),
each trainer seeing only its own.

The worker itself never initialises CUDA (the API process stays light): it reads the GPU ids from
``POSTTRAIN_GPUS``, else from its own ``CUDA_VISIBLE_DEVICES`` (so a worker started on GPUs 2,3
hands out exactly "2" and "3"), else from ``nvidia-smi``. A trainer gets its id as the spec's
``cuda_visible_devices`` and sets ``CUDA_VISIBLE_DEVICES`` to it before torch touches CUDA, which
works for warm trainers too (torch is imported, CUDA is not yet initialised). A job on several
devices gets several ids, comma-separated ("2,3"), and its ranks each take one of them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping


def visible_gpus(*, device: str, configured: list[str] | None,
                 environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPU ids jobs may be pinned to; empty when training on the CPU."""
    if device == "cpu":
        return []
    if configured is not None:
        return [str(gpu) for gpu in configured]
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [gpu.strip() for gpu in environ["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip() and gpu.strip() != "-1"]
    return _nvidia_smi_indices()


def _nvidia_smi_indices() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


class GpuPool:
    """The GPU ids not held by a running job; each job takes ``per_job`` of them."""

    def __init__(self, gpus: list[str], *, per_job: int = 1) -> None:
        self.gpus = list(gpus)
        self.per_job = max(1, per_job)
        self._held: set[str] = set()

    @property
    def enabled(self) -> bool:
        return bool(self.gpus)

    def free(self) -> int:
        """How many more jobs the free GPUs can take."""
        return (len(self.gpus) - len(self._held)) // self.per_job

    def take(self) -> str | None:
        """``per_job`` free ids, comma-separated (CUDA_VISIBLE_DEVICES' form), or None."""
        free = [gpu for gpu in self.gpus if gpu not in self._held][: self.per_job]
        if len(free) < self.per_job:
            return None
        self._held.update(free)
        return ",".join(free)

    def give_back(self, gpus: str | None) -> None:
        for gpu in (gpus or "").split(","):
            self._held.discard(gpu)
