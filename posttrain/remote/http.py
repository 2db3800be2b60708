"""A small HTTP client for the posttrain server, used by the ``datasets`` and ``jobs`` commands.

Where: ``--url`` / ``POSTTRAIN_URL`` (default ``http://127.0.0.1:8321``); who: ``--api-key`` /
``POSTTRAIN_API_KEY``, sent as ``Authorization: Bearer <key>``. Every refusal the server sends is
an RFC 7807 body ``{status, title, detail}``; it becomes an ``ApiError`` whose text is one line.
A server that cannot be reached becomes a ``ServerUnreachable`` that names the URL.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8321"
URL_ENV = "POSTTRAIN_URL"
API_KEY_ENV = "POSTTRAIN_API_KEY"
TERMINAL = frozenset({"completed", "failed", "cancelled"})


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class RemoteError(Exception):
    """Anything that went wrong talking to the server."""


class ApiError(RemoteError):
    """The server refused or failed a request (an RFC 7807 body, or whatever it sent instead)."""

    def __init__(self, status: int, title: str, detail: str, *, method: str = "", path: str = "") -> None:
        self.status, self.title, self.detail = status, title, detail
        self.method, self.path = method, path
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" ({self.method} {self.path})" if self.method else ""
        return _one_line(f"{self.status} {self.title}: {self.detail}{where}")

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        from http import HTTPStatus

        try:
            phrase = HTTPStatus(response.status_code).phrase
        except ValueError:
            phrase = "Error"
        title, detail = phrase, ""
        try:
            body = response.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        if isinstance(body, dict) and ("detail" in body or "title" in body):
            title = str(body.get("title") or phrase)
            raw = body.get("detail")
            detail = raw if isinstance(raw, str) else json.dumps(raw) if raw is not None else ""
        elif isinstance(body, dict) and isinstance(body.get("error"), dict):  # OpenAI's envelope (/v1/models)
            detail = str(body["error"].get("message") or "")
        else:
            detail = response.text or "(empty body)"
        request = response.request
        return cls(response.status_code, title, _one_line(detail), method=request.method, path=request.url.path)


class ServerUnreachable(RemoteError):
    """No answer from the server (refused, unknown host, timed out, connection dropped)."""


def resolve(url: str | None, api_key: str | None) -> tuple[str, str | None]:
    """The server URL and API key: explicit values first, then the environment, then the default."""
    base = (url or os.environ.get(URL_ENV) or DEFAULT_URL).strip().rstrip("/")
    if "://" not in base:
        base = "http://" + base
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    return base, key


@dataclass
class Client:
    base_url: str
    api_key: str | None = None
    timeout: float = 30.0
    transport: httpx.BaseTransport | None = None  # tests hand in an httpx.MockTransport

    def __post_init__(self) -> None:
        headers = {"User-Agent": "posttrain-cli", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=self.timeout,
                                  transport=self.transport)

    @classmethod
    def from_options(cls, url: str | None = None, api_key: str | None = None) -> Client:
        base, key = resolve(url, api_key)
        return cls(base, key)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- plain requests ------------------------------------------------------------------------

    def _unreachable(self, exc: httpx.HTTPError) -> ServerUnreachable:
        if isinstance(exc, httpx.TimeoutException):
            reason = f"no answer within {self.timeout:g} s ({type(exc).__name__})"
        else:
            reason = _one_line(str(exc) or type(exc).__name__)
        return ServerUnreachable(f"cannot reach the posttrain server at {self.base_url}: {reason} "
                                 f"(set --url or {URL_ENV})")

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            error = ApiError.from_response(response)
            if error.status == 401:
                error.detail += f" (give an API key with --api-key or {API_KEY_ENV})"
            raise error
        return response

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON body of a successful answer (None when it has none)."""
        response = self.request(method, path, **kwargs)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise ApiError(response.status_code, "Unexpected answer",
                           f"not JSON: {_one_line(response.text, 120)}", method=method, path=path) from exc

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params={k: v for k, v in params.items() if v is not None} or None)

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
        return self.call("POST", path, json=body, headers=headers)

    def delete(self, path: str) -> Any:
        return self.call("DELETE", path)

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed answer (a download), read with ``iter_bytes``; ``self.timeout`` bounds each read."""
        try:
            with self._http.stream(method, path, timeout=httpx.Timeout(30.0, read=self.timeout), **kwargs) as response:
                yield response
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise self._unreachable(exc) from exc

    # -- job events ----------------------------------------------------------------------------

    EVENTS = "/v1/post-training/job/events"

    def events_page(self, job_uuid: str, after: int = 0, limit: int = 1000) -> dict[str, Any]:
        return self.get(self.EVENTS, job_uuid=job_uuid, after=after, limit=limit)

    def all_events(self, job_uuid: str) -> tuple[str, list[dict[str, Any]]]:
        """Every event the job has so far, and its status."""
        events, cursor, status = [], 0, "unknown"
        while True:
            page = self.events_page(job_uuid, after=cursor, limit=10000)
            status = page.get("status", status)
            events.extend(page["data"])
            if not page["data"] or page["next_cursor"] == cursor:
                return status, events
            cursor = page["next_cursor"]

    def follow_events(self, job_uuid: str, after: int = 0, *, stream: bool = True,
                      poll_seconds: float = 0.5) -> Iterator[dict[str, Any]]:
        """Yield the job's events after ``after`` as they happen, then ``{"type": "end", "status"}``.

        Uses the Server-Sent Events stream, resuming after the last seen event if the connection
        drops; falls back to polling the JSON pages when streaming is off or not offered.
        """
        cursor = after
        drops = 0
        while stream:
            try:
                for item in self._sse(job_uuid, cursor):
                    if item is None:  # the server answered with something other than a stream
                        stream = False
                        break
                    drops = 0
                    if item.get("type") == "end":
                        yield item
                        return
                    cursor = max(cursor, int(item.get("seq", cursor)))
                    yield item
                else:
                    drops += 1  # stream ended without its "end" event: reconnect
            except ServerUnreachable:
                drops += 1
                if drops > 5:
                    raise
            if stream:
                time.sleep(min(0.2 * 2**drops, 5.0))
        while True:
            page = self.events_page(job_uuid, after=cursor)
            yield from page["data"]
            cursor = page["next_cursor"]
            if page["status"] in TERMINAL and not page["data"]:
                yield {"type": "end", "data": {"status": page["status"]}}
                return
            if not page["data"]:
                time.sleep(poll_seconds)

    def _sse(self, job_uuid: str, after: int) -> Iterator[dict[str, Any] | None]:
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(after)}
        params: dict[str, str | int] = {"job_uuid": job_uuid, "after": after}
        timeout = httpx.Timeout(self.timeout, read=60.0)  # the server sends a keep-alive every 0.5 s
        try:
            with self._http.stream("GET", self.EVENTS, params=params, headers=headers, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError.from_response(response)
                if "text/event-stream" not in response.headers.get("content-type", ""):
                    yield None
                    return
                name = "message"
                data: list[str] = []
                for line in response.iter_lines():
                    if line.startswith(":"):
                        continue
                    if line == "":
                        if data:
                            payload = json.loads("\n".join(data))
                            yield {"type": "end", "data": payload} if name == "end" else payload
                        name, data = "message", []
                    elif line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].lstrip())
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise self._unreachable(exc) from exc
