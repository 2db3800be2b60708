"""The transformers engine: one running batch per base, decoded step by step with our own KV cache.

Each turn of the loop (``loop.EngineLoop``) admits what is waiting (same base as the running
batch, up to the batch size; the oldest request of another base stops admission, so the batch
drains and that base gets its turn), then runs one decode step. Rows whose reader went away leave
the batch at the next step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from posttrain.domain.serving import (
    GENERATION_FAILED,
    ErrorEvent,
    StartedEvent,
)
from posttrain.serving.batch import Batch, Row, adapter_name, can_join, decode_step, join, keep_rows, prefill, row_seed
from posttrain.serving.loop import EngineLoop, Ticket, send_token
from posttrain.serving.models import ModelStore, ModelUnloadable, NoRoom
from posttrain.serving.prompts import Tokenizers, TokenizerUnloadable, check_fits, prompt_ids
from posttrain.serving.sampling import log_probabilities, next_tokens
from posttrain.serving.text import TextStream

log = logging.getLogger("posttrain.serving")


class Engine(EngineLoop):
    """Owns the models (``models.ModelStore``) and the running batch; ``start`` runs it on its own thread."""

    name = "transformers"

    def __init__(self, *, memory_bytes: int, max_batch: int = 32, max_waiting: int = 1024, device: str = "cpu") -> None:
        super().__init__(max_batch=max_batch, max_waiting=max_waiting)
        self.models = ModelStore(memory_bytes, device=device)
        self._batch: Batch | None = None
        self._tokenizers = Tokenizers()

    # -- the loop's hooks -----------------------------------------------------------------------
    @contextmanager
    def _steps(self) -> Iterator[None]:
        import torch

        with torch.inference_mode():
            yield

    def _busy(self) -> bool:
        return self._batch is not None

    def _in_use(self, path: str) -> bool:
        batch = self._batch
        if batch is None:
            return False
        return path == batch.base.path or any(row.ticket.request.model.adapter_path == path for row in batch.rows)

    def _release(self, path: str) -> bool:
        self._tokenizers.forget(path)
        return self.models.forget(path)

    def _running_tickets(self) -> list[Ticket]:
        if self._batch is None:
            return []
        return list({id(row.ticket): row.ticket for row in self._batch.rows}.values())

    def _drop_running(self) -> None:
        self._batch = None

    def _model_stats(self) -> dict[str, Any]:
        return self.models.stats()

    def _active_rows(self) -> int:
        return len(self._batch.rows) if self._batch else 0

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
            except Exception as exc:  # noqa: BLE001 - unloadable, refused or unforeseen: it alone fails
                self._refuse_first(exc)
                continue
            self._waiting.popleft()
            ticket.rows_left = len(rows)
            self._mark_admitted(ticket)
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
        try:
            return self._tokenizers.get(path)
        except TokenizerUnloadable as exc:
            raise ModelUnloadable(str(exc)) from exc

    def _rows_for(self, ticket: Ticket, base: Any, adapter: str | None) -> list[Row]:
        request = ticket.request
        tokenizer = self._tokenizer(request.model.tokenizer_path)
        ids = prompt_ids(tokenizer, request)
        sampling = request.sampling
        check_fits(ids, sampling.max_tokens, base.max_positions)
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
        self._count_mix(base.path, [row.ticket.request.model.adapter_path for row in rows])
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
        self._count_mix(batch.base.path, [row.ticket.request.model.adapter_path for row in batch.rows])
        logits = decode_step(batch)
        keep = self._sampled(batch, logits)
        keep_rows(batch, keep)
        if not batch.rows:
            self._batch = None

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
        logprob, top = None, None
        if logprobs is not None:
            logprob = float(logprobs[token])
            count = row.ticket.request.sampling.top_logprobs
            if count:
                values, ids = logprobs.topk(min(count, logprobs.shape[-1]))
                tokenizer = self._tokenizer(row.ticket.request.model.tokenizer_path)
                top = tuple((str(tokenizer.decode([int(t)])), float(v)) for v, t in zip(values, ids, strict=True))
        return send_token(row, token, logprob, top)
