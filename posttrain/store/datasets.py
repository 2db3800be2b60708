"""Dataset records. The rows themselves are a JSON-lines file per dataset under the data folder;
this module owns both, so the file and its record are written and removed together."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError

from posttrain.domain.datasets import Dataset
from posttrain.errors import DuplicateDataset
from posttrain.store.jobs import _aware, utcnow
from posttrain.store.tables import datasets


def _dataset(row: RowMapping) -> Dataset:
    return Dataset(
        identifier=row["identifier"],
        tenant=row["tenant"],
        purpose=row["purpose"],
        source=row["source"],
        metadata=row["metadata"] or {},
        row_count=row["row_count"],
        rows_path=row["rows_path"],
        created_at=_aware(row["created_at"]),
    )


def _write_rows(path: Path, rows: list[dict[str, Any]], *, append: bool) -> None:
    """Write rows as JSON lines and fsync, so a registered dataset survives a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False))
            handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


class DatasetStore:
    def __init__(self, engine: Engine, root: Path) -> None:
        self.engine = engine
        self.root = root

    def _rows_path(self, tenant: str, identifier: str) -> Path:
        # Identifiers are user text: keep a readable, separator-free stem and a digest for uniqueness.
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in identifier)[:80] or "_"
        digest = hashlib.sha256(f"{tenant}\0{identifier}".encode()).hexdigest()[:16]
        return self.root / f"{safe}-{digest}.jsonl"

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
        path = self._rows_path(tenant, identifier)
        tmp = path.with_suffix(".jsonl.tmp")
        _write_rows(tmp, rows, append=False)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(datasets).values(
                        tenant=tenant,
                        identifier=identifier,
                        purpose=purpose,
                        source=source,
                        metadata=metadata,
                        row_count=len(rows),
                        rows_path=str(path),
                        created_at=utcnow(),
                    )
                )
                os.replace(tmp, path)
        except IntegrityError as exc:
            tmp.unlink(missing_ok=True)
            raise DuplicateDataset(f"a dataset with id '{identifier}' already exists") from exc
        found = self.get(tenant=tenant, identifier=identifier)
        assert found is not None
        return found

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
        found = self.get(tenant=tenant, identifier=identifier)
        if found is None:
            return False
        with self.engine.begin() as conn:
            conn.execute(delete(datasets).where(datasets.c.tenant == tenant, datasets.c.identifier == identifier))
        # A job that was submitted with this dataset already holds its own copy of the rows.
        Path(found.rows_path).unlink(missing_ok=True)
        return True

    def append(self, *, tenant: str, identifier: str, rows: builtins.list[dict[str, Any]]) -> Dataset | None:
        found = self.get(tenant=tenant, identifier=identifier)
        if found is None:
            return None
        with self.engine.begin() as conn:
            conn.execute(
                update(datasets)
                .where(datasets.c.tenant == tenant, datasets.c.identifier == identifier)
                .values(row_count=datasets.c.row_count + len(rows))
            )
            _write_rows(Path(found.rows_path), rows, append=True)
        return self.get(tenant=tenant, identifier=identifier)

    @staticmethod
    def iter_rows(dataset: Dataset, *, start: int = 0, limit: int | None = None) -> Iterator[dict[str, Any]]:
        with open(dataset.rows_path, encoding="utf-8") as handle:
            for index, line in enumerate(handle):
                if index < start:
                    continue
                if limit is not None and index >= start + limit:
                    return
                yield json.loads(line)
