"""A streaming reader of ``multipart/form-data`` bodies, for ``POST /v1/files``.

The upload's bytes are handed on as they arrive (to a temp file on disk), never held whole in
memory; the small form fields (``purpose``) are collected, bounded. Only what OpenAI's upload
sends is understood: parts with a ``Content-Disposition: form-data; name=…`` header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from posttrain.errors import InvalidRequest

#: The most bytes a part's headers, or a plain (non-file) field, may have.
MAX_HEADER_BYTES = 16 * 1024
MAX_FIELD_BYTES = 64 * 1024

_PARAM = re.compile(r';\s*([\w*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))')


class MultipartInvalid(InvalidRequest):
    """The multipart body could not be read."""

    param = "file"


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` content type, or a refusal saying what to send."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "multipart/form-data":
        raise MultipartInvalid(f"send the file as multipart/form-data (fields file and purpose), not "
                               f"{media_type or 'no content type'}")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3).strip()
              for m in _PARAM.finditer(";" + content_type.split(";", 1)[1] if ";" in content_type else "")}
    boundary = params.get("boundary")
    if not boundary or len(boundary) > 200:
        raise MultipartInvalid("the multipart/form-data content type names no boundary")
    return boundary.encode("latin-1")


@dataclass(frozen=True)
class Part:
    """A part begins: its form field's name and, for a file, the file's name."""

    name: str
    filename: str | None


@dataclass(frozen=True)
class Data:
    data: bytes


@dataclass
class MultipartReader:
    """Fed the body chunk by chunk, gives back ``Part`` and ``Data`` events in order."""

    boundary: bytes
    done: bool = False
    _state: str = "preamble"
    _buffer: bytes = b"\r\n"  # so the first boundary reads like every later one
    _delimiter: bytes = field(init=False)

    def __post_init__(self) -> None:
        self._delimiter = b"\r\n--" + self.boundary

    def feed(self, chunk: bytes) -> list[Part | Data]:
        self._buffer += chunk
        events: list[Part | Data] = []
        delimiter = self._delimiter
        while not self.done:
            if self._state in ("preamble", "body"):
                at = self._buffer.find(delimiter)
                if at < 0:
                    keep = len(delimiter) - 1  # a delimiter may be split across chunks
                    if self._state == "body" and len(self._buffer) > keep:
                        events.append(Data(self._buffer[:-keep]))
                        self._buffer = self._buffer[-keep:]
                    elif self._state == "preamble":
                        self._buffer = self._buffer[-keep:]
                    break
                if self._state == "body" and at > 0:
                    events.append(Data(self._buffer[:at]))
                self._buffer = self._buffer[at + len(delimiter):]
                self._state = "after_delimiter"
            elif self._state == "after_delimiter":
                if len(self._buffer) < 2:
                    break
                if self._buffer.startswith(b"--"):
                    self.done, self._buffer = True, b""
                elif self._buffer.startswith(b"\r\n"):
                    self._buffer, self._state = self._buffer[2:], "headers"
                else:
                    raise MultipartInvalid("the multipart body is malformed (bytes after a boundary)")
            else:  # headers
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_HEADER_BYTES:
                        raise MultipartInvalid("a multipart part's headers are too long")
                    break
                events.append(_part(self._buffer[:end]))
                self._buffer, self._state = self._buffer[end + 4:], "body"
        return events


def _part(raw: bytes) -> Part:
    for line in raw.decode("utf-8", "replace").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() != "content-disposition":
            continue
        params = {m.group(1).lower(): (m.group(2).replace('\\"', '"') if m.group(2) is not None else m.group(3).strip())
                  for m in _PARAM.finditer(value[value.find(";"):] if ";" in value else "")}
        if "name" in params:
            return Part(name=params["name"], filename=params.get("filename"))
    raise MultipartInvalid("a multipart part has no Content-Disposition form-data name")
