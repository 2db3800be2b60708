"""Request bodies of ``POST /v1/chat/completions`` and ``POST /v1/completions``, as OpenAI defines them.

Closed schemas (an unknown field is a 400 naming it), with OpenAI's own names and ranges, plus the
bounds this server adds so one request cannot hold the serving worker for long (``max_tokens``,
``n``, stop strings, prompts). Fields of OpenAI's schema that this engine cannot honour are declared
so they can be refused by name: each may be sent only with its neutral value (``tools: []``,
``presence_penalty: 0``, ``response_format: {"type": "text"}``, ...); anything else is a 400 that
names the field. Nothing is silently ignored. A few harmless hints are accepted and have no effect
here: ``user``, ``metadata`` (echoed back), ``store: false``, ``safety_identifier``,
``prompt_cache_key``, ``service_tier`` "auto"/"default".

Completions' ``prompt`` is a string or a list of strings (each its own set of ``n`` choices, indexed
``prompt_index * n + j`` as OpenAI does); token-id prompts are refused (the tokenizer lives in the
serving worker).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

from posttrain.errors import InvalidRequest

#: The most tokens one choice may generate (a larger ``max_tokens`` is refused, not capped).
MAX_COMPLETION_TOKENS = 4096
#: What ``max_tokens`` means when it is left out: OpenAI's 16 for completions; for chat, enough for
#: a reply (OpenAI uses the model's whole context).
DEFAULT_CHAT_MAX_TOKENS, DEFAULT_COMPLETION_MAX_TOKENS = 256, 16
#: The most choices one request may ask for (``n``, times the prompts of a completions list).
MAX_CHOICES = 16
#: Bounds on the conversation and the prompt (the body limit bounds their total size too).
MAX_MESSAGES, MAX_PROMPTS = 1024, MAX_CHOICES
#: The most characters of text a request may carry (its messages, or its prompts, together): far
#: past any served model's context, small enough that checking it never stalls the event loop.
MAX_TEXT_CHARS = 1_000_000
MAX_STOPS, MAX_STOP_CHARS = 4, 256
MAX_TOP_LOGPROBS, MAX_COMPLETION_LOGPROBS = 20, 5
MAX_MODEL_ID, MAX_HINT = 512, 512
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


class Refused(InvalidRequest):
    """A request refused for one of its fields, named as OpenAI's ``param``."""

    def __init__(self, param: str, reason: str, *, code: str | None = None) -> None:
        super().__init__(f"{param}: {reason}")
        self.param, self.code = param, code


Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


def _unsupported(message: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported", message)


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _same(value: Any, neutral: Any) -> bool:
    """Equal and of the same kind (0 and 0.0 are the same; False and 0 are not)."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    if isinstance(value, int | float) and isinstance(neutral, int | float):
        return value == neutral
    return type(value) is type(neutral) and value == neutral


def _neutral(value: Any, neutral: tuple[Any, ...], why: str) -> Any:
    """``value`` if it is one of the values that ask for nothing (None, 0, [], ...), else a refusal."""
    if value is None or any(_same(value, n) for n in neutral):
        return value
    raise _unsupported(why)


def _token_limit(value: int | None) -> int | None:
    if value is not None and not 1 <= value <= MAX_COMPLETION_TOKENS:
        raise PydanticCustomError("bound", f"must be between 1 and {MAX_COMPLETION_TOKENS}")
    return value


class TextPart(_Closed):
    """A text content part; the only kind this server reads (no images, audio or files)."""

    type: Literal["text"]
    text: Text


def _content_parts(value: Any) -> Any:
    """Refuse a non-text content part by its type, before the schema reports its unknown fields."""
    if isinstance(value, list):
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise _unsupported(f"content parts of type {kind!r} are not supported: this server reads text only")
    return value


class ChatMessage(_Closed):
    """One message of the conversation: system, developer, user or assistant, with text content."""

    role: str
    content: Text | list[TextPart] | None = None
    name: str | None = Field(None, max_length=64)
    refusal: Any = None
    tool_calls: Any = None
    function_call: Any = None
    audio: Any = None

    @field_validator("role")
    @classmethod
    def _role(cls, role: str) -> str:
        if role in ("tool", "function"):
            raise _unsupported(f"{role} messages are not supported: this server does not call tools")
        if role not in ("system", "developer", "user", "assistant"):
            raise PydanticCustomError("role", "must be one of system, developer, user, assistant")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, value: Any) -> Any:
        return _content_parts(value)

    @field_validator("content")
    @classmethod
    def _some_parts(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise PydanticCustomError("empty", "must hold at least one content part")
        return value

    @field_validator("tool_calls", "function_call", "audio", "refusal")
    @classmethod
    def _no_tools(cls, value: Any) -> Any:
        return _neutral(value, ([],), "not supported: this server does not call tools or produce audio")

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None:
            raise PydanticCustomError("missing", f"a {self.role} message needs content")
        return self

    @property
    def text(self) -> str:
        """The content as one string (text parts joined, as OpenAI concatenates them)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content or ())


class StreamOptions(_Closed):
    include_usage: StrictBool | None = None
    include_obfuscation: StrictBool | None = None

    @field_validator("include_obfuscation")
    @classmethod
    def _no_obfuscation(cls, value: bool | None) -> bool | None:
        if value:
            raise _unsupported("stream obfuscation is not supported; send false or leave it out")
        return value


Stop = str | list[str] | None
MaxTokens = StrictInt | None
Probability = StrictFloat | StrictInt | None


class _Sampling(_Closed):
    """What both endpoints share: the model, sampling, stop strings, streaming, and the refused extras."""

    model: str = Field(min_length=1, max_length=MAX_MODEL_ID)
    max_tokens: MaxTokens = Field(None, description=f"1 to {MAX_COMPLETION_TOKENS}")
    temperature: Probability = Field(None, ge=0, le=2, description="0 (greedy) to 2; default 1")
    top_p: Probability = Field(None, ge=0, le=1, description="nucleus sampling mass; 0 means greedy")
    stop: Stop = Field(None, description=f"a string or up to {MAX_STOPS} strings; the text ends before the first")
    seed: StrictInt | None = Field(None, description="same seed and request -> same text")
    n: StrictInt | None = Field(None, ge=1, le=MAX_CHOICES, description=f"choices to generate, 1 to {MAX_CHOICES}")
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=MAX_HINT, description="accepted; no effect here")
    frequency_penalty: Probability = None
    presence_penalty: Probability = None
    logit_bias: dict[str, Any] | None = None

    @field_validator("max_tokens")
    @classmethod
    def _bounded(cls, value: int | None) -> int | None:
        return _token_limit(value)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: Stop) -> Stop:
        stops = [value] if isinstance(value, str) else value or []
        if isinstance(value, list) and not 1 <= len(value) <= MAX_STOPS:
            raise PydanticCustomError("stops", f"must hold 1 to {MAX_STOPS} strings")
        for stop in stops:
            if not 1 <= len(stop) <= MAX_STOP_CHARS:
                raise PydanticCustomError("stop", f"each stop string must be 1 to {MAX_STOP_CHARS} characters")
        return value

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        return _neutral(value, (0,), "not supported by this server's engine; send 0 or leave it out")

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _neutral(value, ({},), "not supported by this server's engine; leave it out")

    def check(self) -> None:
        """The rules between fields, refused with the field they name (``param``)."""
        if self.stream_options is not None and not self.stream:
            raise Refused("stream_options", "only allowed when stream is true")

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CreateChatCompletion(_Sampling):
    """OpenAI's ``CreateChatCompletionRequest``, less what this server refuses by name."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: MaxTokens = Field(None, description=f"1 to {MAX_COMPLETION_TOKENS}; max_tokens' new name")
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    metadata: dict[str, str] | None = Field(None, description="accepted and echoed back; no effect here")
    store: StrictBool | None = None
    safety_identifier: str | None = Field(None, max_length=MAX_HINT)
    prompt_cache_key: str | None = Field(None, max_length=MAX_HINT)
    service_tier: str | None = None
    # Refused unless neutral: this engine generates text from text, nothing else.
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    moderation: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _bounded_too(cls, value: int | None) -> int | None:
        return _token_limit(value)

    @field_validator("messages", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise PydanticCustomError("empty", "must hold at least one message")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (len(value) > MAX_METADATA_KEYS or any(
                len(k) > MAX_METADATA_KEY or len(v) > MAX_METADATA_VALUE for k, v in value.items())):
            raise PydanticCustomError("metadata", f"at most {MAX_METADATA_KEYS} keys of {MAX_METADATA_KEY} "
                                      f"characters, values of {MAX_METADATA_VALUE}")
        return value

    @field_validator("store")
    @classmethod
    def _not_stored(cls, value: bool | None) -> bool | None:
        if value:
            raise _unsupported("stored chat completions are not supported; send false or leave it out")
        return value

    @field_validator("service_tier")
    @classmethod
    def _tier(cls, value: str | None) -> str | None:
        return _neutral(value, ("auto", "default"), "only 'auto' or 'default' (this server has one tier)")

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: Any) -> Any:
        return _neutral(value, ([],), "not supported: this server does not call tools")

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: Any) -> Any:
        return _neutral(value, ("none",), "not supported: this server does not call tools (only 'none')")

    @field_validator("parallel_tool_calls")
    @classmethod
    def _no_parallel_tools(cls, value: Any) -> Any:
        return _neutral(value, (False,), "not supported: this server does not call tools")

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        return _neutral(value, ({"type": "text"},), "only {\"type\": \"text\"}: this server cannot constrain "
                        "the output to JSON or a schema")

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, value: Any) -> Any:
        return _neutral(value, (["text"],), "only [\"text\"]: this server does not produce audio")

    @field_validator("audio", "prediction", "web_search_options", "reasoning_effort", "verbosity", "moderation",
                     "prompt_cache_retention", "prompt_cache_options")
    @classmethod
    def _none_only(cls, value: Any) -> Any:
        return _neutral(value, (), "not supported by this server; leave it out")

    def check(self) -> None:
        super().check()
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise Refused("max_tokens", "max_tokens and max_completion_tokens differ; send one of them")
        if self.top_logprobs and not self.logprobs:
            raise Refused("top_logprobs", "logprobs must be true to ask for top_logprobs")
        if sum(len(m.text) for m in self.messages) > MAX_TEXT_CHARS:
            raise Refused("messages", f"the messages hold more than {MAX_TEXT_CHARS} characters", code="too_long")

    @property
    def token_limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_CHAT_MAX_TOKENS


class CreateCompletion(_Sampling):
    """OpenAI's ``CreateCompletionRequest`` (the legacy text completions), less what is refused by name."""

    prompt: Text | list[Text] = Field(description=f"a string, or a list of up to {MAX_PROMPTS} strings")
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: StrictBool | None = None
    best_of: StrictInt | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and all(isinstance(p, int | list) for p in value):
            raise _unsupported("token-id prompts are not supported: send the prompt as text")
        if isinstance(value, list) and not 1 <= len(value) <= MAX_PROMPTS:
            raise PydanticCustomError("prompts", f"must hold 1 to {MAX_PROMPTS} prompts")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        return _neutral(value, (False,), "not supported by this server; send false or leave it out")

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        return _neutral(value, (1,), "only 1: this server does not rank candidates")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        return _neutral(value, ("",), "not supported: this server does not insert text")

    def check(self) -> None:
        super().check()
        if sum(len(p) for p in self.prompts) > MAX_TEXT_CHARS:
            raise Refused("prompt", f"the prompts hold more than {MAX_TEXT_CHARS} characters", code="too_long")
        if len(self.prompts) * (self.n or 1) > MAX_CHOICES:
            raise Refused("n", f"the prompts times n must be at most {MAX_CHOICES} choices")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def token_limit(self) -> int:
        return self.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
