"""The OpenAI Files API: uploads a fine-tuning job can name as its training or validation file.

Only ``purpose="fine-tune"`` is kept: the other purposes OpenAI knows feed APIs this server does
not have, so they are refused at once rather than stored for nothing. Every lookup is by tenant;
another tenant's file id is answered exactly like an id that does not exist.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Literal

from posttrain.domain.files import StoredFile
from posttrain.errors import InvalidRequest, NotFound, PayloadTooLarge
from posttrain.settings import Settings
from posttrain.store.files import CHUNK_BYTES, FileStore, PendingUpload, UploadTooLarge

#: The one purpose this server keeps.
FINE_TUNE = "fine-tune"
#: OpenAI's other purposes, and why each is refused here.
OTHER_PURPOSES = {
    "batch": "this server has no Batch API",
    "assistants": "this server has no Assistants API",
    "vision": "this server has no Assistants API (vision files belong to it)",
    "user_data": "this server keeps files only to fine-tune on",
    "evals": "this server has no Evals API",
}
#: The most files one page of ``GET /v1/files`` holds (OpenAI's bound).
MAX_FILES_PAGE = 10_000


class FileNotFound(NotFound):
    """No such file."""

    code = "file_not_found"

    def __init__(self, file_id: str, *, param: str | None = None) -> None:
        super().__init__(f"No such File object: {file_id}")
        self.param = param


class FileInvalid(InvalidRequest):
    """A refusal that names the request field at fault (OpenAI's ``param``)."""

    def __init__(self, detail: str, *, param: str | None, code: str | None = None) -> None:
        super().__init__(detail)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class FilePage:
    data: list[StoredFile]
    has_more: bool


class FileService:
    def __init__(self, *, store: FileStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def begin_upload(self, *, tenant: str) -> PendingUpload:
        """An upload to stream to disk; ``finish_upload`` checks its form fields and keeps it."""
        return self.store.begin(tenant=tenant, max_bytes=self.settings.max_body_bytes)

    @staticmethod
    def write(pending: PendingUpload, chunk: bytes) -> None:
        try:
            pending.write(chunk)
        except UploadTooLarge as exc:
            raise PayloadTooLarge(f"file: larger than {exc.limit} bytes, the most this server takes") from None

    def finish_upload(self, pending: PendingUpload, *, filename: str, purpose: str) -> StoredFile:
        """Keep the upload if its purpose and name are accepted; otherwise nothing is kept."""
        try:
            if purpose != FINE_TUNE:
                why = OTHER_PURPOSES.get(purpose, "it is not a purpose OpenAI defines")
                raise FileInvalid(f"purpose '{purpose}' is not accepted: {why}; this server accepts only 'fine-tune'",
                                  param="purpose", code="invalid_purpose")
            if not filename or len(filename) > 255 or any(ord(c) < 32 for c in filename):
                raise FileInvalid("file: the file's name must be 1 to 255 printable characters", param="file")
            return pending.commit(filename=filename, purpose=purpose)
        except BaseException:
            pending.abort()
            raise

    def get(self, *, tenant: str, file_id: str, param: str | None = None) -> StoredFile:
        found = self.store.get(tenant=tenant, file_id=file_id)
        if found is None:
            raise FileNotFound(file_id, param=param)
        return found

    def list(self, *, tenant: str, purpose: str | None, limit: int, after: str | None,
             order: Literal["asc", "desc"]) -> FilePage:
        """OpenAI's cursor paging: the files after the one named ``after`` in ``order``."""
        if not 1 <= limit <= MAX_FILES_PAGE:
            raise FileInvalid(f"limit: must be 1 to {MAX_FILES_PAGE}, got {limit}", param="limit")
        found = self.store.list(tenant=tenant, purpose=purpose, limit=limit + 1, after_id=after, order=order)
        if found is None:
            raise FileInvalid(f"after: no file '{after}' to page after", param="after")
        return FilePage(data=found[:limit], has_more=len(found) > limit)

    def content(self, *, tenant: str, file_id: str) -> Iterator[bytes]:
        stored = self.get(tenant=tenant, file_id=file_id)
        handle = self.store.open(stored)
        return _closing_chunks(handle)

    def read_lines(self, *, tenant: str, file_id: str, param: str) -> builtins.list[str]:
        """The file's lines as text, for a job to check and train on (a file that is not UTF-8 is
        refused naming ``param``)."""
        stored = self.get(tenant=tenant, file_id=file_id, param=param)
        with self.store.open(stored) as handle:
            try:
                return handle.read().decode("utf-8").splitlines()
            except UnicodeDecodeError as exc:
                raise FileInvalid(f"{param}: file '{file_id}' is not UTF-8 text (byte {exc.start})", param=param,
                                  code="invalid_file_format") from None

    def delete(self, *, tenant: str, file_id: str) -> None:
        if not self.store.delete(tenant=tenant, file_id=file_id):
            raise FileNotFound(file_id)


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK_BYTES):
        yield chunk


def _closing_chunks(handle: IO[bytes]) -> Iterator[bytes]:
    with handle:
        yield from _chunks(handle)
