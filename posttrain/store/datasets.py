"""Dataset records. The rows themselves are a JSON-lines file per dataset version under the data
folder; this module owns both, so the file and its record are switched together."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError

from posttrain.domain.datasets import Dataset
from posttrain.errors import DatasetNotFound, DuplicateDataset
from posttrain.store.jobs import _aware, utcnow
from posttrain.store.tables import datasets


def _dataset(row: RowMapping) -> Dataset:
    return Dataset(
        identifier=row["identifier"],
        tenant=row["tenant"],
        purpose=row["purpose"],
        source=_stored_source(row["source"]),
        metadata=row["metadata"] or {},
        row_count=row["row_count"],
        rows_path=row["rows_path"],
        created_at=_aware(row["created_at"]),
    )


TEMP_PREFIX = ".tmp-"
"""Rows files being written start with this; one left behind was written by a process that died."""


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish_rows(final: Path, rows: list[dict[str, Any]], *, copy_from: Path | None = None) -> None:
    """Write ``final`` whole or not at all: a temp file of its own in the same folder (so two
    writers never share one), fsync, rename, fsync the folder. ``copy_from`` is the file whose
    rows come first (an append). A failure at any point removes the temp file and leaves
    ``final`` absent."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".jsonl", dir=final.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            if copy_from is not None:
                with open(copy_from, encoding="utf-8") as old:
                    shutil.copyfileobj(old, handle)
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False))
                handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


_RETRIES = 8
"""How often a read or append looks again when a concurrent write replaced the file it was given."""


def _lost_rows(identifier: str) -> DatasetNotFound:
    # Only a record written before rows files were switched with their record can name a missing file.
    return DatasetNotFound(f"dataset '{identifier}' has lost its rows file; unregister it and register it again")


def _stored_source(source: dict[str, Any]) -> dict[str, Any]:
    """The source as the record keeps it: inline rows live in the rows file only, so the record
    (and every list and get built from it) stays the size of its metadata."""
    if source.get("type") == "rows":
        return {**source, "rows": []}
    return source


class DatasetStore:
    """Datasets whose record and rows file are switched together.

    Every version of a dataset's rows is its own file, named once (``<stem>-<random>.jsonl``)
    and recorded in the row's ``rows_path``. A write publishes the new file whole (temp file,
    fsync, rename) *before* the database commit that names it, and removes the file it replaced
    only after that commit. So a committed record always names a complete file, and a reader
    that opens the file its record names sees one version, never a torn one.

    Appends copy the current file to a new one and add the rows (copy-on-write), rather than
    appending in place with a committed ``row_count``: in place, a failure or kill mid-write
    leaves bytes past ``row_count`` that every reader, and every copy a job takes of the file,
    would have to know to skip, and the next append would have to truncate first. Copying costs
    one read of the file per append (bounded by ``max_dataset_rows``) and needs no reader to
    cooperate. Two appends racing on one dataset: the commit is conditional on ``rows_path``
    being the file the append copied, so the loser retries on the winner's file.
    """

    def __init__(self, engine: Engine, root: Path) -> None:
        self.engine = engine
        self.root = root

    def _new_rows_path(self, tenant: str, identifier: str) -> Path:
        # Identifiers are user text: keep a readable, separator-free stem, a digest for the pair,
        # and a random part so each version of the rows has a file no other write touches.
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in identifier)[:80] or "_"
        digest = hashlib.sha256(f"{tenant}\0{identifier}".encode()).hexdigest()[:16]
        return self.root / f"{safe}-{digest}-{uuid.uuid4().hex[:12]}.jsonl"

    def create(
        self,
        *,
        tenant: str,
        identifier: str,
        purpose: str,
        source: dict[str, Any],
        metadata: dict[str, Any],
        rows: list[dict[str, Any]],
    ) -> Dataset:
        """Record the dataset; the returned one carries ``source`` as given (the stored one keeps
        inline rows only in the rows file)."""
        path = self._new_rows_path(tenant, identifier)
        _publish_rows(path, rows)
        created_at = utcnow()
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(datasets).values(
                        tenant=tenant,
                        identifier=identifier,
                        purpose=purpose,
                        source=_stored_source(source),
                        metadata=metadata,
                        row_count=len(rows),
                        rows_path=str(path),
                        created_at=created_at,
                    )
                )
        except IntegrityError as exc:
            path.unlink(missing_ok=True)
            raise DuplicateDataset(f"a dataset with id '{identifier}' already exists") from exc
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return Dataset(identifier=identifier, tenant=tenant, purpose=purpose, source=source, metadata=metadata,
                       row_count=len(rows), rows_path=str(path), created_at=created_at)

    def get(self, *, tenant: str, identifier: str) -> Dataset | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(datasets).where(datasets.c.tenant == tenant, datasets.c.identifier == identifier)
            ).mappings().first()
        return _dataset(row) if row else None

    def list(self, *, tenant: str) -> list[Dataset]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(datasets).where(datasets.c.tenant == tenant).order_by(datasets.c.created_at, datasets.c.identifier)
            ).mappings()
            return [_dataset(r) for r in rows]

    def delete(self, *, tenant: str, identifier: str) -> bool:
        with self.engine.begin() as conn:
            path = conn.execute(
                delete(datasets)
                .where(datasets.c.tenant == tenant, datasets.c.identifier == identifier)
                .returning(datasets.c.rows_path)
            ).scalar()
        if path is None:
            return False
        # The file this record named, and no other: a re-registration under the same id has its own.
        # A job that was submitted with this dataset already holds its own copy of the rows.
        Path(path).unlink(missing_ok=True)
        return True

    def append(self, *, tenant: str, identifier: str, rows: builtins.list[dict[str, Any]]) -> Dataset | None:
        """Add ``rows`` after the dataset's rows, all or nothing (see the class docstring)."""
        for _ in range(_RETRIES):
            found = self.get(tenant=tenant, identifier=identifier)
            if found is None:
                return None
            new_path = self._new_rows_path(tenant, identifier)
            try:
                _publish_rows(new_path, rows, copy_from=Path(found.rows_path))
            except FileNotFoundError:
                continue  # another append or an unregister replaced the file: look again
            try:
                with self.engine.begin() as conn:
                    switched = conn.execute(
                        update(datasets)
                        .where(datasets.c.tenant == tenant, datasets.c.identifier == identifier,
                               datasets.c.rows_path == found.rows_path)
                        .values(row_count=found.row_count + len(rows), rows_path=str(new_path))
                    ).rowcount
            except BaseException:
                new_path.unlink(missing_ok=True)
                raise
            if switched:
                Path(found.rows_path).unlink(missing_ok=True)
                return self.get(tenant=tenant, identifier=identifier)
            new_path.unlink(missing_ok=True)
        raise _lost_rows(identifier)

    def open_rows(self, *, tenant: str, identifier: str) -> tuple[Dataset, IO[str]] | None:
        """The dataset and its rows file, opened: the open handle keeps reading the version its
        record named even if an append or unregister replaces it meanwhile. None: no such dataset."""
        for _ in range(_RETRIES):
            found = self.get(tenant=tenant, identifier=identifier)
            if found is None:
                return None
            try:
                return found, open(found.rows_path, encoding="utf-8")  # the caller closes it
            except FileNotFoundError:
                continue  # replaced between the read of the record and the open: look again
        raise _lost_rows(identifier)

    @staticmethod
    def read_rows(handle: IO[str], *, row_count: int, start: int = 0,
                  limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Rows ``start`` onwards (at most ``limit``), never past the ``row_count`` the record holds."""
        stop = row_count if limit is None else min(row_count, start + limit)
        for index, line in enumerate(handle):
            if index >= stop:
                return
            if index >= start:
                yield json.loads(line)

    @staticmethod
    def iter_rows(dataset: Dataset, *, start: int = 0, limit: int | None = None) -> Iterator[dict[str, Any]]:
        with open(dataset.rows_path, encoding="utf-8") as handle:
            yield from DatasetStore.read_rows(handle, row_count=dataset.row_count, start=start, limit=limit)

    # -- start-up cleanup ------------------------------------------------------------------------

    def remove_orphans(self, *, older_than: float) -> builtins.list[Path]:
        """Remove what a killed write left in the datasets folder: temp files (by their prefix)
        and rows files no record names, each last changed before ``older_than`` (the process
        start, so no write of this process is touched). Returns what was removed."""
        if not self.root.is_dir():
            return []
        # ``.jsonl.tmp``: the one shared temp name writes used before each had its own.
        candidates = [p for p in self.root.iterdir() if p.is_file() and p.name.endswith((".jsonl", ".jsonl.tmp"))
                      and p.stat().st_mtime < older_than]
        if not candidates:
            return []
        with self.engine.connect() as conn:
            named = {Path(p) for p in conn.execute(select(datasets.c.rows_path)).scalars()}
        removed = []
        for path in candidates:
            if path.name.startswith(TEMP_PREFIX) or path.name.endswith(".tmp") or path not in named:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed
