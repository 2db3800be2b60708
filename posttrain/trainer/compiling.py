"""Compiling the model with ``torch.compile`` when a run is long enough to pay for it.

Compiled steps are faster (inductor fuses the norms, rotary embeddings, activations, softmax and
casts that surround the matmuls; the figures are in docs/performance.md). Compiling is not free, and
it would wreck the time to the first step. So ``auto`` (the default) trains eagerly, times the first steps, and
compiles only when the training still ahead, at the eager pace, is longer than
``AUTO_MIN_REMAINING_SECONDS``. ``on`` compiles before the first step, ``off`` never.

What is compiled is each decoder layer, in place (``Module.compile``, "regional compilation"):
the layers share one code object, so dynamo traces and inductor builds the layer once (twice:
the first layer's input needs no gradient) and every other layer reuses it: a fraction of the cost
of compiling the whole body, for the same speed. A model without recognisable layers
has its body compiled whole. Dynamic shapes, so rows of any length reuse one graph; the state
dict keeps its names (checkpoints are unchanged); the output head stays eager (it runs on label
positions only). Should compiling fail (no C++ compiler, an unsupported model), dynamo falls back
to eager rather than failing the job.
"""

from __future__ import annotations

import statistics

from posttrain.trainer.forward import base_model, plain_head_parts

MODES = ("auto", "on", "off")
#: ``auto`` compiles when the eager estimate of the remaining training is at least this long: longer
#: than a cold compile takes to pay for itself (docs/performance.md).
AUTO_MIN_REMAINING_SECONDS = 5 * 60
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

    def start(self, model, *, reporter) -> None:
        if self.mode == "on":
            self._compile(model, reporter=reporter, reason="compile=on")

    def after_step(self, model, *, step_seconds: float, steps_left: int, reporter) -> None:
        if self.mode != "auto" or self.compiled or len(self._step_seconds) >= AUTO_TIMED_STEPS:
            return
        self._step_seconds.append(step_seconds)
        if len(self._step_seconds) == AUTO_TIMED_STEPS and should_compile(self._step_seconds, steps_left=steps_left):
            eager = statistics.median(self._step_seconds[1:]) * steps_left
            self._compile(model, reporter=reporter,
                          reason=f"about {eager / 60:.0f} min of training left at the eager pace")

    def _compile(self, model, *, reporter, reason: str) -> None:
        import torch._dynamo

        if activation_checkpointed(model):
            self.mode = "off"
            reporter.log(f"not compiling the model ({reason}): activation checkpointing is on, and torch.compile "
                         "does not trace through transformers' checkpointed layers; the job trains eagerly")
            return
        torch._dynamo.config.suppress_errors = True  # a model that will not compile trains eagerly
        layers = decoder_layers(model)
        if layers:
            for layer in layers:
                layer.compile(dynamic=True)
            what = f"its {len(layers)} {type(layers[0]).__name__} layers"
        else:
            parts = plain_head_parts(model)
            body = parts[0] if parts is not None else base_model(model)
            body.compile(dynamic=True)
            what = "its body"
        self.compiled = True
        reporter.log(f"compiling the model ({what}) with torch.compile ({reason}); the next step includes the "
                     "compile time (under a minute on a small CPU), the steps after it run faster")


def activation_checkpointed(model) -> bool:
    """True when any of the model's layers recomputes its activations in the backward. Dynamo
    captures next to nothing of such a layer (measured: no graph), so compiling it only costs time."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def decoder_layers(model) -> list:
    """The model's repeated transformer blocks: the modules of the classes transformers names in
    ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``), found through a peft wrapper; empty when the
    model names none."""
    base = base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [module for module in base.modules() if type(module).__name__ in names]
