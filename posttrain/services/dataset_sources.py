"""Read the rows of a dataset source once, at registration time.

The server copies what this returns into its own JSON-lines file, so every reader here ends in the
same shape: a list of JSON objects (``dict`` with ``str`` keys and JSON values). Refusals raise
``DatasetSourceInvalid`` or ``PathOutsideRoots`` with a message that says how to fix the request.
Local sources are read: files under the configured roots, ``data:`` URIs, and Hugging Face datasets
already in the local cache. ``http(s)://`` URIs are fetched only when the operator turns them on
(``HttpPolicy``), and then never from loopback, private or otherwise non-public addresses unless the
operator allows those too (see ``http_sources``).
"""

from __future__ import annotations

import base64
import binascii
import csv
import datetime as dt
import decimal
import io
import json
import math
import os
import re
import stat
import threading
from pathlib import Path
from urllib.parse import parse_qs, unquote, unquote_to_bytes

from posttrain.errors import DatasetSourceInvalid, PathOutsideRoots
from posttrain.services.http_sources import DEFAULT_PORTS, HttpPolicy, fetch_http

_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
                   ".parquet": "parquet", ".pq": "parquet"}  # fmt: skip
# Real MIME types and the Llama Stack docs' shorthand (``data:csv;base64,...``). Anything else
# (``application/octet-stream``, ``text/plain``, ``None`` from ``mimetypes.guess_type``) is sniffed.
_MIME_FORMATS = {
    mime: fmt
    for fmt, mimes in {
        "csv": "csv text/csv application/csv text/comma-separated-values",
        "tsv": "tsv text/tab-separated-values",
        "json": "json application/json text/json",
        "jsonl": "jsonl ndjson text/jsonl application/jsonl application/x-jsonl application/jsonlines "
        "application/x-jsonlines application/ndjson application/x-ndjson",
        "parquet": "parquet application/parquet application/x-parquet application/vnd.apache.parquet",
    }.items()
    for mime in mimes.split()
}
_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HF_LOCK = threading.Lock()  # the offline switch is process-global; one cache read at a time


def load_uri_rows(
    uri: str,
    *,
    file_roots: list[Path],
    hf_cache: Path | None = None,
    max_rows: int | None = None,
    http: HttpPolicy | None = None,
) -> list[dict]:
    """Return the rows behind a ``URIDataSource`` URI, refusing anything this server must not read.

    ``hf_cache`` may be the hub cache (``$HF_HOME/hub``, as ``Settings.hf_cache``): ``load_dataset`` keeps
    prepared splits beside it, in ``$HF_HOME/datasets``, so that sibling is read. Any other folder is used
    as the datasets cache itself; ``None`` means the library default. ``http`` None (or not enabled)
    refuses ``http(s)://`` URIs.
    """
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    scheme = match.group(1).lower() if match else ""
    if scheme in ("", "file"):
        raw, path, data = _read_in_roots(uri, file_roots)
        rows = _parse(data, _SUFFIX_FORMATS.get(path.suffix.lower()), raw)
    elif scheme == "data":
        mime, payload = _decode_data_uri(uri)
        rows = _parse(payload, _MIME_FORMATS.get(mime), f"data: URI ({mime or 'no type'})")
    elif scheme == "huggingface":
        rows = _load_huggingface(uri, hf_cache, max_rows)
    elif scheme in DEFAULT_PORTS:
        if http is None or not http.enabled:
            raise DatasetSourceInvalid(
                f"URI scheme {scheme!r} is not supported by this server unless the operator sets "
                "POSTTRAIN_ALLOW_HTTP_DATASETS=true; until then upload the file under the server's file roots, "
                "send it as a data: URI, or send the rows inline with a 'rows' source"
            )
        data, suffix, mime, shown = fetch_http(uri, http)
        # The name the user wrote is the most specific statement of the format; servers often send
        # application/octet-stream or text/plain for .jsonl and .parquet. Content-Type next, then sniffing.
        rows = _parse(data, _SUFFIX_FORMATS.get(suffix) or _MIME_FORMATS.get(mime), shown)
    else:
        raise DatasetSourceInvalid(
            f"URI scheme {scheme!r} is not supported by this server; use an absolute path or file:// URI "
            "under the server's file roots, a data: URI, a huggingface://datasets/<owner>/<name> dataset "
            "already in the local cache, or send the rows inline with a 'rows' source"
        )
    return _checked(rows, max_rows, convert=True)


def validate_rows(rows: object, *, max_rows: int | None = None) -> list[dict]:
    """Check inline rows (a ``RowsDataSource`` or an append) before they are written anywhere."""
    return _checked(rows, max_rows, convert=False)


def _read_in_roots(uri: str, file_roots: list[Path]) -> tuple[str, Path, bytes]:
    """Read a file the tenant may read: ``file_roots`` are its own area and the shared folders.

    A file outside them (another tenant's area too), missing, a folder, or unreadable is refused
    with one message and one status, so a refusal says nothing about what exists elsewhere. The
    file is opened once without following a last symlink, and the opened file's real path (from
    ``/proc/self/fd``) is checked again, so no swap after the check leads outside the roots.
    Returns the path as the request wrote it (what content errors name), the real path and the bytes.
    """
    raw = uri
    if uri[:5].lower() == "file:":
        raw = uri[5:]
        if raw.startswith("//"):  # file:///abs or file://localhost/abs
            host, slash, rest = raw[2:].partition("/")
            if host not in ("", "localhost"):
                raise DatasetSourceInvalid(f"file URI {uri!r} names host {host!r}; only local files are read")
            raw = slash + rest
        raw = unquote(raw)
    roots = [Path(r).expanduser().resolve() for r in file_roots]
    allowed = ", ".join(str(r) for r in roots) or "(none configured)"
    candidate = Path(raw)
    if not candidate.is_absolute() or ".." in candidate.parts or "\0" in raw:
        raise PathOutsideRoots(
            f"path {raw!r} must be absolute and must not contain '..'; give the full path of a file under "
            f"one of the allowed roots: {allowed}"
        )
    refused = PathOutsideRoots(
        f"dataset file {raw!r} is not a readable file inside the folders this tenant may read datasets from "
        f"({allowed}): it is missing, not a file, unreadable or outside them; copy the file into one of them"
    )
    try:
        resolved = candidate.resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            raise refused
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (OSError, RuntimeError):  # missing, unreadable, name too long, symlink loop (RuntimeError before 3.13)
        raise refused from None
    try:
        real = Path(os.readlink(f"/proc/self/fd/{fd}")) if os.path.isdir("/proc/self/fd") else resolved
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not any(real.is_relative_to(root) for root in roots):
            raise refused
        with os.fdopen(os.dup(fd), "rb") as handle:
            return raw, real, handle.read()
    except OSError:
        raise refused from None
    finally:
        os.close(fd)


def _decode_data_uri(uri: str) -> tuple[str, bytes]:
    """Split ``data:[<mime>][;param][;base64],<payload>`` the way RFC 2397 and the Llama Stack client write it."""
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise DatasetSourceInvalid("data: URI has no ',' between its media type and its payload")
    params = [p.strip() for p in header.split(";")]
    mime = params[0].lower()
    if params[-1].lower() != "base64":
        return mime, unquote_to_bytes(payload)
    compact = re.sub(r"\s+", "", unquote(payload))
    try:
        return mime, base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DatasetSourceInvalid(f"data: URI payload is not valid base64: {exc}") from exc


def _parse(data: bytes, fmt: str | None, where: str) -> list:
    """Parse by the declared format; sniff only when the name or MIME type declares none."""
    if fmt is None:
        fmt = _sniff(data)
    if fmt == "parquet":
        return _parse_parquet(data, where)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetSourceInvalid(f"{where} is not UTF-8 text ({exc}); save it as UTF-8 {fmt}") from exc
    if fmt == "jsonl":
        return _parse_jsonl(text, where)
    if fmt == "json":
        return _parse_json(text, where)
    return _parse_csv(text, where, delimiter="\t" if fmt == "tsv" else ",")


def _sniff(data: bytes) -> str:
    """Guess the format of content whose name or MIME type says nothing (e.g. ``application/octet-stream``)."""
    if data.startswith(b"PAR1"):
        return "parquet"
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head == b"[":
        return "json"
    if head == b"{":
        try:
            whole = json.loads(data)
        except (ValueError, RecursionError):
            return "jsonl"
        return "json" if isinstance(whole, dict) and ("rows" in whole or "data" in whole) else "jsonl"
    return "csv"


def _parse_jsonl(text: str, where: str) -> list:
    rows = []
    # Split on "\n" only: str.splitlines() also breaks on U+2028 etc., which may sit inside a JSON string.
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip(" \t\r"):
            try:
                rows.append(json.loads(line))
            except (ValueError, RecursionError) as exc:
                raise DatasetSourceInvalid(f"{where}: line {number} is not valid JSON: {exc}") from exc
    return rows


def _parse_json(text: str, where: str) -> list:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise DatasetSourceInvalid(f"{where} is not valid JSON: {exc}") from exc
    if isinstance(value, dict):  # {"rows": [...]} or {"data": [...]}, as some exporters wrap them
        value = value.get("rows", value.get("data"))
    if not isinstance(value, list):
        raise DatasetSourceInvalid(f"{where}: JSON must be a list of rows or an object with a 'rows'/'data' list")
    return value


def _parse_csv(text: str, where: str, *, delimiter: str) -> list:
    """Keep every cell a string: JSON-looking cells (``messages``) stay strings, as Llama Stack stores them."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if not header:
            return []
        if len(set(header)) != len(header) or not all(header):
            raise DatasetSourceInvalid(f"{where}: the header row must name every column once: {header}")
        rows = []
        for record in reader:
            if not record:
                continue
            if len(record) != len(header):
                raise DatasetSourceInvalid(
                    f"{where}: line {reader.line_num} has {len(record)} cells but the header has {len(header)}"
                )
            rows.append(dict(zip(header, record, strict=True)))
    except csv.Error as exc:
        raise DatasetSourceInvalid(f"{where}: line {reader.line_num} is not valid CSV: {exc}") from exc
    return rows


def _parse_parquet(data: bytes, where: str) -> list:
    import pyarrow as pa  # only needed for parquet uploads
    import pyarrow.parquet as pq

    try:
        return pq.read_table(io.BytesIO(data)).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DatasetSourceInvalid(f"{where} is not a readable parquet file: {exc}") from exc


def _load_huggingface(uri: str, hf_cache: Path | None, max_rows: int | None) -> list:
    """Read only from the local cache: the offline switch is forced on for the call, whatever the env says."""
    location, _, query_text = uri.partition("?")
    repo_id = _hf_repo_id(location[len("huggingface:") :])
    query = parse_qs(query_text)
    split, name = query.get("split", ["train"])[-1], query.get("name", [None])[-1]
    if not _HF_REPO_ID.match(repo_id) or ".." in repo_id:
        raise DatasetSourceInvalid(
            f"{uri!r} names no dataset; write huggingface://datasets/<owner>/<name>?split=train "
            "(or huggingface://<owner>/<name>?split=train)"
        )
    cache = hf_cache.parent / "datasets" if hf_cache is not None and hf_cache.name == "hub" else hf_cache
    cache_dir = None if cache is None else str(cache)
    import datasets  # lazily: the API process must not pay for it at startup
    import huggingface_hub.constants as hub_constants

    with _HF_LOCK:  # imported first, so the flags restored below are the process's own
        saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
        os.environ.update(dict.fromkeys(saved_env, "1"))
        saved_flags = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
        try:
            loaded = datasets.load_dataset(repo_id, name, split=split, cache_dir=cache_dir,
                                           download_mode="reuse_cache_if_exists")  # fmt: skip
        except Exception as exc:  # the library raises a zoo of types; all mean "cannot serve it locally"
            raise DatasetSourceInvalid(
                f"Hugging Face dataset {repo_id!r} (name={name}, split={split}) is not in the local cache "
                f"({cache_dir or 'default datasets cache'}); this server does not download datasets. Load it "
                f"once with `datasets.load_dataset` on this machine, or upload the rows. Cause: {exc}"
            ) from exc
        finally:
            datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved_flags
            for key, value in saved_env.items():
                if value is None:
                    del os.environ[key]
                else:
                    os.environ[key] = value
    if max_rows is not None and loaded.num_rows > max_rows:  # before to_list(), which holds it all in memory
        raise DatasetSourceInvalid(f"the dataset has {loaded.num_rows} rows, more than the limit of {max_rows}")
    return loaded.to_list()


def _hf_repo_id(path: str) -> str:
    """The repo id of ``//datasets/<owner>/<name>`` (the form Llama Stack's docs, tests and
    distributions write: its reader drops the URI's host, ``datasets``, and loads the path) or of
    ``//<owner>/<name>``."""
    repo_id = path.strip("/")
    if repo_id == "datasets":  # the host alone: no repo named
        return ""
    if repo_id.startswith("datasets/") and _HF_REPO_ID.match(repo_id.removeprefix("datasets/")):
        return repo_id.removeprefix("datasets/")
    return repo_id


def _checked(rows: object, max_rows: int | None, *, convert: bool) -> list[dict]:
    """Enforce the one shape every source must end in; name the first bad row so it can be fixed."""
    if not isinstance(rows, list):
        raise DatasetSourceInvalid(f"rows must be a list of objects, got {type(rows).__name__}")
    if max_rows is not None and len(rows) > max_rows:
        raise DatasetSourceInvalid(f"the source has {len(rows)} rows, more than the limit of {max_rows}")
    out = []
    for index, row in enumerate(rows):
        try:
            if convert:
                row = _to_json(row)
            if not isinstance(row, dict):
                raise ValueError(f"is a {type(row).__name__}, not a JSON object")
            _check_json(row)
        except (ValueError, TypeError, RecursionError) as exc:
            raise DatasetSourceInvalid(f"row {index} {exc}") from exc
        out.append(row)
    return out


def _to_json(value: object) -> object:
    """Turn what parquet / Hugging Face hand back (numpy/arrow scalars, dates, tuples) into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, float) and math.isnan(value):
        return None  # parquet/pandas write missing values as NaN
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:  # images and other blobs have no place in a text dataset
            raise ValueError("holds binary data that is not UTF-8 text") from None
    if hasattr(value, "as_py"):  # pyarrow scalar
        return _to_json(value.as_py())
    if hasattr(value, "tolist") and not isinstance(value, (str, int, float)):  # numpy scalar or array
        return _to_json(value.tolist())
    return value


def _check_json(row: dict) -> None:
    """Walk iteratively so deeply nested input fails cleanly instead of with RecursionError."""
    stack: list[tuple[object, str]] = [(row, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ValueError(f"has a non-string key {key!r} at '{where or '/'}'")
                stack.append((item, f"{where}/{key}"))
        elif isinstance(value, list):
            stack.extend((item, f"{where}/{i}") for i, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"holds {value} at '{where}', which JSON cannot represent")
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            raise ValueError(f"holds a {type(value).__name__} at '{where}', which is not a JSON value")
