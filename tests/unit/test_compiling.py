"""When ``compile=auto`` compiles: only when the training left, at the eager pace, is long."""

from __future__ import annotations

import pytest

from posttrain.trainer.compiling import AUTO_MIN_REMAINING_SECONDS, Compiler, should_compile


def test_a_long_run_is_compiled_and_a_short_one_is_not():
    steps = [9.0, 1.0, 1.2, 0.8]  # the first step is slow and does not count: median 1.0 s
    assert should_compile(steps, steps_left=int(AUTO_MIN_REMAINING_SECONDS) + 1)
    assert not should_compile(steps, steps_left=int(AUTO_MIN_REMAINING_SECONDS) - 100)
    assert not should_compile([], steps_left=10**9)


def test_modes_are_checked():
    assert Compiler(None).mode == "auto" and Compiler("ON").mode == "on"
    with pytest.raises(ValueError, match="auto, on, off"):
        Compiler("sometimes")


class _Log:
    def __init__(self):
        self.lines = []

    def log(self, message, level="info"):
        self.lines.append(message)


def test_auto_decides_once_after_timing_its_steps():
    import torch

    model = torch.nn.Linear(4, 4)
    compiler, reporter = Compiler("auto"), _Log()
    for _ in range(3):
        compiler.after_step(model, step_seconds=10.0, steps_left=1000, reporter=reporter)
    assert not compiler.compiled  # still timing
    compiler.after_step(model, step_seconds=10.0, steps_left=1000, reporter=reporter)
    assert compiler.compiled and "about 167 min of training left" in reporter.lines[0]
    off = Compiler("off")
    for _ in range(10):
        off.after_step(model, step_seconds=10.0, steps_left=10**6, reporter=reporter)
    assert not off.compiled
