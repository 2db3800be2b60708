"""Incremental text for one generated row: what new text may be sent after each token.

Decoding token by token is wrong for byte-level BPE (a character can span tokens) and for stop
strings (a stop may arrive split over tokens, and nothing after it may ever be sent). So each row
decodes its running ids and sends only the new suffix, holding back a trailing incomplete UTF-8
character and any tail that could still become a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """The text of one row so far; ``push`` returns what may be sent now and whether a stop string ended it."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._sent = 0
        self.text = ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; returns (new text to send, True when a stop string was reached)."""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        cut = self._first_stop(text)
        if cut is not None:
            return self._send_to(text, max(cut, self._sent)), True
        end = len(text)
        if text.endswith(REPLACEMENT):  # an incomplete character: wait for its next bytes
            end = len(text.rstrip(REPLACEMENT))
        end -= self._partial_stop_tail(text[:end])
        return self._send_to(text, max(end, self._sent)), False

    def flush(self) -> str:
        """The row ended without a stop string: what was held back is sent after all."""
        text = self._decode(self._ids) if self._ids else ""
        return self._send_to(text, len(text))

    def _send_to(self, text: str, end: int) -> str:
        piece = text[self._sent:end]
        self._sent = end
        self.text = text[:end]
        return piece

    def _first_stop(self, text: str) -> int | None:
        if not self._stop:
            return None
        start = max(0, self._sent - self._longest_stop)
        found = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _partial_stop_tail(self, text: str) -> int:
        """Length of the longest tail of ``text`` (past what was sent) that begins some stop string."""
        room = len(text) - self._sent
        for length in range(min(self._longest_stop - 1, room), 0, -1):
            tail = text[-length:]
            if any(s.startswith(tail) for s in self._stop):
                return length
        return 0
