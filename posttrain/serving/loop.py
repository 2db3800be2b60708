"""The engine thread both engines share: tickets in, commands applied, one step of generation per turn.

All model work happens on this one thread; the HTTP side only submits tickets and reads their
events (handed back to its event loop with ``call_soon_threadsafe``). Each turn applies what the
HTTP side asked (generate, forget a folder, stop), lets the engine admit what is waiting, and runs
one step of generation. ``engine.Engine`` (transformers) and ``vllm_engine.VllmEngine`` (vLLM)
fill in admission and the step; a failed step fails its requests, never the worker.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from posttrain.domain.serving import (
    GENERATION_FAILED,
    OVERLOADED,
    ErrorEvent,
    FinishedEvent,
    FinishReason,
    GenerationRequest,
    StreamEvent,
    TokenEvent,
)
from posttrain.serving.text import TextStream

log = logging.getLogger("posttrain.serving")

Emit = Callable[[StreamEvent | None], None]  #: thread-safe; None ends the stream


@dataclass
class Ticket:
    """One request in the engine: its events go to ``emit``; ``cancel`` is called when its reader leaves."""

    request: GenerationRequest
    emit: Emit
    rows_left: int = 0
    cancelled: bool = False
    done: bool = False
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled = True

    def end(self, event: StreamEvent | None = None) -> None:
        if self.done:
            return
        if event is not None:
            self.emit(event)
        self.emit(None)
        self.done = True


class EngineLoop:
    """The thread, its command queue, the waiting tickets and the published stats; subclasses generate."""

    name = ""  #: the engine's name in the stats ("transformers", "vllm")

    def __init__(self, *, max_batch: int, max_waiting: int) -> None:
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self._commands: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._waiting: deque[Ticket] = deque()
        self._forget_later: list[tuple[str, Future[bool]]] = []
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.cancelled_rows_total = 0  #: rows that left a batch early because their reader went away
        #: Forward passes (prefills and decode steps) whose rows used two or more adapters (the base
        #: alone counting as one), and the last such pass: the worker's own proof that it mixed them.
        self.mixed_adapter_steps_total = 0
        self.last_mixed_step: dict[str, Any] | None = None
        self._admitted: dict[int, Ticket] = {}  #: tickets that got "started" and have not ended

    # -- what an engine fills in ----------------------------------------------------------------
    def _busy(self) -> bool:
        """Rows are generating."""
        raise NotImplementedError

    def _admit(self) -> None:
        raise NotImplementedError

    def _step(self) -> None:
        raise NotImplementedError

    def _running_tickets(self) -> list[Ticket]:
        raise NotImplementedError

    def _drop_running(self) -> None:
        """Forget every running row (their tickets have been ended)."""
        raise NotImplementedError

    def _in_use(self, path: str) -> bool:
        raise NotImplementedError

    def _release(self, path: str) -> bool:
        """Unload the base or adapter at ``path``; whether anything was loaded."""
        raise NotImplementedError

    def _model_stats(self) -> dict[str, Any]:
        raise NotImplementedError

    def _active_rows(self) -> int:
        raise NotImplementedError

    def _close(self) -> None:
        """The loop has ended: free what the engine holds."""

    @contextmanager
    def _steps(self) -> Iterator[None]:
        yield

    # -- the HTTP side --------------------------------------------------------------------------
    def start(self) -> None:
        self._publish()
        self._thread = threading.Thread(target=self._run, name="serving-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._commands.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, request: GenerationRequest, emit: Emit) -> Ticket:
        ticket = Ticket(request=request, emit=emit)
        self._commands.put(("generate", ticket))
        return ticket

    def wake(self) -> None:
        """A ticket was cancelled: let an idle loop notice."""
        self._commands.put(("wake",))

    def forget(self, path: str) -> Future[bool]:
        done: Future[bool] = Future()
        self._commands.put(("forget", path, done))
        return done

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._snapshot)

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        with self._steps():
            while not self._stopping:
                self._take_commands(block=not self._busy() and not self._waiting)
                if self._stopping:
                    break
                try:
                    self._admit()
                    if self._busy():
                        self._step()
                except Exception as exc:  # a failed step fails its requests, never the worker
                    log.exception("generation failed", extra={"action": "serve_generation_failed"})
                    self._fail_running(str(exc))
                if not self._busy():
                    self._forget_deferred()
                self._publish()
        for ticket in list(self._waiting) + self._running_tickets():
            ticket.end(ErrorEvent(code=GENERATION_FAILED, message="the serving worker is stopping"))
        self._close()

    def _take_commands(self, *, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "stop":
            self._stopping = True
        elif kind == "generate":
            ticket: Ticket = command[1]
            if len(self._waiting) >= self.max_waiting:
                ticket.end(ErrorEvent(code=OVERLOADED, message="the serving worker has too many requests waiting"))
            else:
                self._waiting.append(ticket)
        elif kind == "forget":
            path, done = command[1], command[2]
            if self._in_use(path):
                self._forget_later.append((path, done))
            else:
                done.set_result(self._release(path))

    def _forget_deferred(self) -> None:
        for path, done in self._forget_later:
            done.set_result(self._release(path))
        self._forget_later.clear()

    def _fail_running(self, message: str) -> None:
        for ticket in self._running_tickets():
            ticket.end(ErrorEvent(code=GENERATION_FAILED, message=message))
        self._drop_running()

    def _refuse_first(self, exc: Exception) -> None:
        """The oldest waiting request cannot start: it alone ends, with the error's protocol code (``code``;
        anything unforeseen is ``generation_failed``), never failing the running batch."""
        ticket = self._waiting.popleft()
        code = getattr(exc, "code", None)
        if not isinstance(code, str):
            log.error("request could not start", exc_info=exc, extra={"action": "serve_generation_failed"})
            code = GENERATION_FAILED
        ticket.end(ErrorEvent(code=code, message=str(exc)))

    def _mark_admitted(self, ticket: Ticket) -> None:
        """Count ``ticket`` as active before its reader can see "started"."""
        self._admitted[id(ticket)] = ticket
        self._publish()

    def _publish(self) -> None:
        self._admitted = {key: t for key, t in self._admitted.items() if not t.done}
        tickets = {key for key, t in self._admitted.items() if not t.cancelled}
        tickets |= {id(t) for t in self._waiting if not t.cancelled}
        snapshot = self._model_stats()
        snapshot.update(engine=self.name, active_requests=len(tickets), active_rows=self._active_rows(),
                        waiting_requests=len(self._waiting), max_batch=self.max_batch,
                        cancelled_rows_total=self.cancelled_rows_total,
                        mixed_adapter_steps_total=self.mixed_adapter_steps_total,
                        last_mixed_step=self.last_mixed_step)
        with self._lock:
            self._snapshot = snapshot

    def _count_mix(self, base_path: str, adapter_paths: list[str | None]) -> None:
        """Count a forward pass over rows of ``adapter_paths`` (None: the base) that mixes adapters."""
        adapters = set(adapter_paths)
        if len(adapters) < 2:
            return
        self.mixed_adapter_steps_total += 1
        self.last_mixed_step = {"base_path": base_path, "adapter_paths": sorted(a for a in adapters if a is not None),
                                "base_rows": sum(a is None for a in adapter_paths), "rows": len(adapter_paths)}


class Choice(Protocol):
    """One generated choice of a ticket, as both engines keep it (``batch.Row``, ``vllm_engine.VllmChoice``)."""

    ticket: Ticket
    index: int
    text: TextStream
    eos_ids: frozenset[int]
    generated: int  #: tokens sampled so far, this one included
    max_tokens: int


def send_token(choice: Choice, token: int, logprob: float | None = None,
               top: tuple[tuple[str, float], ...] | None = None) -> bool:
    """Send what ``token`` adds to the choice's text (EOS, a stop string and ``max_tokens`` end it); False
    when the choice is finished."""
    ticket = choice.ticket
    if token in choice.eos_ids:
        rest = choice.text.flush()
        if rest:
            ticket.emit(TokenEvent(index=choice.index, text=rest, token_id=token))
        finish_choice(choice, "stop")
        return False
    piece, stopped = choice.text.push(token)
    finished = stopped or choice.generated >= choice.max_tokens
    if finished and not stopped:
        piece += choice.text.flush()
    ticket.emit(TokenEvent(index=choice.index, text=piece, token_id=token, logprob=logprob, top_logprobs=top))
    if finished:
        finish_choice(choice, "stop" if stopped else "length")
        return False
    return True


def finish_choice(choice: Choice, reason: FinishReason) -> None:
    """The choice is done; the ticket ends with its last choice."""
    ticket = choice.ticket
    ticket.emit(FinishedEvent(index=choice.index, finish_reason=reason, completion_tokens=choice.generated))
    ticket.rows_left -= 1
    if ticket.rows_left <= 0:
        ticket.end()
