"""Compiling the model with ``torch.compile`` when a run is long enough to pay for it.

Measured on the 2-core CPU with the ~30M-parameter bench model (bf16 LoRA, rows of 20-300 tokens):
eager ~1470 real tokens/s, compiled ~2000-2150 (inductor fuses the norms, rotary embeddings,
activations and casts that surround the matmuls). Compiling costs ~115 s the first time on that
machine (~30 s with inductor's on-disk cache warm), which a short job would never win back, and it
would wreck the time to the first step. So ``auto`` (the default) trains eagerly, times the first
steps, and compiles only when the training still ahead, at the eager pace, is longer than
``AUTO_MIN_REMAINING_SECONDS``. ``on`` compiles before the first step, ``off`` never.

Only the transformer body is compiled, in place (``Module.compile``), with dynamic shapes: the
state dict keeps its names (checkpoints are unchanged), the output head stays eager (it runs on
label positions only), and rows of any length reuse one graph. Should compiling fail (no C++
compiler, an unsupported model), dynamo falls back to eager rather than failing the job.
"""

from __future__ import annotations

import statistics

MODES = ("auto", "on", "off")
#: ``auto`` compiles when the eager estimate of the remaining training is at least this long.
AUTO_MIN_REMAINING_SECONDS = 20 * 60
#: Steps timed before ``auto`` decides (the first one is slow: allocator and caches warming up).
AUTO_TIMED_STEPS = 4


def should_compile(step_seconds: list[float], *, steps_left: int,
                   min_remaining_seconds: float = AUTO_MIN_REMAINING_SECONDS) -> bool:
    """``auto``'s rule: the median of the timed steps (the first excluded) times the steps left."""
    timed = step_seconds[1:] or step_seconds
    return bool(timed) and statistics.median(timed) * steps_left >= min_remaining_seconds


class Compiler:
    """Applies the run's compile mode: at the start (``on``) or once enough steps are timed (``auto``)."""

    def __init__(self, mode: str | None) -> None:
        self.mode = (mode or "auto").lower()
        if self.mode not in MODES:
            raise ValueError(f"compile must be one of {', '.join(MODES)}, not {mode!r}")
        self.compiled = False
        self._step_seconds: list[float] = []

    def start(self, model, *, reporter) -> None:  # noqa: ANN001
        if self.mode == "on":
            self._compile(model, reporter=reporter, reason="compile=on")

    def after_step(self, model, *, step_seconds: float, steps_left: int, reporter) -> None:  # noqa: ANN001
        if self.mode != "auto" or self.compiled or len(self._step_seconds) >= AUTO_TIMED_STEPS:
            return
        self._step_seconds.append(step_seconds)
        if len(self._step_seconds) == AUTO_TIMED_STEPS and should_compile(self._step_seconds, steps_left=steps_left):
            eager = statistics.median(self._step_seconds[1:]) * steps_left
            self._compile(model, reporter=reporter,
                          reason=f"about {eager / 60:.0f} min of training left at the eager pace")

    def _compile(self, model, *, reporter, reason: str) -> None:  # noqa: ANN001
        import torch._dynamo

        from posttrain.trainer.forward import plain_head_parts

        torch._dynamo.config.suppress_errors = True  # a model that will not compile trains eagerly
        parts = plain_head_parts(model)
        body = parts[0] if parts is not None else (model.get_base_model() if hasattr(model, "get_base_model") else model)
        body.compile(dynamic=True)
        self.compiled = True
        reporter.log(f"compiling the model with torch.compile ({reason}); the next step includes the compile "
                     "time (a minute or two on a small CPU), the steps after it run faster")
