"""The API <-> serving worker protocol, typed: what to generate, with what, and the events that stream back.

The serving worker (``python -m posttrain.serving``) takes a :class:`GenerationRequest` as JSON on
``POST /generate`` and answers one JSON object per line (NDJSON): a :class:`StartedEvent` (or an
:class:`ErrorEvent` when the request cannot run), then :class:`TokenEvent` s and one
:class:`FinishedEvent` per choice. Both ends use the classes here, so a field renamed on one side
is renamed on the other. The wire stays plain JSON (lists for tuples), so any client can read it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

#: The error codes a request can be refused with before it starts, and the one it can end with later.
NO_CHAT_TEMPLATE = "no_chat_template"
PROMPT_TOO_LONG = "prompt_too_long"
MODEL_UNLOADABLE = "model_unloadable"
OVERLOADED = "overloaded"
GENERATION_FAILED = "generation_failed"
BAD_REQUEST = "bad_request"

FinishReason = Literal["stop", "length"]


class ServingProtocolError(ValueError):
    """A body or stream line that is not what the protocol says (a field missing or of the wrong type)."""


def _str(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise ServingProtocolError(f"{key!r} must be a string")
    return value


def _opt_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise ServingProtocolError(f"{key!r} must be a string or null")
    return value


def _int(body: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ServingProtocolError(f"{key!r} must be an integer")
    return value


def _float(body: Mapping[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ServingProtocolError(f"{key!r} must be a finite number")
    return float(value)


def _bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise ServingProtocolError(f"{key!r} must be true or false")
    return value


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ServingProtocolError(f"{what} must be a JSON object")
    return value


@dataclass(frozen=True)
class ServedModel:
    """What a public model id resolves to; built by services.model_catalog, read by the serving worker."""

    id: str  #: public id: a base name, "ft:<base>:<suffix>:<job>", "...:ckpt-step-<n>", or a checkpoint identifier
    base_path: str  #: absolute folder of the base weights (config.json)
    adapter_path: str | None  #: absolute LoRA adapter folder, None for a base or a full fine-tune
    tokenizer_path: str  #: folder whose tokenizer/chat template to use (the checkpoint's if it holds one)
    owned_by: str  #: "system" for bases, else the tenant
    created: int  #: unix seconds

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "base_path": self.base_path, "adapter_path": self.adapter_path,
                "tokenizer_path": self.tokenizer_path, "owned_by": self.owned_by, "created": self.created}

    @classmethod
    def from_json(cls, body: Any) -> ServedModel:
        body = _mapping(body, "model")
        return cls(id=_str(body, "id"), base_path=_str(body, "base_path"), adapter_path=_opt_str(body, "adapter_path"),
                   tokenizer_path=_str(body, "tokenizer_path"), owned_by=_str(body, "owned_by"),
                   created=_int(body, "created"))


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; the API has already capped ``max_tokens`` and checked the ranges."""

    max_tokens: int  #: >= 1
    temperature: float = 1.0  #: 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None  #: same seed + same request -> same text, whatever else is in the batch
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "stop": list(self.stop), "seed": self.seed, "n": self.n, "logprobs": self.logprobs,
                "top_logprobs": self.top_logprobs}

    @classmethod
    def from_json(cls, body: Any) -> SamplingParams:
        body = _mapping(body, "sampling")
        stop = body.get("stop", [])
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise ServingProtocolError("'stop' must be a list of strings")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ServingProtocolError("'seed' must be an integer or null")
        params = cls(max_tokens=_int(body, "max_tokens"), temperature=_float(body, "temperature", 1.0),
                     top_p=_float(body, "top_p", 1.0), stop=tuple(stop), seed=seed, n=_int(body, "n", 1),
                     logprobs=_bool(body, "logprobs", False), top_logprobs=_int(body, "top_logprobs", 0))
        params.check()
        return params

    def check(self) -> None:
        """The ranges the worker relies on (the API checks them first, with its own messages)."""
        if self.max_tokens < 1:
            raise ServingProtocolError("'max_tokens' must be at least 1")
        if self.temperature < 0:
            raise ServingProtocolError("'temperature' must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ServingProtocolError("'top_p' must be in (0, 1]")
        if self.n < 1:
            raise ServingProtocolError("'n' must be at least 1")
        if self.top_logprobs < 0:
            raise ServingProtocolError("'top_logprobs' must be >= 0")
        if any(not s for s in self.stop):
            raise ServingProtocolError("a stop string must not be empty")


@dataclass(frozen=True)
class GenerationRequest:
    """One request to the worker: chat ``messages`` (rendered with the tokenizer's chat template) or a raw ``prompt``."""

    model: ServedModel
    sampling: SamplingParams
    messages: tuple[dict[str, Any], ...] | None = None  #: chat, rendered with apply_chat_template(add_generation_prompt=True)
    prompt: str | None = None  #: completions: exactly one of messages / prompt

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ServingProtocolError("exactly one of 'messages' and 'prompt' must be given")

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model.to_json(), "sampling": self.sampling.to_json(),
                "messages": None if self.messages is None else [dict(m) for m in self.messages],
                "prompt": self.prompt}

    @classmethod
    def from_json(cls, body: Any) -> GenerationRequest:
        body = _mapping(body, "request")
        messages = body.get("messages")
        if messages is not None:
            if not isinstance(messages, (list, tuple)):
                raise ServingProtocolError("'messages' must be a list of objects")
            messages = tuple(dict(_mapping(m, "a message")) for m in messages)
        return cls(model=ServedModel.from_json(body.get("model")), sampling=SamplingParams.from_json(body.get("sampling")),
                   messages=messages, prompt=_opt_str(body, "prompt"))


@dataclass(frozen=True)
class StreamEvent:
    """One NDJSON line of a generation stream; subclasses name their ``type``."""

    type: ClassVar[str] = ""

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class StartedEvent(StreamEvent):
    """Always first when the request is accepted: the prompt is tokenized and the rows are in the queue."""

    type: ClassVar[str] = "started"
    prompt_tokens: int

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "prompt_tokens": self.prompt_tokens}


@dataclass(frozen=True)
class TokenEvent(StreamEvent):
    """One sampled token of choice ``index``; ``text`` is the newly decoded text (may be "" mid-UTF-8 or stop prefix)."""

    type: ClassVar[str] = "token"
    index: int
    text: str
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[str, float], ...] | None = None

    def to_json(self) -> dict[str, Any]:
        top = None if self.top_logprobs is None else [[text, _json_float(lp)] for text, lp in self.top_logprobs]
        return {"type": self.type, "index": self.index, "text": self.text, "token_id": self.token_id,
                "logprob": None if self.logprob is None else _json_float(self.logprob), "top_logprobs": top}


@dataclass(frozen=True)
class FinishedEvent(StreamEvent):
    """Choice ``index`` is done: "stop" (EOS or a stop string) or "length" (max_tokens reached)."""

    type: ClassVar[str] = "finished"
    index: int
    finish_reason: FinishReason
    completion_tokens: int

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "index": self.index, "finish_reason": self.finish_reason,
                "completion_tokens": self.completion_tokens}


@dataclass(frozen=True)
class ErrorEvent(StreamEvent):
    """Instead of "started" when the request cannot run, or at any time later (``generation_failed``)."""

    type: ClassVar[str] = "error"
    code: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "code": self.code, "message": self.message}


def _json_float(value: float) -> float:
    """-inf (a token the filter ruled out) is not JSON: it travels as the most negative float."""
    if math.isnan(value):
        return -1e30
    return max(value, -1e30)


def parse_event(body: Any) -> StreamEvent:
    """One decoded NDJSON line as its typed event; raises ServingProtocolError on anything else."""
    body = _mapping(body, "an event")
    kind = body.get("type")
    if kind == StartedEvent.type:
        return StartedEvent(prompt_tokens=_int(body, "prompt_tokens"))
    if kind == TokenEvent.type:
        logprob = body.get("logprob")
        if logprob is not None:
            logprob = _float(body, "logprob", 0.0)
        raw_top = body.get("top_logprobs")
        top: tuple[tuple[str, float], ...] | None = None
        if raw_top is not None:
            if not isinstance(raw_top, list):
                raise ServingProtocolError("'top_logprobs' must be a list of [text, logprob] pairs")
            pairs = []
            for pair in raw_top:
                if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str)
                        or not isinstance(pair[1], (int, float)) or isinstance(pair[1], bool)):
                    raise ServingProtocolError("'top_logprobs' must be a list of [text, logprob] pairs")
                pairs.append((pair[0], float(pair[1])))
            top = tuple(pairs)
        return TokenEvent(index=_int(body, "index"), text=_str(body, "text"), token_id=_int(body, "token_id"),
                          logprob=logprob, top_logprobs=top)
    if kind == FinishedEvent.type:
        reason = body.get("finish_reason")
        if reason not in ("stop", "length"):
            raise ServingProtocolError("'finish_reason' must be 'stop' or 'length'")
        return FinishedEvent(index=_int(body, "index"), finish_reason=reason,
                             completion_tokens=_int(body, "completion_tokens"))
    if kind == ErrorEvent.type:
        return ErrorEvent(code=_str(body, "code"), message=_str(body, "message"))
    raise ServingProtocolError(f"unknown event type {kind!r}")
