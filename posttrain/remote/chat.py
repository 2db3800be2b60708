"""``posttrain chat MODEL_ID``: talk to a served model (a base, a fine-tuned model or a checkpoint).

Each line read from standard input is the user's turn; the model's answer is streamed to standard
output as it is generated (``POST /v1/chat/completions`` with ``stream: true``) and ends with a
newline, so each turn is one line (newlines inside an answer are written as spaces). The
conversation is kept, so later turns see the earlier ones. ``--message`` sends given turns
instead of reading standard input. End with an empty line, ``/exit`` or end of input.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import typer
from rich.markup import escape

from posttrain.remote.common import ApiKeyOption, UrlOption, cause_chain, err
from posttrain.remote.http import API_KEY_ENV, Client, RemoteError, ServerUnreachable, resolve

CHAT_PATH = "/v1/chat/completions"
#: A reply streams for as long as the model generates; only silence this long is a failure.
READ_TIMEOUT_S = 300.0


class ChatError(RemoteError):
    """The server refused the turn (OpenAI's error envelope) or broke the stream."""


def _refusal(response: httpx.Response) -> ChatError:
    try:
        error = response.json().get("error") or {}
        message = error.get("message") or response.text
    except (ValueError, AttributeError):
        message = response.text or "(empty body)"
    hint = f" (give an API key with --api-key or {API_KEY_ENV})" if response.status_code == 401 else ""
    return ChatError(f"{response.status_code}: {' '.join(str(message).split())}{hint}")


def stream_reply(client: Client, body: dict[str, Any]) -> Iterator[str]:
    """The text deltas of one streamed chat completion, as they arrive."""
    try:
        with client._http.stream("POST", CHAT_PATH, json={**body, "stream": True},
                                 timeout=httpx.Timeout(30.0, read=READ_TIMEOUT_S)) as response:
            if response.status_code >= 400:
                response.read()
                raise _refusal(response)
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ChatError(str((chunk["error"] or {}).get("message") or "the stream failed"))
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text
    except (httpx.TransportError, httpx.TimeoutException) as exc:
        raise ServerUnreachable(f"cannot reach the posttrain server at {client.base_url}: "
                                f"{' '.join(str(exc).split()) or type(exc).__name__}") from exc
    raise ChatError("the stream ended without [DONE]")


def turns(messages: list[str] | None) -> Iterator[str]:
    """The user's turns: the given ``--message`` values, else standard input's lines."""
    if messages:
        yield from messages
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            err.print("[bold]you>[/bold] ", end="")
        line = sys.stdin.readline()
        if not line:
            return
        text = line.rstrip("\n")
        if not text.strip() or text.strip() == "/exit":
            return
        yield text


def chat(
    model: Annotated[str, typer.Argument(metavar="MODEL_ID",
                                         help="A model id from GET /v1/models (a base, ft:..., or a checkpoint).")],
    system: Annotated[str | None, typer.Option("--system", help="A system message to start with.")] = None,
    message: Annotated[list[str] | None, typer.Option(
        "--message", "-m", help="A user turn to send (repeat for several); default: read turns from stdin.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Most tokens per answer.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0 for greedy decoding.")] = 0.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Same seed, same answer.")] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Chat with a served model, streaming each answer as one line."""
    base, key = resolve(url, api_key)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    try:
        with Client(base, key) as client:
            for text in turns(message):
                history.append({"role": "user", "content": text})
                body: dict[str, Any] = {"model": model, "messages": history, "max_tokens": max_tokens,
                                        "temperature": temperature}
                if seed is not None:
                    body["seed"] = seed
                parts = []
                for delta in stream_reply(client, body):
                    parts.append(delta)
                    sys.stdout.write(delta.replace("\r\n", " ").replace("\n", " ").replace("\r", " "))
                    sys.stdout.flush()
                sys.stdout.write("\n")
                sys.stdout.flush()
                history.append({"role": "assistant", "content": "".join(parts)})
    except RemoteError as exc:
        sys.stdout.flush()
        err.print("[red]error:[/red] " + escape(cause_chain(exc)))
        raise typer.Exit(1) from None
