"""A registered dataset. Its rows live in a JSON-lines file under the data folder, not in the database."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Dataset:
    identifier: str
    tenant: str
    purpose: str
    source: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    row_count: int = 0
    rows_path: str = ""
    created_at: datetime | None = None
