"""OpenAI's inference API: ``POST /v1/chat/completions`` and ``POST /v1/completions``.

A thin translator: the body (``openai_inference_schemas``) becomes a ``GenerationRequest`` for the
model the catalogue resolves for the caller's tenant; the serving worker's events come back as
OpenAI's ``chat.completion`` / ``text_completion`` objects, or, with ``stream: true``, as their
chunks in server-sent events ended by ``data: [DONE]``, as the ``openai`` SDK's stream parser reads
them. No generation runs in this process.

The answer waits for the worker's first event, so a request the worker refuses (no chat template,
a prompt past the context, an unloadable model, a full queue) is a 4xx, not a 200 stream that
breaks. A client that goes away mid-stream closes the worker's stream, which frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from posttrain import __version__
from posttrain.api.deps import TenantDep
from posttrain.api.json_body import StrictJSONRequest
from posttrain.api.openai_inference_schemas import CreateChatCompletion, CreateCompletion, Refused
from posttrain.api.problems import openai_error
from posttrain.domain.serving import (
    BAD_REQUEST,
    MODEL_UNLOADABLE,
    NO_CHAT_TEMPLATE,
    OVERLOADED,
    PROMPT_TOO_LONG,
    ErrorEvent,
    FinishedEvent,
    GenerationRequest,
    SamplingParams,
    ServedModel,
    StartedEvent,
    StreamEvent,
    TokenEvent,
)
from posttrain.errors import RateLimited, ServiceError
from posttrain.services.serving import ServingUnavailable

log = logging.getLogger("posttrain.api")

#: Sent as ``system_fingerprint``: the same server release samples the same way for a seed.
FINGERPRINT = f"fp_posttrain_{__version__}"
#: How often a handler generating a plain (non-streamed) answer checks that its client is still there.
DISCONNECT_POLL_SECONDS = 0.1


class StrictOnLoopRoute(APIRoute):
    """A route whose body is parsed strictly (``json_body``), but whose handler always runs on the
    server's event loop: the serving client's connections and the stream it returns belong there
    (``StrictJSONRoute`` moves big bodies' handlers to a loop of their own)."""

    def get_route_handler(self):  # noqa: ANN201 - Starlette's handler type
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler


router = APIRouter(tags=["OpenAI Inference"], route_class=StrictOnLoopRoute)


class Catalog(Protocol):
    def resolve(self, tenant: str, model_id: str) -> ServedModel: ...


class Serving(Protocol):
    def generate(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]: ...


class InferenceServices(Protocol):
    """What these routes use of the app's services: the catalogue and the serving client."""

    @property
    def models(self) -> Catalog: ...

    @property
    def serving(self) -> Serving: ...


@dataclass(frozen=True)
class _AppServices:
    models: Catalog
    serving: Serving


def _services(request: Request) -> InferenceServices:
    """The catalogue and the serving client the app was built with (``app.state``)."""
    return _AppServices(models=request.app.state.models, serving=request.app.state.serving)


ServicesDep = Annotated[InferenceServices, Depends(_services)]


class ServingOverloaded(RateLimited):
    """The serving worker's queue is full; try again shortly."""

    code = "server_overloaded"


class ServingFailed(ServiceError):
    """The serving worker could not generate this request; try again shortly."""

    status_code = 503
    title = "Service Unavailable"
    code = "generation_failed"
    retry_after = 2


def refusal(event: ErrorEvent, *, text_param: str) -> ServiceError:
    """What a worker's refusal of a request is to the client (its status, param and code)."""
    if event.code == NO_CHAT_TEMPLATE:
        return Refused(text_param, event.message, code=NO_CHAT_TEMPLATE)
    if event.code == PROMPT_TOO_LONG:
        return Refused(text_param, event.message, code="context_length_exceeded")
    if event.code == MODEL_UNLOADABLE:
        return Refused("model", event.message, code=MODEL_UNLOADABLE)
    if event.code == BAD_REQUEST:
        return Refused(text_param, event.message)
    if event.code == OVERLOADED:
        return ServingOverloaded(event.message, retry_after=1)
    return ServingFailed(event.message)


def sampling(body: CreateChatCompletion | CreateCompletion, *, logprobs: bool, top_logprobs: int) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    top_p = 1.0 if body.top_p is None else float(body.top_p)
    if top_p == 0:  # only the likeliest token: greedy decoding
        temperature, top_p = 0.0, 1.0
    return SamplingParams(max_tokens=body.token_limit, temperature=temperature, top_p=top_p, stop=body.stops,
                          seed=body.seed, n=body.n or 1, logprobs=logprobs, top_logprobs=top_logprobs)


def chat_messages(body: CreateChatCompletion) -> tuple[dict[str, Any], ...]:
    """The conversation as the chat template reads it: text content; ``developer`` is a system
    message (as OpenAI treats it), since few templates know the role."""
    messages = []
    for message in body.messages:
        rendered: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                    "content": message.text}
        if message.name:
            rendered["name"] = message.name
        messages.append(rendered)
    return tuple(messages)


@dataclass
class Generation:
    """One worker stream whose first event said it started; ``offset`` shifts its choice indices."""

    prompt_tokens: int
    events: AsyncIterator[StreamEvent]
    offset: int = 0


async def start(serving: Serving, request: GenerationRequest, *, text_param: str, offset: int = 0) -> Generation:
    """Open a worker stream and wait for its first event: a refusal is raised here, before any answer."""
    events = serving.generate(request)
    try:
        first = await anext(events)
    except StopAsyncIteration:
        raise ServingFailed("the serving worker ended the stream before starting") from None
    except ServingUnavailable as exc:
        raise ServingFailed(f"the serving worker is not available: {exc}") from None
    if isinstance(first, StartedEvent):
        return Generation(first.prompt_tokens, events, offset)
    with suppress(Exception):
        await _close(events)
    if isinstance(first, ErrorEvent):
        raise refusal(first, text_param=text_param)
    raise ServingFailed(f"the serving worker answered {type(first).__name__} before starting")


async def _close(events: AsyncIterator[StreamEvent]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()


async def start_all(serving: Serving, requests: list[GenerationRequest], *, text_param: str,
                    per_request: int) -> list[Generation]:
    """``start`` each request (concurrently); if one is refused, the others are closed."""
    results = await asyncio.gather(*(start(serving, r, text_param=text_param, offset=i * per_request)
                                     for i, r in enumerate(requests)), return_exceptions=True)
    started = [r for r in results if isinstance(r, Generation)]
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        for generation in started:
            with suppress(Exception):
                await _close(generation.events)
        raise failed[0]
    return started


async def merged(generations: list[Generation]) -> AsyncIterator[StreamEvent]:
    """The events of every stream as one, choice indices shifted by each stream's offset; closing
    this closes every worker stream."""
    if len(generations) == 1 and generations[0].offset == 0:
        try:
            async for event in generations[0].events:
                yield event
        finally:
            await _close(generations[0].events)
        return
    queue: asyncio.Queue[StreamEvent | None] = asyncio.Queue()

    async def pump(generation: Generation) -> None:
        try:
            async for event in generation.events:
                await queue.put(_shifted(event, generation.offset))
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(g)) for g in generations]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            yield item
        for task in tasks:
            task.result()  # a stream that failed (not one that ended) fails the whole
    finally:
        for task in tasks:
            task.cancel()
        for generation in generations:
            with suppress(Exception):
                await _close(generation.events)


def _shifted(event: StreamEvent, offset: int) -> StreamEvent:
    if isinstance(event, TokenEvent):
        return TokenEvent(index=event.index + offset, text=event.text, token_id=event.token_id,
                          logprob=event.logprob, top_logprobs=event.top_logprobs)
    if isinstance(event, FinishedEvent):
        return FinishedEvent(index=event.index + offset, finish_reason=event.finish_reason,
                             completion_tokens=event.completion_tokens)
    return event


@dataclass
class Choice:
    text: list[str] = field(default_factory=list)
    tokens: list[TokenEvent] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Answer:
    """What a finished generation gathered, choice by choice."""

    prompt_tokens: int
    choices: dict[int, Choice] = field(default_factory=dict)

    def add(self, event: StreamEvent) -> None:
        if isinstance(event, TokenEvent):
            choice = self.choices.setdefault(event.index, Choice())
            choice.text.append(event.text)
            choice.tokens.append(event)
        elif isinstance(event, FinishedEvent):
            choice = self.choices.setdefault(event.index, Choice())
            choice.finish_reason, choice.completion_tokens = event.finish_reason, event.completion_tokens
        elif isinstance(event, ErrorEvent):
            raise ServingFailed(f"generation failed: {event.message}")

    def usage(self) -> dict[str, int]:
        completion = sum(c.completion_tokens for c in self.choices.values())
        return usage(self.prompt_tokens, completion)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", "surrogatepass"))


def chat_logprob(event: TokenEvent) -> dict[str, Any]:
    """One token's entry of a chat choice's ``logprobs.content`` (``ChatCompletionTokenLogprob``)."""
    top = [{"token": text, "logprob": lp, "bytes": _token_bytes(text)} for text, lp in event.top_logprobs or ()]
    return {"token": event.text, "logprob": event.logprob if event.logprob is not None else 0.0,
            "bytes": _token_bytes(event.text), "top_logprobs": top}


def completion_logprobs(tokens: list[TokenEvent], *, start: int, top: bool) -> dict[str, Any]:
    """A completions choice's ``logprobs`` (``tokens``, ``token_logprobs``, ``top_logprobs``,
    ``text_offset`` counted from the start of the prompt, as OpenAI counts it)."""
    offsets, at = [], start
    for token in tokens:
        offsets.append(at)
        at += len(token.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top_logprobs or ()) for t in tokens] if top else None, "text_offset": offsets}


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _stream_error(message: str, code: str) -> bytes:
    """A failure after the 200 went out: OpenAI's error object as an event (the SDK raises it)."""
    return _sse(openai_error(503, f"generation failed: {message}", code=code))


async def sse_stream(events: AsyncIterator[StreamEvent], chunks: ChunkWriter) -> AsyncIterator[bytes]:
    """The SSE body: the writer's chunks for each event, then the usage chunk and ``[DONE]``. A
    client that goes away cancels this generator; its ``finally`` closes the worker streams."""
    try:
        for chunk in chunks.opening():
            yield _sse(chunk)
        try:
            async for event in events:
                if isinstance(event, ErrorEvent):
                    yield _stream_error(event.message, event.code)
                    return
                for chunk in chunks.on(event):
                    yield _sse(chunk)
        except Exception as exc:
            log.error("serving stream failed", exc_info=exc, extra={"action": "serving_stream_failed"})
            yield _stream_error("the serving worker stopped answering", "generation_failed")
            return
        for chunk in chunks.closing():
            yield _sse(chunk)
        yield DONE
    finally:
        await _close(events)


class ChunkWriter:
    """Turns worker events into one endpoint's stream chunks; ``opening`` and ``closing`` frame them."""

    def __init__(self, *, object_name: str, id_: str, model: str, prompt_tokens: int, include_usage: bool) -> None:
        self.object_name, self.id, self.model = object_name, id_, model
        self.created = int(time.time())
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        self.include_usage = include_usage

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "object": self.object_name, "created": self.created,
                                "model": self.model, "system_fingerprint": FINGERPRINT, "choices": choices}
        if self.include_usage:
            body["usage"] = None
        return body

    def opening(self) -> Iterator[dict[str, Any]]:
        return iter(())

    def on(self, event: StreamEvent) -> Iterator[dict[str, Any]]:
        if isinstance(event, FinishedEvent):
            self.completion_tokens += event.completion_tokens
        return iter(())

    def closing(self) -> Iterator[dict[str, Any]]:
        if self.include_usage:
            yield {**self.chunk([]), "usage": usage(self.prompt_tokens, self.completion_tokens)}


class ChatChunks(ChunkWriter):
    def __init__(self, *, choices: int, logprobs: bool, **kwargs: Any) -> None:
        super().__init__(object_name="chat.completion.chunk", **kwargs)
        self.choices, self.logprobs = choices, logprobs

    def opening(self) -> Iterator[dict[str, Any]]:
        for index in range(self.choices):
            yield self.chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}])

    def on(self, event: StreamEvent) -> Iterator[dict[str, Any]]:
        super().on(event)
        if isinstance(event, TokenEvent) and (event.text or self.logprobs):
            logprobs = {"content": [chat_logprob(event)], "refusal": None} if self.logprobs else None
            yield self.chunk([{"index": event.index, "delta": {"content": event.text}, "logprobs": logprobs,
                               "finish_reason": None}])
        elif isinstance(event, FinishedEvent):
            yield self.chunk([{"index": event.index, "delta": {}, "logprobs": None,
                               "finish_reason": event.finish_reason}])


class CompletionChunks(ChunkWriter):
    def __init__(self, *, logprobs: int | None, prompt_chars: dict[int, int], **kwargs: Any) -> None:
        super().__init__(object_name="text_completion", **kwargs)
        self.logprobs, self.offsets = logprobs, dict(prompt_chars)

    def on(self, event: StreamEvent) -> Iterator[dict[str, Any]]:
        super().on(event)
        if isinstance(event, TokenEvent) and (event.text or self.logprobs is not None):
            logprobs = None
            if self.logprobs is not None:
                start = self.offsets.get(event.index, 0)
                logprobs = completion_logprobs([event], start=start, top=self.logprobs > 0)
                self.offsets[event.index] = start + len(event.text)
            yield self.chunk([{"index": event.index, "text": event.text, "logprobs": logprobs,
                               "finish_reason": None}])
        elif isinstance(event, FinishedEvent):
            yield self.chunk([{"index": event.index, "text": "", "logprobs": None,
                               "finish_reason": event.finish_reason}])


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def _resolve(catalog: Catalog, tenant: str, model_id: str) -> ServedModel:
    """The catalogue reads the store and the data folder: off the event loop."""
    return await run_in_threadpool(catalog.resolve, tenant, model_id)


@router.post("/v1/chat/completions", response_model=None, summary="Create a chat completion")
async def create_chat_completion(body: CreateChatCompletion, tenant: TenantDep,
                                 services: ServicesDep, request: Request) -> Response:
    """``messages`` rendered with the model's chat template, answered as a ``chat.completion``
    (or, with ``stream: true``, ``chat.completion.chunk`` events)."""
    body.check()
    model = await _resolve(services.models, tenant, body.model)
    params = sampling(body, logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs or 0)
    wanted = GenerationRequest(model=model, sampling=params, messages=chat_messages(body))
    generation = await start(services.serving, wanted, text_param="messages")
    events, id_ = merged([generation]), _new_id("chatcmpl")
    if body.stream:
        chunks = ChatChunks(choices=params.n, logprobs=params.logprobs, id_=id_, model=model.id,
                            prompt_tokens=generation.prompt_tokens, include_usage=body.include_usage)
        return StreamingResponse(sse_stream(events, chunks), media_type="text/event-stream", headers=SSE_HEADERS)
    answer = await gather(events, generation.prompt_tokens, request)
    choices = []
    for index in range(params.n):
        choice = answer.choices.get(index, Choice())
        logprobs = ({"content": [chat_logprob(t) for t in choice.tokens], "refusal": None}
                    if params.logprobs else None)
        choices.append({"index": index, "message": {"role": "assistant", "content": "".join(choice.text),
                                                    "refusal": None, "annotations": []},
                        "logprobs": logprobs, "finish_reason": choice.finish_reason or "stop"})
    return JSONResponse({"id": id_, "object": "chat.completion", "created": int(time.time()), "model": model.id,
                         "system_fingerprint": FINGERPRINT, "service_tier": "default", "choices": choices,
                         "usage": answer.usage(), **({"metadata": body.metadata} if body.metadata else {})})


@router.post("/v1/completions", response_model=None, summary="Create a completion")
async def create_completion(body: CreateCompletion, tenant: TenantDep, services: ServicesDep,
                            request: Request) -> Response:
    """``prompt`` (a string, or a list of them) continued as it is, answered as a ``text_completion``
    (or, with ``stream: true``, its chunks)."""
    body.check()
    model = await _resolve(services.models, tenant, body.model)
    params = sampling(body, logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0)
    prompts = body.prompts
    generations = await start_all(services.serving, [GenerationRequest(model=model, sampling=params, prompt=p) for p in prompts],
                                  text_param="prompt", per_request=params.n)
    prompt_tokens = sum(g.prompt_tokens for g in generations)
    prompt_chars = {i * params.n + j: len(p) for i, p in enumerate(prompts) for j in range(params.n)}
    events, id_ = merged(generations), _new_id("cmpl")
    if body.stream:
        chunks = CompletionChunks(logprobs=body.logprobs, prompt_chars=prompt_chars, id_=id_, model=model.id,
                                  prompt_tokens=prompt_tokens, include_usage=body.include_usage)
        return StreamingResponse(sse_stream(events, chunks), media_type="text/event-stream", headers=SSE_HEADERS)
    answer = await gather(events, prompt_tokens, request)
    choices = []
    for index in range(len(prompts) * params.n):
        choice = answer.choices.get(index, Choice())
        logprobs = (completion_logprobs(choice.tokens, start=prompt_chars[index], top=bool(body.logprobs))
                    if body.logprobs is not None else None)
        choices.append({"index": index, "text": "".join(choice.text), "logprobs": logprobs,
                        "finish_reason": choice.finish_reason or "stop"})
    return JSONResponse({"id": id_, "object": "text_completion", "created": int(time.time()), "model": model.id,
                         "system_fingerprint": FINGERPRINT, "choices": choices, "usage": answer.usage()})


async def gather(events: AsyncIterator[StreamEvent], prompt_tokens: int, request: Request) -> Answer:
    """Every event of a non-streamed answer. Nothing reads from a client that waits for a plain
    answer, so the server would not notice it leave: this asks every ``DISCONNECT_POLL_SECONDS``,
    and a client gone stops the generation (the ``finally`` closes the worker streams, whose rows
    leave the batch). What was generated by then is returned, to nobody."""
    answer = Answer(prompt_tokens)

    async def collect() -> None:
        async for event in events:
            answer.add(event)

    collector = asyncio.ensure_future(collect())
    try:
        while not collector.done():
            await asyncio.wait({collector}, timeout=DISCONNECT_POLL_SECONDS)
            if not collector.done() and await request.is_disconnected():
                collector.cancel()
                break
        if not collector.cancelled():
            collector.result()
    finally:
        if not collector.done():
            collector.cancel()
        await _close(events)
    return answer
