"""The streaming form reader of ``POST /v1/files`` (python-multipart underneath): the same fields and
file bytes whatever the chunking (a boundary split across chunks included) and the parts' order, and
malformed, truncated or file-less bodies refused."""

from __future__ import annotations

import os
import time

import httpx
import pytest

from posttrain.api.multipart_upload import MAX_FIELD_BYTES, MultipartInvalid, UploadForm, boundary_of
from posttrain.store.files import FileStore

CONTENT = b"line one\r\n--not-the-boundary\r\nline two\r\n" * 3


def encoded(*, file_first: bool = False) -> tuple[bytes, str]:
    """An upload as httpx (the openai SDK's transport) encodes it: ``purpose`` first, or the file first."""
    files = {"file": ("train.jsonl", CONTENT, "application/jsonl")}
    if file_first:
        files["purpose"] = (None, b"fine-tune", None)  # type: ignore[assignment]
        request = httpx.Request("POST", "http://x/v1/files", files=files)
    else:
        request = httpx.Request("POST", "http://x/v1/files", data={"purpose": "fine-tune"}, files=files)
    return request.read(), request.headers["content-type"]


def read_all(body: bytes, content_type: str, size: int) -> UploadForm:
    form = UploadForm(boundary_of(content_type))
    file_bytes = bytearray()
    for start in range(0, len(body), size):
        file_bytes += form.feed(body[start:start + size])
    form.file_bytes = bytes(file_bytes)  # type: ignore[attr-defined]
    return form


@pytest.mark.parametrize("file_first", [False, True])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 31, 64, 1000, 1 << 20])
def test_every_chunking_and_order_gives_the_same_fields(size, file_first):
    body, content_type = encoded(file_first=file_first)
    assert body.index(b'name="file"') < body.index(b'name="purpose"') if file_first else \
        body.index(b'name="purpose"') < body.index(b'name="file"')
    form = read_all(body, content_type, size)
    form.finish()
    assert form.file_bytes == CONTENT  # type: ignore[attr-defined]
    assert form.filename == "train.jsonl"
    assert form.fields == {"purpose": bytearray(b"fine-tune")}


@pytest.mark.parametrize("cut", [10, 60, 200])
def test_a_truncated_body_is_refused_at_finish(cut):
    body, content_type = encoded()
    form = read_all(body[:-cut], content_type, 100)
    with pytest.raises(MultipartInvalid, match="ended before its closing boundary"):
        form.finish()


def test_a_body_without_a_file_part_is_refused_naming_file():
    request = httpx.Request("POST", "http://x/v1/files", files={"purpose": (None, b"fine-tune", None)})
    form = read_all(request.read(), request.headers["content-type"], 64)
    with pytest.raises(MultipartInvalid, match="file: field required") as refused:
        form.finish()
    assert refused.value.param == "file"


def test_two_file_parts_and_an_overlong_field_are_refused():
    request = httpx.Request("POST", "http://x/v1/files",
                            files=[("file", ("a", b"1")), ("file", ("b", b"2"))])
    with pytest.raises(MultipartInvalid, match="sent twice"):
        read_all(request.read(), request.headers["content-type"], 1 << 20)
    request = httpx.Request("POST", "http://x/v1/files", data={"purpose": "x" * (MAX_FIELD_BYTES + 1)},
                            files={"file": ("a", b"1")})
    with pytest.raises(MultipartInvalid, match="purpose: longer than"):
        read_all(request.read(), request.headers["content-type"], 4096)


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data", ""])
def test_a_body_that_is_not_multipart_with_a_boundary_is_refused(content_type):
    with pytest.raises(MultipartInvalid):
        boundary_of(content_type)


def test_garbage_after_a_boundary_is_refused():
    form = UploadForm(b"xyz")
    with pytest.raises(MultipartInvalid, match="malformed"):
        form.feed(b"--xyzGARBAGE")


def test_half_written_uploads_of_a_killed_process_are_swept(tmp_path):
    folder = tmp_path / "uploads" / "tenant"
    folder.mkdir(parents=True)
    old, new, kept = folder / ".tmp-file-old", folder / ".tmp-file-new", folder / "file-done.bin"
    for path in (old, new, kept):
        path.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    os.utime(kept, (time.time() - 3600, time.time() - 3600))
    assert FileStore.remove_temp_files(tmp_path / "uploads", older_than=time.time() - 60) == [old]
    assert not old.exists() and new.exists() and kept.exists()
