"""Wiring the services to one store: what the API (and the CLI) need, built in one place."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Engine

from posttrain.services.access import AccessControl, parse_key_lines
from posttrain.services.datasets import DatasetService
from posttrain.services.jobs import JobService
from posttrain.settings import Settings
from posttrain.store.datasets import DatasetStore
from posttrain.store.engine import at_head, make_engine, migrate, store_usable
from posttrain.store.jobs import JobStore

log = logging.getLogger("posttrain.services")


@dataclass
class Services:
    settings: Settings
    engine: Engine
    jobs: JobService
    datasets: DatasetService
    access: AccessControl

    def ready(self) -> bool:
        """The store can be read and written within ``ready_timeout_seconds`` and its schema is at
        the newest revision (a store another process holds locked is not ready)."""
        try:
            store_usable(self.engine, timeout_seconds=self.settings.ready_timeout_seconds)
            return at_head(self.engine)
        except Exception:  # readiness reports, it does not raise
            log.warning("store not ready", exc_info=True, extra={"action": "store_not_ready"})
            return False

    def close(self) -> None:
        self.engine.dispose()


def build_services(settings: Settings) -> Services:
    """Create the data folders, migrate the store to head, and build the services on it."""
    settings.ensure_dirs()
    engine = make_engine(settings.resolved_database_url, busy_timeout_seconds=settings.store_busy_timeout_seconds)
    migrate(engine)
    job_store = JobStore(engine)
    dataset_store = DatasetStore(engine, settings.datasets_dir)
    return Services(
        settings=settings,
        engine=engine,
        jobs=JobService(store=job_store, datasets=dataset_store, settings=settings),
        datasets=DatasetService(store=dataset_store, settings=settings),
        access=build_access(settings),
    )


def build_access(settings: Settings) -> AccessControl:
    keys = parse_key_lines(settings.api_keys_file.read_text()) if settings.api_keys_file else {}
    if settings.api_keys_file and not keys:
        raise ValueError(f"{settings.api_keys_file} holds no API keys; add one with `posttrain keys create TENANT`")
    return AccessControl(keys=keys, requests_per_minute=settings.rate_limit_per_minute)
