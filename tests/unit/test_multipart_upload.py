"""The streaming multipart reader of ``POST /v1/files``: the same events whatever the chunking (a
boundary split across chunks included), and malformed bodies refused."""

from __future__ import annotations

import os
import time

import httpx
import pytest

from posttrain.api.multipart_upload import Data, MultipartInvalid, MultipartReader, Part, boundary_of
from posttrain.store.files import FileStore

CONTENT = b"line one\r\n--not-the-boundary\r\nline two\r\n" * 3


def encoded() -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/v1/files", data={"purpose": "fine-tune"},
                            files={"file": ("train.jsonl", CONTENT, "application/jsonl")})
    return request.read(), request.headers["content-type"]


def read_all(body: bytes, content_type: str, size: int) -> tuple[dict[str, bytes], list[Part], bool]:
    reader = MultipartReader(boundary_of(content_type))
    fields: dict[str, bytes] = {}
    parts: list[Part] = []
    for start in range(0, len(body), size):
        for event in reader.feed(body[start:start + size]):
            if isinstance(event, Part):
                parts.append(event)
                fields[event.name] = b""
            else:
                assert isinstance(event, Data)
                fields[parts[-1].name] += event.data
    return fields, parts, reader.done


@pytest.mark.parametrize("size", [1, 2, 3, 7, 31, 64, 1000, 1 << 20])
def test_every_chunking_gives_the_same_fields(size):
    body, content_type = encoded()
    fields, parts, done = read_all(body, content_type, size)
    assert done
    assert fields == {"purpose": b"fine-tune", "file": CONTENT}
    assert [(p.name, p.filename) for p in parts] == [("purpose", None), ("file", "train.jsonl")]


def test_a_truncated_body_is_not_done():
    body, content_type = encoded()
    _, _, done = read_all(body[:-10], content_type, 100)
    assert not done


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data", ""])
def test_a_body_that_is_not_multipart_with_a_boundary_is_refused(content_type):
    with pytest.raises(MultipartInvalid):
        boundary_of(content_type)


def test_garbage_after_a_boundary_is_refused():
    reader = MultipartReader(b"xyz")
    with pytest.raises(MultipartInvalid):
        reader.feed(b"--xyzGARBAGE")


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
