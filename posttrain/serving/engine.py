"""The engine thread: admits requests into one running batch per base and decodes it step by step.

All torch work happens on this one thread; the HTTP side only submits tickets and reads their
events (handed back to its event loop with ``call_soon_threadsafe``). Each loop admits what is
waiting (same base as the running batch, up to the batch size; the oldest request of another base
stops admission, so the batch drains and that base gets its turn), then runs one decode step.
Rows whose reader went away leave the batch at the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from posttrain.domain.serving import (
    BAD_REQUEST,
    GENERATION_FAILED,
    MODEL_UNLOADABLE,
    NO_CHAT_TEMPLATE,
    OVERLOADED,
    PROMPT_TOO_LONG,
    ErrorEvent,
    FinishedEvent,
    GenerationRequest,
    StartedEvent,
    StreamEvent,
    TokenEvent,
)
from posttrain.serving.batch import Batch, Row, adapter_name, can_join, decode_step, join, keep_rows, prefill, row_seed
from posttrain.serving.models import ModelStore, ModelUnloadable, NoRoom
from posttrain.serving.sampling import log_probabilities, next_tokens
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


class RequestRefused(Exception):
    """The request cannot run: the code is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Engine:
    """Owns the models and the running batch; ``start`` runs it on its own thread."""

    def __init__(self, *, memory_bytes: int, max_batch: int = 32, max_waiting: int = 1024, device: str = "cpu") -> None:
        self.models = ModelStore(memory_bytes, device=device)
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self._commands: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._waiting: deque[Ticket] = deque()
        self._batch: Batch | None = None
        self._tokenizers: OrderedDict[str, Any] = OrderedDict()
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
        self._publish()

    # -- the HTTP side --------------------------------------------------------------------------
    def start(self) -> None:
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
        import torch

        with torch.inference_mode():
            while not self._stopping:
                self._take_commands(block=self._batch is None and not self._waiting)
                if self._stopping:
                    break
                try:
                    self._admit()
                    if self._batch is not None:
                        self._step()
                except Exception as exc:  # a failed step fails its requests, never the worker
                    log.exception("generation failed", extra={"action": "serve_generation_failed"})
                    self._fail_batch(str(exc))
                if self._batch is None:
                    self._forget_deferred()
                self._publish()
        for ticket in list(self._waiting) + self._batch_tickets():
            ticket.end(ErrorEvent(code=GENERATION_FAILED, message="the serving worker is stopping"))

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
                self._tokenizers.pop(path, None)
                done.set_result(self.models.forget(path))

    def _in_use(self, path: str) -> bool:
        batch = self._batch
        if batch is None:
            return False
        return path == batch.base.path or any(row.ticket.request.model.adapter_path == path for row in batch.rows)

    def _forget_deferred(self) -> None:
        for path, done in self._forget_later:
            self._tokenizers.pop(path, None)
            done.set_result(self.models.forget(path))
        self._forget_later.clear()

    def _batch_tickets(self) -> list[Ticket]:
        if self._batch is None:
            return []
        return list({id(row.ticket): row.ticket for row in self._batch.rows}.values())

    def _publish(self) -> None:
        self._admitted = {key: t for key, t in self._admitted.items() if not t.done}
        tickets = {key for key, t in self._admitted.items() if not t.cancelled}
        tickets |= {id(t) for t in self._waiting if not t.cancelled}
        snapshot = self.models.stats()
        snapshot.update(active_requests=len(tickets), active_rows=len(self._batch.rows) if self._batch else 0,
                        waiting_requests=len(self._waiting), max_batch=self.max_batch,
                        cancelled_rows_total=self.cancelled_rows_total,
                        mixed_adapter_steps_total=self.mixed_adapter_steps_total,
                        last_mixed_step=self.last_mixed_step)
        with self._lock:
            self._snapshot = snapshot

    # -- admission ------------------------------------------------------------------------------
    def _admit(self) -> None:
        batch = self._batch
        if batch is not None and not can_join(batch.cache):
            return
        base_path = batch.base.path if batch is not None else None
        new_rows: list[Row] = []
        base = batch.base if batch is not None else None
        while self._waiting:
            ticket = self._waiting[0]
            if ticket.cancelled:
                self._waiting.popleft()
                ticket.end()
                continue
            model = ticket.request.model
            if base_path is not None and model.base_path != base_path:
                break  # another base's turn comes when this batch drains
            size = (len(batch.rows) if batch is not None else 0) + len(new_rows)
            if size and size + ticket.request.sampling.n > self.max_batch:
                break
            pinned = self._pinned(new_rows)
            try:
                base, adapter = self.models.get(model.base_path, model.adapter_path, pinned)
                rows = self._rows_for(ticket, base, adapter)
            except NoRoom:
                break
            except ModelUnloadable as exc:
                self._waiting.popleft()
                ticket.end(ErrorEvent(code=MODEL_UNLOADABLE, message=str(exc)))
                continue
            except RequestRefused as exc:
                self._waiting.popleft()
                ticket.end(ErrorEvent(code=exc.code, message=str(exc)))
                continue
            except Exception as exc:  # anything else fails this request alone, never the running batch
                log.exception("request could not start", extra={"action": "serve_generation_failed"})
                self._waiting.popleft()
                ticket.end(ErrorEvent(code=GENERATION_FAILED, message=str(exc)))
                continue
            self._waiting.popleft()
            ticket.rows_left = len(rows)
            self._admitted[id(ticket)] = ticket
            self._publish()  # counted as active before its reader can see "started"
            ticket.emit(StartedEvent(prompt_tokens=len(rows[0].prompt_ids)))
            new_rows.extend(rows)
            base_path = model.base_path
        if new_rows and base is not None:
            try:
                self._start_rows(base, new_rows)
            except Exception as exc:  # a failed prefill fails only the requests it was starting
                log.exception("prefill failed", extra={"action": "serve_generation_failed"})
                for ticket in {id(row.ticket): row.ticket for row in new_rows}.values():
                    ticket.end(ErrorEvent(code=GENERATION_FAILED, message=str(exc)))

    def _pinned(self, new_rows: list[Row]) -> set[str]:
        rows = (self._batch.rows if self._batch is not None else []) + new_rows
        pinned = {row.ticket.request.model.base_path for row in rows}
        pinned |= {row.ticket.request.model.adapter_path for row in rows if row.ticket.request.model.adapter_path}
        return pinned

    def _tokenizer(self, path: str) -> Any:
        tokenizer = self._tokenizers.get(path)
        if tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except Exception as exc:  # the folder's fault, reported to the client
                raise ModelUnloadable(f"cannot load the tokenizer at {path}: {exc}") from exc
            self._tokenizers[path] = tokenizer
            while len(self._tokenizers) > 16:
                self._tokenizers.popitem(last=False)
        self._tokenizers.move_to_end(path)
        return tokenizer

    def _rows_for(self, ticket: Ticket, base: Any, adapter: str | None) -> list[Row]:
        request = ticket.request
        tokenizer = self._tokenizer(request.model.tokenizer_path)
        if request.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise RequestRefused(NO_CHAT_TEMPLATE, f"the model {request.model.id!r} has no chat template; "
                                     "use the completions endpoint with a plain prompt")
            try:
                text = tokenizer.apply_chat_template(list(request.messages), tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # a template that rejects these messages
                raise RequestRefused(BAD_REQUEST, f"the chat template cannot render these messages: {exc}") from exc
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids = list(tokenizer(request.prompt or "")["input_ids"])
        if not ids:
            if tokenizer.bos_token_id is None:
                raise RequestRefused(BAD_REQUEST, "the prompt is empty")
            ids = [tokenizer.bos_token_id]
        sampling = request.sampling
        limit = base.max_positions
        if limit is not None and len(ids) + sampling.max_tokens > limit:
            raise RequestRefused(PROMPT_TOO_LONG, f"the prompt has {len(ids)} tokens and max_tokens is "
                                 f"{sampling.max_tokens}, more than the model's {limit} positions")
        eos = set(base.eos_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)

        def decode(token_ids: Any) -> str:
            return str(tokenizer.decode(token_ids, skip_special_tokens=True))

        return [Row(ticket=ticket, index=i, prompt_ids=ids, adapter=adapter_name(adapter),
                    temperature=sampling.temperature, top_p=sampling.top_p, seed=row_seed(sampling.seed, i),
                    max_tokens=sampling.max_tokens, text=TextStream(decode, sampling.stop), eos_ids=frozenset(eos))
                for i in range(sampling.n)]

    def _start_rows(self, base: Any, rows: list[Row]) -> None:
        tokenizer = self._tokenizer(rows[0].ticket.request.model.tokenizer_path)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self._count_mix(base.path, rows)
        new, logits = prefill(base, rows, pad)
        keep = self._sampled(new, logits)
        keep_rows(new, keep)
        if not new.rows:
            return
        if self._batch is None:
            self._batch = new
        else:
            join(self._batch, new)

    # -- decoding -------------------------------------------------------------------------------
    def _step(self) -> None:
        batch = self._batch
        assert batch is not None
        live = [i for i, row in enumerate(batch.rows) if not row.ticket.cancelled]
        self._drop_cancelled(batch)
        keep_rows(batch, live)
        if not batch.rows:
            self._batch = None
            return
        self._count_mix(batch.base.path, batch.rows)
        logits = decode_step(batch)
        keep = self._sampled(batch, logits)
        keep_rows(batch, keep)
        if not batch.rows:
            self._batch = None

    def _count_mix(self, base_path: str, rows: list[Row]) -> None:
        """Count a forward pass over ``rows`` that mixes adapters (the base alone is one of them)."""
        adapters = {row.ticket.request.model.adapter_path for row in rows}
        if len(adapters) < 2:
            return
        self.mixed_adapter_steps_total += 1
        self.last_mixed_step = {"base_path": base_path, "adapter_paths": sorted(a for a in adapters if a is not None),
                                "base_rows": sum(row.ticket.request.model.adapter_path is None for row in rows),
                                "rows": len(rows)}

    def _drop_cancelled(self, batch: Batch) -> None:
        for row in batch.rows:
            if row.ticket.cancelled:
                self.cancelled_rows_total += 1
                row.ticket.end()

    def _sampled(self, batch: Batch, logits: Any) -> list[int]:
        """Sample each row's next token, send its events; returns the rows that go on."""
        import torch

        rows = batch.rows
        tokens = next_tokens(logits, rows)
        wants_logprobs = [row.ticket.request.sampling.logprobs for row in rows]
        logprobs = log_probabilities(logits) if any(wants_logprobs) else None
        batch.last = torch.tensor(tokens, dtype=torch.long, device=logits.device)
        keep: list[int] = []
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            row.generated += 1
            if row.ticket.cancelled:
                self.cancelled_rows_total += 1
                row.ticket.end()
                continue
            if self._emit_token(row, token, logprobs[i] if logprobs is not None and wants_logprobs[i] else None):
                keep.append(i)
        return keep

    def _emit_token(self, row: Row, token: int, logprobs: Any) -> bool:
        """Send what ``token`` adds to the row's text; False when the row is finished."""
        ticket = row.ticket
        if token in row.eos_ids:
            rest = row.text.flush()
            if rest:
                ticket.emit(TokenEvent(index=row.index, text=rest, token_id=token))
            self._finish(row, "stop")
            return False
        piece, stopped = row.text.push(token)
        finished = stopped or row.generated >= row.max_tokens
        if finished and not stopped:
            piece += row.text.flush()
        logprob, top = None, None
        if logprobs is not None:
            logprob = float(logprobs[token])
            count = ticket.request.sampling.top_logprobs
            if count:
                values, ids = logprobs.topk(min(count, logprobs.shape[-1]))
                tokenizer = self._tokenizer(ticket.request.model.tokenizer_path)
                top = tuple((str(tokenizer.decode([int(t)])), float(v)) for v, t in zip(values, ids, strict=True))
        ticket.emit(TokenEvent(index=row.index, text=piece, token_id=token, logprob=logprob, top_logprobs=top))
        if finished:
            self._finish(row, "stop" if stopped else "length")
            return False
        return True

    def _finish(self, row: Row, reason: str) -> None:
        ticket = row.ticket
        ticket.emit(FinishedEvent(index=row.index, finish_reason="stop" if reason == "stop" else "length",
                                  completion_tokens=row.generated))
        ticket.rows_left -= 1
        if ticket.rows_left <= 0:
            ticket.end()

    def _fail_batch(self, message: str) -> None:
        for ticket in self._batch_tickets():
            ticket.end(ErrorEvent(code=GENERATION_FAILED, message=message))
        self._batch = None
