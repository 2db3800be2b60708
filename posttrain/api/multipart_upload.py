"""The ``multipart/form-data`` body of ``POST /v1/files``, read as it streams in.

The parsing is python-multipart's (``MultipartParser``, the streaming parser Starlette's own forms
use), driven by callbacks: each chunk of the request goes through the parser once, and the file
part's bytes come back out of ``feed`` to be written straight to disk, so an upload is never held
whole in memory. The small form fields (``purpose``) are collected, bounded. What this module adds
is OpenAI's shape of the form: one ``file`` part (its ``filename`` kept), other parts are text
fields, and a body that ends before its closing boundary is refused rather than half kept.
"""

from __future__ import annotations

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from posttrain.errors import InvalidRequest

#: The most bytes a part's header line, or a plain (non-file) field, may have.
MAX_HEADER_BYTES = 16 * 1024
MAX_FIELD_BYTES = 64 * 1024
#: The form field holding the file, as OpenAI's upload names it.
FILE_FIELD = "file"


class MultipartInvalid(InvalidRequest):
    """The multipart body could not be read."""

    param = "file"


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` content type, or a refusal saying what to send."""
    media_type, params = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        shown = media_type.decode("latin-1") or "no content type"
        raise MultipartInvalid(f"send the file as multipart/form-data (fields file and purpose), not {shown}")
    boundary = params.get(b"boundary", b"")
    if not boundary or len(boundary) > 200:
        raise MultipartInvalid("the multipart/form-data content type names no boundary")
    return boundary


class UploadForm:
    """One upload's form, fed the body chunk by chunk.

    ``feed`` returns the file part's bytes found in the chunk (to be written at once); the text
    fields accumulate in ``fields``; ``finish`` says whether the body was whole and held a file."""

    def __init__(self, boundary: bytes) -> None:
        self.fields: dict[str, bytearray] = {}
        self.filename: str | None = None
        self.done = False
        self._file_bytes = bytearray()
        self._current: str | None = None
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition: bytes | None = None
        self._parser = MultipartParser(boundary, callbacks={
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value_data, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_end": self._end,
        }, max_header_size=MAX_HEADER_BYTES)

    def feed(self, chunk: bytes) -> bytes:
        """Parse ``chunk``; the file's bytes in it (possibly none)."""
        if self.done:
            return b""  # the epilogue after the closing boundary is ignored, as RFC 2046 says
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise MultipartInvalid(f"the multipart body is malformed ({exc})") from None
        data, self._file_bytes = bytes(self._file_bytes), bytearray()
        return data

    def finish(self) -> None:
        """Refuse a body that ended before its closing boundary, or held no file."""
        if not self.done:
            raise MultipartInvalid("the multipart body ended before its closing boundary")
        if self.filename is None:
            raise MultipartInvalid("file: field required")

    # -- python-multipart's callbacks ---------------------------------------------------------

    def _part_begin(self) -> None:
        self._current, self._disposition = None, None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if bytes(self._header_name).strip().lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name, self._header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        kind, params = parse_options_header(self._disposition)
        name = params.get(b"name")
        if kind != b"form-data" or name is None:
            raise MultipartInvalid("a multipart part has no Content-Disposition form-data name")
        field = name.decode("utf-8", "replace")
        if field == FILE_FIELD:
            if self.filename is not None:
                raise MultipartInvalid("file: sent twice; send one file per upload")
            self.filename = params.get(b"filename", b"").decode("utf-8", "replace") or "upload"
        else:
            self.fields[field] = bytearray()
        self._current = field

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current == FILE_FIELD:
            self._file_bytes += data[start:end]
        elif self._current is not None:
            value = self.fields[self._current]
            value += data[start:end]
            if len(value) > MAX_FIELD_BYTES:
                raise MultipartInvalid(f"{self._current}: longer than {MAX_FIELD_BYTES} bytes")

    def _end(self) -> None:
        self.done = True
