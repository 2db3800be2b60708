"""An uploaded file of the OpenAI Files API, as the store keeps it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class StoredFile:
    """One upload: ``id`` is the service's ("file-…"), ``path`` the complete file on disk."""

    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    path: str
    created_at: datetime
