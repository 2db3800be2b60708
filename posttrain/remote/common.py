"""What the ``datasets`` and ``jobs`` command groups share: the connection options and the consoles."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

if TYPE_CHECKING:
    from posttrain.remote.http import Client

# Results on stdout; a pipe or file gets wide lines (no wrapped tables, no cut-off paths).
out = Console(highlight=False, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 240)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # errors, on stderr, one line each


def cause_chain(exc: BaseException) -> str:
    """``Type: message <- Cause: message …`` on one line, each distinct message once."""
    links: list[str] = []
    seen: set[str] = set()
    current: BaseException | None = exc
    while current is not None and len(links) < 8:
        message = " ".join(str(current).split())
        if message not in seen:
            links.append(f"{type(current).__name__}: {message}" if message else type(current).__name__)
            seen.add(message)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return " <- ".join(links)


# Usage errors, exits and aborts stay with click (usage message, exit 2, …); the base class of
# typer's usage errors is looked up, since typer ships its own copy of click.
_CLICK_OWN: tuple[type[BaseException], ...] = (typer.Exit, typer.Abort,
              next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"))


class RemoteGroup(TyperGroup):
    """A command group whose failures print as one line on stderr and exit 1 (no traceback)."""

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]  # the base names typer's private click copy
        try:
            return super().invoke(ctx)
        except _CLICK_OWN:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure of a remote command is reported the same way
            err.print("[red]error:[/red] " + escape(cause_chain(exc)))
            raise typer.Exit(1) from None

UrlOption = Annotated[str | None, typer.Option(
    "--url", help="Server URL (env POSTTRAIN_URL; default http://127.0.0.1:8321).", show_default=False)]
ApiKeyOption = Annotated[str | None, typer.Option(
    "--api-key", help="API key, sent as 'Authorization: Bearer …' (env POSTTRAIN_API_KEY).", show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the server's JSON answer instead of a table.")]


def group_callback(ctx: typer.Context, url: UrlOption = None, api_key: ApiKeyOption = None) -> None:
    """Remember the group-level ``--url`` / ``--api-key`` (``posttrain jobs --url … list``)."""
    ctx.obj = {**(ctx.obj or {}), "url": url, "api_key": api_key}


def client(ctx: typer.Context, url: str | None, api_key: str | None) -> Client:
    """A client for the command: its own options, else the group's, else the environment."""
    from posttrain.remote.http import Client

    obj = ctx.obj or {}
    return Client.from_options(url or obj.get("url"), api_key if api_key is not None else obj.get("api_key"))


def print_json(value: Any) -> None:
    out.out(json.dumps(value, indent=2, ensure_ascii=False), highlight=False)


def fmt_float(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def fmt_time(value: Any) -> str:
    """An ISO timestamp, shortened to seconds and without the 'T'."""
    if not value:
        return "-"
    text = str(value).replace("T", " ")
    return text.split(".")[0].removesuffix("+00:00").removesuffix("Z")
