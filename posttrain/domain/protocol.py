"""The launcher <-> trainer protocol, typed: the events a trainer reports and why a job failed.

The trainer (``python -m posttrain.trainer SPEC.json``) writes one JSON object per line on its
stdout, ``{"event": <kind>, ...fields}`` (docs/trainer-protocol.md). Both ends use the classes
here: the trainer's reporter encodes them, the launcher decodes them, so a field renamed on one
side is renamed on the other, and the failure codes a job can end with are declared once.
The JSON on the wire stays flat, as it always was.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


class FailureCode(str, enum.Enum):
    """Why a job failed: the stable token in the job's ``error_code`` and its ``failed`` event.

    The trainer reports the first six, ``checkpoint_refused`` and ``path_changed`` (which the launcher reports too, when it
    refuses to start a trainer on a swapped folder); the store assigns ``trainer_lost`` and ``worker_lost`` when a job runs out of
    attempts (its trainer, or the worker running it, was lost too often).
    """

    BAD_ROW = "bad_row"  #: a dataset row fits no known layout (the message names the row)
    DISK_FULL = "disk_full"  #: a checkpoint could not be written for lack of space
    OUT_OF_MEMORY = "out_of_memory"  #: the host or the GPU ran out of memory
    INVALID_CONFIG = "invalid_config"  #: the recipe cannot be applied to this model
    USAGE = "usage"  #: the trainer was started without a spec file
    ERROR = "error"  #: anything else (the message says what)
    PATH_CHANGED = "path_changed"  #: a folder checked at submit was swapped (a link, another folder) before use
    CHECKPOINT_REFUSED = "checkpoint_refused"  #: a resume's training state held more than tensors and plain data
    TRAINER_LOST = "trainer_lost"  #: the trainer exited without finishing, attempts used up
    WORKER_LOST = "worker_lost"  #: the worker holding the job stopped renewing its lease, attempts used up


class ProtocolError(ValueError):
    """A stdout line that is not a protocol event (the launcher keeps it as a log line)."""


def _finite(value: Any) -> Any:
    """NaN and infinities are not JSON: they travel as null rather than break the parser."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


@dataclass(frozen=True)
class TrainerEvent:
    """One line of the protocol. Subclasses name their ``kind``; fields they do not declare travel
    in ``extra`` (a method's own metrics, such as DPO's rewards) and are flat on the wire."""

    kind: ClassVar[str] = ""
    #: Fields left off the wire when they are None (their absence means something).
    omitted_when_none: ClassVar[frozenset[str]] = frozenset()
    extra: Mapping[str, Any] = field(default_factory=dict, kw_only=True)

    def to_line(self) -> str:
        body = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "extra" and not (f.name in self.omitted_when_none and getattr(self, f.name) is None)}
        payload = {"event": self.kind, **_finite(body), **_finite(dict(self.extra))}
        return json.dumps(payload, allow_nan=False)

    def to_dict(self) -> dict[str, Any]:
        """The event's fields, flat, as the job's event log stores them (without ``event``)."""
        line: dict[str, Any] = json.loads(self.to_line())
        line.pop("event")
        return line


@dataclass(frozen=True)
class Started(TrainerEvent):
    """The model and rows are loaded; the first step comes next."""

    kind: ClassVar[str] = "started"
    resources: Mapping[str, Any]
    total_steps: int
    resumed_from: str | None = None


#: The token-accuracy and validation metrics OpenAI's fine-tuning API reports, beyond a loss:
#: optional on ``StepMetric`` and ``CheckpointWritten`` (absent from the wire when None, so older
#: trainers and launchers read and write the same lines). A token accuracy is the fraction of label
#: tokens whose most likely next token (argmax of the logits) is the label.
STEP_METRICS = ("train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy")
CHECKPOINT_METRICS = ("train_mean_token_accuracy", "valid_mean_token_accuracy", "full_valid_loss",
                      "full_valid_mean_token_accuracy")


@dataclass(frozen=True)
class StepMetric(TrainerEvent):
    """One optimizer step. ``tokens_per_s`` counts real (non-padding) tokens. ``loss`` is the step's
    train loss; ``valid_*`` are on one validation batch, on the steps that ran one (``STEP_METRICS``)."""

    kind: ClassVar[str] = "metric"
    omitted_when_none: ClassVar[frozenset[str]] = frozenset(STEP_METRICS)
    step: int
    epoch: int
    loss: float | None
    lr: float
    tokens_per_s: float
    tokens: int
    padding_fraction: float
    step_seconds: float
    total_steps: int
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None


@dataclass(frozen=True)
class CheckpointWritten(TrainerEvent):
    """An epoch's checkpoint folder is complete on disk (also re-sent for those found on resume,
    without ``write_seconds``: nothing was written). ``validation_loss`` is on a sample of the
    validation rows (OpenAI's ``valid_loss``), ``full_valid_*`` on all of them; the token accuracies
    are ``CHECKPOINT_METRICS``, None where a method or an older checkpoint has none."""

    kind: ClassVar[str] = "checkpoint"
    omitted_when_none: ClassVar[frozenset[str]] = frozenset({"write_seconds", *CHECKPOINT_METRICS})
    identifier: str
    epoch: int
    step: int
    path: str
    train_loss: float | None
    validation_loss: float | None
    perplexity: float | None
    write_seconds: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None

    def token_metrics(self) -> dict[str, float]:
        """The ``CHECKPOINT_METRICS`` this checkpoint has (finite values only), for its stored event."""
        return {name: value for name in CHECKPOINT_METRICS
                if isinstance(value := getattr(self, name), float) and math.isfinite(value)}


@dataclass(frozen=True)
class LogLine(TrainerEvent):
    kind: ClassVar[str] = "log"
    message: str
    level: str = "info"


@dataclass(frozen=True)
class Completed(TrainerEvent):
    kind: ClassVar[str] = "completed"


@dataclass(frozen=True)
class Cancelled(TrainerEvent):
    kind: ClassVar[str] = "cancelled"


@dataclass(frozen=True)
class Paused(TrainerEvent):
    """Stopped on a pause request (SIGUSR1) at a step boundary, after writing what a resumed run
    continues from: a resume point after ``step`` (``resume_point`` is its label,
    ``<job>-epoch-<E>-step-<S>``), or nothing new when the epoch had just begun (``resume_point``
    is null: the newest epoch checkpoint, or the start, already is that place)."""

    kind: ClassVar[str] = "paused"
    step: int
    resume_point: str | None = None


@dataclass(frozen=True)
class Failed(TrainerEvent):
    kind: ClassVar[str] = "failed"
    code: FailureCode
    message: str

    def to_line(self) -> str:
        return json.dumps({"event": self.kind, "code": self.code.value, "message": self.message, **self.extra})


AnyEvent = Started | StepMetric | CheckpointWritten | LogLine | Completed | Cancelled | Paused | Failed
TERMINAL_EVENTS = (Completed, Cancelled, Paused, Failed)
_KINDS: dict[str, type[TrainerEvent]] = {
    cls.kind: cls for cls in (Started, StepMetric, CheckpointWritten, LogLine, Completed, Cancelled, Paused, Failed)
}


def parse_line(raw: bytes | str) -> AnyEvent:
    """One stdout line as its event; ``ProtocolError`` when it is not one (library chatter that
    escaped, a truncated line, an unknown kind or a missing field)."""
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("event"), str):
        raise ProtocolError("not a protocol event (no 'event' name)")
    cls = _KINDS.get(payload.pop("event"))
    if cls is None:
        raise ProtocolError("unknown event kind")
    declared = {f.name for f in fields(cls)} - {"extra"}
    known = {name: payload.pop(name) for name in list(payload) if name in declared}
    try:
        if cls is Failed:
            code = known.get("code")
            known["code"] = FailureCode(code) if code in {c.value for c in FailureCode} else FailureCode.ERROR
        event = cls(**known, extra=payload)
    except TypeError as exc:
        raise ProtocolError(f"bad {cls.kind} event: {exc}") from None
    return event  # type: ignore[return-value]


__all__ = [
    "CHECKPOINT_METRICS",
    "STEP_METRICS",
    "TERMINAL_EVENTS",
    "AnyEvent",
    "Cancelled",
    "CheckpointWritten",
    "Completed",
    "Failed",
    "FailureCode",
    "LogLine",
    "Paused",
    "ProtocolError",
    "Started",
    "StepMetric",
    "TrainerEvent",
    "parse_line",
]
