"""``posttrain datasets register|list|rows|rm``: the Datasets and DatasetIO APIs from the shell."""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json
import math
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.table import Column, Table

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

app = typer.Typer(help="Datasets on a posttrain server (register, list, rows, rm).", no_args_is_help=True,
                  cls=RemoteGroup)
app.callback()(group_callback)

PURPOSES = ("post-training/messages", "eval/question-answer", "eval/messages-answer")


class LocalFileError(Exception):
    """A local dataset file that cannot be read as rows."""


def _json_safe(value: Any) -> Any:
    """Parquet and CSV values as JSON values (dates as ISO text, decimals as numbers, NaN as null)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _json_safe(value.tolist())
    return value


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a local .jsonl/.ndjson, .json, .csv/.tsv or .parquet file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet" or suffix == ".pq":
            try:
                import pyarrow.parquet as pq
            except ImportError as exc:
                raise LocalFileError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from exc
            rows = pq.read_table(path).to_pylist()
        else:
            text = path.read_text(encoding="utf-8-sig")
            if suffix in (".jsonl", ".ndjson"):
                rows = []
                for number, line in enumerate(text.splitlines(), 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except ValueError as exc:
                            raise LocalFileError(f"{path}, line {number}: not valid JSON ({exc})") from exc
            elif suffix == ".json":
                data = json.loads(text)
                if isinstance(data, dict):  # {"rows": [...]} or {"data": [...]}
                    data = next((data[k] for k in ("rows", "data") if isinstance(data.get(k), list)), data)
                rows = data if isinstance(data, list) else [data]
            elif suffix in (".csv", ".tsv"):
                rows = list(csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","))
            else:
                raise LocalFileError(f"{path}: unknown file type {suffix or '(none)'!r}; "
                                     "use .jsonl, .json, .csv, .tsv or .parquet")
    except OSError as exc:
        raise LocalFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise LocalFileError(f"{path}: not valid {suffix.lstrip('.')} ({exc})") from exc
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise LocalFileError(f"{path}: row {index} is a {type(row).__name__}, not an object")
    return [_json_safe(row) for row in rows]


def _path(dataset_id: str) -> str:
    return quote(dataset_id, safe="/")


def _row_count(dataset: dict[str, Any]) -> str:
    metadata = dataset.get("metadata") or {}
    for key in ("row_count", "rows", "num_rows", "n_rows"):
        if isinstance(metadata.get(key), int):
            return str(metadata[key])
    # Listed datasets carry no inline rows (the server sends rows: [] for them): the count is
    # unknown here unless the metadata says it.
    return "?"


@app.command()
def register(
    ctx: typer.Context,
    file: Annotated[Path | None, typer.Argument(metavar="FILE",
        help="Local .jsonl/.json/.csv/.tsv/.parquet file; its rows are read here and sent inline.",
        show_default=False)] = None,
    uri: Annotated[str | None, typer.Option(
        help="Register a URI the server reads itself (file:// under its file roots, data:, huggingface://).",
        show_default=False)] = None,
    dataset_id: Annotated[str | None, typer.Option("--id", help="Dataset id (the server makes one if left out).",
                                                      show_default=False)] = None,
    purpose: Annotated[str, typer.Option(help=f"One of {', '.join(PURPOSES)}.")] = "post-training/messages",
    metadata: Annotated[list[str] | None, typer.Option(
        "--meta", help="KEY=VALUE metadata (repeatable).", show_default=False)] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Register a dataset from a local file (rows sent inline) or a URI; prints its id."""
    if (file is None) == (uri is None):
        raise typer.BadParameter("give either a FILE or --uri (not both)")
    meta: dict[str, Any] = {}
    for item in metadata or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--meta takes KEY=VALUE, not {item!r}")
        meta[key] = value
    if file is not None:
        rows = read_rows(file)
        source: dict[str, Any] = {"type": "rows", "rows": rows}
        meta = {"source_file": file.name, "row_count": len(rows), **meta}
    else:
        source = {"type": "uri", "uri": uri}
    body: dict[str, Any] = {"purpose": purpose, "source": source, "metadata": meta}
    if dataset_id is not None:
        body["dataset_id"] = dataset_id
    with client(ctx, url, api_key) as api:
        created = api.post("/v1/datasets", body)
    out.out(created["identifier"], highlight=False)


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOption = False, url: UrlOption = None, api_key: ApiKeyOption = None) -> None:
    """List the datasets: id, purpose, source type and rows."""
    with client(ctx, url, api_key) as api:
        datasets = api.get("/v1/datasets")["data"]
    if as_json:
        print_json(datasets)
        return
    table = Table(Column("id", no_wrap=True), "purpose", "source", "rows", box=None, header_style="bold",
                  pad_edge=False)
    for d in datasets:
        source = d.get("source") or {}
        kind = source.get("type", "?")
        if kind == "uri":
            uri = str(source.get("uri", ""))
            kind = f"uri {uri[:40] + '…' if len(uri) > 41 else uri}"
        table.add_row(d["identifier"], d.get("purpose", "?"), kind, _row_count(d))
    if not datasets:
        out.print("no datasets")
    else:
        out.print(table)


@app.command()
def rows(
    ctx: typer.Context,
    dataset_id: Annotated[str, typer.Argument(metavar="ID", help="Dataset id.")],
    start: Annotated[int, typer.Option(help="First row (0-based).", min=0)] = 0,
    limit: Annotated[int | None, typer.Option(help="Most rows to print (default: all the rest).", min=0,
                                                 show_default=False)] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Print a dataset's rows as JSON lines."""
    with client(ctx, url, api_key) as api:
        page = api.get(f"/v1/datasetio/iterrows/{_path(dataset_id)}", start_index=start, limit=limit)
    for row in page["data"]:
        out.out(json.dumps(row, ensure_ascii=False), highlight=False)


@app.command()
def rm(
    ctx: typer.Context,
    dataset_ids: Annotated[list[str], typer.Argument(metavar="ID...", help="Dataset id(s).")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Unregister dataset(s)."""
    with client(ctx, url, api_key) as api:
        for dataset_id in dataset_ids:
            api.delete(f"/v1/datasets/{_path(dataset_id)}")
            out.out(f"removed {dataset_id}", highlight=False)
