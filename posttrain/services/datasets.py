"""Registering, reading and removing datasets (the Datasets and DatasetIO APIs)."""

from __future__ import annotations

import builtins
import dataclasses
import re
import uuid
from typing import Any

from posttrain.domain.datasets import Dataset
from posttrain.domain.rows import RowFormatError, require_known_layouts
from posttrain.errors import DatasetNotFound, DatasetSourceInvalid, DuplicateDataset, InvalidRequest
from posttrain.services.dataset_sources import load_uri_rows, validate_rows
from posttrain.services.http_sources import HttpPolicy
from posttrain.services.paths import areas_of
from posttrain.settings import Settings
from posttrain.store.datasets import DatasetStore


class DatasetService:
    def __init__(self, *, store: DatasetStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def register(
        self,
        *,
        tenant: str,
        purpose: str,
        source: dict[str, Any],
        metadata: dict[str, Any] | None,
        dataset_id: str | None,
    ) -> Dataset:
        identifier = dataset_id if dataset_id is not None else f"dataset-{uuid.uuid4()}"
        if not identifier or len(identifier) > 255 or any(ord(c) < 32 for c in identifier):
            raise InvalidRequest("dataset_id: must be 1 to 255 printable characters")
        if self.store.get(tenant=tenant, identifier=identifier) is not None:
            raise DuplicateDataset(f"a dataset with id '{identifier}' already exists")
        if source["type"] == "rows":
            rows = validate_rows(source["rows"], max_rows=self.settings.max_dataset_rows)
        else:
            rows = load_uri_rows(
                source["uri"],
                file_roots=list(areas_of(self.settings, tenant).readable),  # its own area and the shared roots
                hf_cache=self.settings.hf_cache,
                max_rows=self.settings.max_dataset_rows,
                http=HttpPolicy(
                    enabled=self.settings.allow_http_datasets,
                    allow_private=self.settings.http_dataset_allow_private,
                    max_bytes=self.settings.http_dataset_max_bytes,
                    timeout_seconds=self.settings.http_dataset_timeout_seconds,
                ),
            )
        _refuse_unknown_layouts(rows)
        return self.store.create(
            tenant=tenant, identifier=identifier, purpose=purpose, source=source, metadata=metadata or {}, rows=rows
        )

    def get(self, *, tenant: str, dataset_id: str) -> Dataset:
        found = self.store.get(tenant=tenant, identifier=dataset_id)
        if found is None:
            raise DatasetNotFound(f"no dataset with id '{dataset_id}'")
        return encodable(found)

    def list(self, *, tenant: str) -> list[Dataset]:
        return [encodable(dataset) for dataset in self.store.list(tenant=tenant)]

    def unregister(self, *, tenant: str, dataset_id: str) -> None:
        if not self.store.delete(tenant=tenant, identifier=dataset_id):
            raise DatasetNotFound(f"no dataset with id '{dataset_id}'")

    def iterrows(
        self, *, tenant: str, dataset_id: str, start_index: int | None, limit: int | None
    ) -> tuple[builtins.list[dict[str, Any]], bool]:
        """A page of rows and whether more follow. ``limit`` None or -1 means all the rest."""
        self.get(tenant=tenant, dataset_id=dataset_id)  # an unknown id is a 404 before a bad page is a 400
        start = start_index or 0
        if start < 0:
            raise InvalidRequest(f"start_index: must be 0 or more, got {start}")
        if limit is not None and limit < -1:
            raise InvalidRequest(f"limit: must be -1 (all) or 0 or more, got {limit}")
        count = None if limit in (None, -1) else limit
        # Read the file the record names, opened once: a concurrent append or unregister swaps in
        # another file and cannot tear this page; rows past the record's row_count are never served.
        opened = self.store.open_rows(tenant=tenant, identifier=dataset_id)
        if opened is None:
            raise DatasetNotFound(f"no dataset with id '{dataset_id}'")
        current, handle = opened
        with handle:
            rows = list(self.store.read_rows(handle, row_count=current.row_count, start=start, limit=count))
        has_more = start + len(rows) < current.row_count
        return rows, has_more

    def append_rows(self, *, tenant: str, dataset_id: str, rows: Any) -> None:
        dataset = self.get(tenant=tenant, dataset_id=dataset_id)
        limit = self.settings.max_dataset_rows
        checked = validate_rows(rows, max_rows=None)
        _refuse_unknown_layouts(checked)
        if limit is not None and dataset.row_count + len(checked) > limit:
            raise DatasetSourceInvalid(f"rows: the dataset would hold more than {limit} rows, the most this server keeps")
        if self.store.append(tenant=tenant, identifier=dataset_id, rows=checked) is None:
            raise DatasetNotFound(f"no dataset with id '{dataset_id}'")


def _refuse_unknown_layouts(rows: list[dict[str, Any]]) -> None:
    """Refuse, before anything is written, rows that fit no layout the trainer reads.

    Without this a dataset of such rows registers and the job fails at its first second; the
    trainer still checks again. Rows are numbered from 0 as sent (for an append: in the request).
    """
    try:
        require_known_layouts(rows)
    except RowFormatError as exc:
        raise DatasetSourceInvalid(str(exc)) from exc


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(dataset: Dataset) -> Dataset:
    """The dataset with every lone surrogate in its text replaced by U+FFFD.

    Requests carrying one are refused now (``api/json_body.py``), but records stored before that
    fix may hold one in their metadata; no UTF-8 response can encode it, so one such record made
    the tenant's whole listing a 500. A str holds a surrogate code point only when it is lone
    (JSON's valid pairs decode to one character)."""
    fields = {"identifier": dataset.identifier, "purpose": dataset.purpose, "source": dataset.source,
              "metadata": dataset.metadata}
    if not _has_surrogate(fields):
        return dataset
    return dataclasses.replace(dataset, **{name: _replaced(value) for name, value in fields.items()})


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _LONE_SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_surrogate(v) for v in value)
    return False


def _replaced(value: Any) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_replaced(k): _replaced(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_replaced(v) for v in value]
    return value
