"""The OpenAI Files API's uploads: the bytes on disk, one file each, and the ``files`` row naming it.

An upload is written to a temp file of its own in its tenant's folder, fsynced and renamed into
place before the row that names it is committed, so a committed row always names a complete file
and a failed or killed upload leaves no row (its temp file is removed, or found as an orphan).
"""

from __future__ import annotations

import builtins
import hashlib
import os
import secrets
from pathlib import Path
from typing import IO, Literal

from sqlalchemy import Engine, delete, insert, select, tuple_
from sqlalchemy.engine import RowMapping

from posttrain.domain.files import StoredFile
from posttrain.store.datasets import TEMP_PREFIX, _fsync_dir
from posttrain.store.jobs import _aware, utcnow
from posttrain.store.tables import files

#: How much of a stored file is read at a time when it is served.
CHUNK_BYTES = 1 << 20


class UploadTooLarge(Exception):
    """The upload passed its byte limit; nothing was kept."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the file is larger than {limit} bytes")
        self.limit = limit


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def _file(row: RowMapping) -> StoredFile:
    return StoredFile(id=row["id"], tenant=row["tenant"], filename=row["filename"], purpose=row["purpose"],
                      bytes=row["bytes"], path=row["path"], created_at=_aware(row["created_at"]))


class PendingUpload:
    """An upload being written: a temp file of its own in its tenant's folder (see the module
    docstring for why a committed row always names a complete file)."""

    def __init__(self, engine: Engine, tenant: str, folder: Path, file_id: str, max_bytes: int) -> None:
        self.engine, self.tenant, self.folder, self.id, self.max_bytes = engine, tenant, folder, file_id, max_bytes
        self.temp = folder / f"{TEMP_PREFIX}{file_id}"
        self.final = folder / f"{file_id}.bin"
        self.size = 0
        self._out: IO[bytes] | None = self.temp.open("xb")

    def write(self, chunk: bytes) -> None:
        """Add ``chunk``; ``UploadTooLarge`` (and nothing kept) past ``max_bytes``."""
        if self._out is None:
            raise ValueError("the upload is closed")
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.abort()
            raise UploadTooLarge(self.max_bytes)
        self._out.write(chunk)

    def commit(self, *, filename: str, purpose: str) -> StoredFile:
        if self._out is None:
            raise ValueError("the upload is closed")
        try:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
            self._out = None
            os.replace(self.temp, self.final)
            _fsync_dir(self.folder)
            created_at = utcnow()
            with self.engine.begin() as conn:
                conn.execute(insert(files).values(id=self.id, tenant=self.tenant, filename=filename, purpose=purpose,
                                                  bytes=self.size, path=str(self.final), created_at=created_at))
        except BaseException:
            self.abort()
            raise
        return StoredFile(id=self.id, tenant=self.tenant, filename=filename, purpose=purpose, bytes=self.size,
                          path=str(self.final), created_at=created_at)

    def abort(self) -> None:
        """Remove what was written (safe to call twice, or after a commit failed)."""
        if self._out is not None:
            self._out.close()
            self._out = None
        self.temp.unlink(missing_ok=True)
        self.final.unlink(missing_ok=True)


class FileStore:
    def __init__(self, engine: Engine, root: Path) -> None:
        self.engine = engine
        self.root = root

    def tenant_folder(self, tenant: str) -> Path:
        """A tenant's uploads folder: tenant names are configuration text, so the folder is named
        by a digest of the name (no separator or dot-dot can reach another folder)."""
        return self.root / hashlib.sha256(tenant.encode()).hexdigest()[:32]

    def begin(self, *, tenant: str, max_bytes: int) -> PendingUpload:
        """An upload to write chunk by chunk, then ``commit`` (all of it kept) or ``abort``."""
        folder = self.tenant_folder(tenant)
        folder.mkdir(parents=True, exist_ok=True)
        return PendingUpload(self.engine, tenant, folder, new_file_id(), max_bytes)

    def get(self, *, tenant: str, file_id: str) -> StoredFile | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(files).where(files.c.tenant == tenant, files.c.id == file_id)).mappings().first()
        return _file(row) if row else None

    def list(self, *, tenant: str, limit: int, order: Literal["asc", "desc"] = "desc", after_id: str | None = None,
             purpose: str | None = None) -> builtins.list[StoredFile] | None:
        """Up to ``limit`` of the tenant's files in ``order`` of (``created_at``, ``id``), starting
        after the file ``after_id``; ``None`` when the tenant has no such file. One keyset query on
        the index ``(tenant, created_at, id)`` with ``LIMIT``: a page costs the same however many
        files the tenant has."""
        query = select(files).where(files.c.tenant == tenant)
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        key = tuple_(files.c.created_at, files.c.id)
        with self.engine.connect() as conn:
            if after_id is not None:
                cursor = conn.execute(select(files.c.created_at, files.c.id)
                                      .where(files.c.tenant == tenant, files.c.id == after_id)).first()
                if cursor is None:
                    return None
                at = tuple_(cursor[0], cursor[1])
                query = query.where(key < at if order == "desc" else key > at)
            if order == "desc":
                query = query.order_by(files.c.created_at.desc(), files.c.id.desc())
            else:
                query = query.order_by(files.c.created_at, files.c.id)
            return [_file(r) for r in conn.execute(query.limit(limit)).mappings()]

    def open(self, stored: StoredFile) -> IO[bytes]:
        return Path(stored.path).open("rb")

    @staticmethod
    def remove_temp_files(root: Path, *, older_than: float) -> builtins.list[Path]:
        """Remove uploads a killed process left half-written (temp files last changed before
        ``older_than``, a Unix time); a committed upload is never a temp file."""
        removed = []
        for temp in root.glob(f"*/{TEMP_PREFIX}*") if root.is_dir() else ():
            try:
                if temp.stat().st_mtime < older_than:
                    temp.unlink()
                    removed.append(temp)
            except FileNotFoundError:
                continue
        return removed

    def delete(self, *, tenant: str, file_id: str) -> bool:
        with self.engine.begin() as conn:
            path = conn.execute(
                delete(files).where(files.c.tenant == tenant, files.c.id == file_id).returning(files.c.path)
            ).scalar()
        if path is None:
            return False
        # Jobs trained on the file hold their own copy of its rows.
        Path(path).unlink(missing_ok=True)
        return True
