"""``posttrain models list|export``: the models API from the shell (``create-tiny``, which needs no
server, is added to the same group by ``posttrain.cli``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import typer
from rich.table import Table

from posttrain.remote.common import (
    ApiKeyOption,
    JsonOption,
    RemoteGroup,
    UrlOption,
    client,
    group_callback,
    out,
    print_json,
)
from posttrain.remote.http import ApiError

app = typer.Typer(help="Models: the server's bases and what your jobs trained (list, export); local model folders "
                       "(create-tiny).", no_args_is_help=True, cls=RemoteGroup)
app.callback()(group_callback)

#: How long an export may take to start answering: a merge of a large model runs first.
EXPORT_READ_TIMEOUT_SECONDS = 3600.0
FORMATS = ("merged", "adapter")


@app.command("list")
def list_models(ctx: typer.Context, url: UrlOption = None, api_key: ApiKeyOption = None,
                as_json: JsonOption = False) -> None:
    """The base models and your fine-tuned models and checkpoints (GET /v1/models)."""
    with client(ctx, url, api_key) as api:
        body = api.get("/v1/models")
    if as_json:
        print_json(body)
        return
    table = Table("ID", "OWNED BY", "KIND", box=None, pad_edge=False)
    for model in body.get("data", []):
        table.add_row(str(model.get("id")), str(model.get("owned_by")),
                      str((model.get("metadata") or {}).get("kind", "-")))
    out.print(table)


def default_filename(model_id: str, fmt: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id).strip("._") or "model"
    return f"{safe}-{fmt}.tar.gz"


@app.command("export")
def export_model(
    ctx: typer.Context,
    model_id: Annotated[str, typer.Argument(metavar="ID", help="A fine-tuned model or checkpoint id (posttrain models list).")],
    fmt: Annotated[str, typer.Option("--format", help="merged: a safetensors model that loads without peft; "
                                                      "adapter: the PEFT adapter folder.")] = "merged",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="File to write the tar.gz to "
                                                                      "(default: <id>-<format>.tar.gz here).")] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Download a fine-tuned model as a tar.gz of one folder."""
    if fmt not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}")
    target = output or Path(default_filename(model_id, fmt))
    partial = target.with_name(target.name + ".part")
    with client(ctx, url, api_key) as api:
        api.timeout = EXPORT_READ_TIMEOUT_SECONDS
        path = f"/v1/posttrain/models/{quote(model_id, safe=':/')}/export"
        with api.stream("GET", path, params={"format": fmt}) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError.from_response(response)
            size = 0
            with partial.open("wb") as handle:
                for chunk in response.iter_bytes():
                    handle.write(chunk)
                    size += len(chunk)
    partial.replace(target)
    out.print(f"{model_id} ({fmt}) written to {target} ({size} bytes)")
