"""The trainer's own exceptions, one root, each carrying the failure code its ``failed`` event reports.

``__main__`` turns any exception into exactly one ``failed`` event; an exception raised on purpose
here says which ``FailureCode`` it stands for, so the mapping is declared where the error is, not
guessed from class names at the top.
"""

from __future__ import annotations

from typing import ClassVar

from posttrain.domain.protocol import FailureCode


class TrainerError(Exception):
    """A failure the trainer recognises; ``code`` is the token its ``failed`` event carries."""

    code: ClassVar[FailureCode] = FailureCode.ERROR


class TrainerConfigError(TrainerError, ValueError):
    """The training or algorithm config cannot be applied to this model."""

    code: ClassVar[FailureCode] = FailureCode.INVALID_CONFIG


class CheckpointWriteError(TrainerError, OSError):
    """A checkpoint could not be written (the disk is full, say); the earlier ones are untouched.
    An ``OSError`` too, with the errno of the write that failed."""

    code: ClassVar[FailureCode] = FailureCode.DISK_FULL


class PathChangedError(TrainerError):
    """A folder the server checked and pinned at submit (model, adapter, output folder) was
    swapped since (a link, another folder, an entry leading elsewhere); nothing was read from or
    written to it."""

    code: ClassVar[FailureCode] = FailureCode.PATH_CHANGED


class CheckpointRefusedError(TrainerError):
    """A checkpoint's ``training_state.pt`` holds more than tensors and plain data (a crafted
    pickle, or a file from before the RNG states were saved as plain data): it is not loaded, since
    loading it could run code, and the resume fails instead."""

    code: ClassVar[FailureCode] = FailureCode.CHECKPOINT_REFUSED
