"""Connection limits uvicorn lacks: a time limit on a request's headers and on each pause in its
body, and a cap on the connections one client address holds.

uvicorn closes a connection idle *between* requests (``timeout_keep_alive``), but a connection
that never sends a request, sends its headers a byte at a time, or stops half-way through its
body was kept for ever: 1,100 idle connections made the server unreachable. ``limit_concurrency``
is one global number, so one client reaching it locks everyone out. This is uvicorn's own
httptools protocol with three timers and a per-address count, passed as ``http=`` to uvicorn;
all of it runs on the event loop's thread, so the count needs no lock.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from posttrain.services.access import address_key


@dataclass
class ConnectionLimits:
    header_seconds: float = 10.0
    body_idle_seconds: float = 30.0
    per_address: int | None = 64
    #: Open connections by client address (``address_key``), shared by every connection of a server.
    open: Counter[str] = field(default_factory=Counter)


def _over_cap_answer(cap: int) -> bytes:
    """429, not 503: the server is up; this one client address holds more than its share."""
    body = json.dumps({"status": 429, "title": "Too Many Requests",
                       "detail": f"this address already holds {cap} open connections to this server; "
                                 "close some or reuse them"}).encode()
    return (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/problem+json\r\nretry-after: 1\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, plus the limits of the class attribute ``limits``."""

    limits: ConnectionLimits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._address: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._in_body = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        address = address_key(self.client[0] if self.client else None)
        cap = self.limits.per_address
        if cap is not None and self.limits.open[address] >= cap:
            # Closed at once, not held until a timeout: each one held would cost a file descriptor.
            transport.write(_over_cap_answer(cap))
            transport.close()
            return
        self._address = address
        self.limits.open[address] += 1
        self._arm(self.limits.header_seconds)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._address is not None:
            self.limits.open[self._address] -= 1
            if self.limits.open[self._address] <= 0:
                del self.limits.open[self._address]
            self._address = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_body:
            self._arm(self.limits.body_idle_seconds)  # the body's clock restarts with each byte
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_body = True
        self._arm(self.limits.body_idle_seconds)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        if self.cycle is not None and self.cycle.response_complete:
            self._arm(self.limits.header_seconds)  # a refused body, read to its end: the next request's turn
        else:
            self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        waiting_request = bool(self.pipeline)
        super().on_response_complete()
        if not waiting_request and not self._in_body and not self.transport.is_closing():
            self._arm(self.limits.header_seconds)  # the next request's headers, from now

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._in_body and self.flow is not None and self.flow.read_paused:
            # The app has not read what came; the client is not the slow one.
            self._arm(self.limits.body_idle_seconds)
            return
        if not self.transport.is_closing():
            self.transport.close()


def limited_protocol(limits: ConnectionLimits) -> type[LimitedHttpToolsProtocol]:
    """The protocol class to hand uvicorn (``http=``), bound to one server's limits."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})
