"""Every trainer failure maps to its protocol code through the exception's type, not its name."""

from __future__ import annotations

import errno

import pytest

from posttrain.domain.protocol import FailureCode
from posttrain.trainer.__main__ import _failure_code
from posttrain.trainer.errors import CheckpointWriteError, TrainerConfigError, TrainerError
from posttrain.trainer.formats import RowFormatError


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (TrainerConfigError("bad dtype"), FailureCode.INVALID_CONFIG),
        (CheckpointWriteError(errno.ENOSPC, "no space"), FailureCode.DISK_FULL),
        (RowFormatError("no columns", row_index=3), FailureCode.BAD_ROW),
        (MemoryError(), FailureCode.OUT_OF_MEMORY),
        (ValueError("something else"), FailureCode.ERROR),
        # A class merely named like one of ours is not one of ours.
        (type("CheckpointWriteError", (OSError,), {})(errno.ENOSPC, "x"), FailureCode.ERROR),
    ],
)
def test_failure_codes(exc, code):
    assert _failure_code(exc) is code


def test_torch_out_of_memory_is_out_of_memory():
    import torch

    assert _failure_code(torch.OutOfMemoryError("CUDA out of memory")) is FailureCode.OUT_OF_MEMORY


def test_error_classes_keep_their_standard_bases():
    """Code that catches OSError (a failed resume point) or ValueError still catches them."""
    full = CheckpointWriteError(errno.ENOSPC, "no space left")
    assert isinstance(full, OSError) and isinstance(full, TrainerError) and full.errno == errno.ENOSPC
    assert isinstance(TrainerConfigError("x"), ValueError)
