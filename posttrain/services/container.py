"""Wiring the services to one store: what the API (and the CLI) need, built in one place."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, select

from posttrain.services.access import AccessControl, parse_key_lines
from posttrain.services.datasets import DatasetService
from posttrain.services.files import FileService
from posttrain.services.fine_tuning import FineTuningService
from posttrain.services.jobs import JobService
from posttrain.services.model_catalog import ModelCatalog
from posttrain.services.serving import ServingClient
from posttrain.settings import Settings
from posttrain.store.datasets import DatasetStore
from posttrain.store.engine import at_head, make_engine, migrate, store_usable
from posttrain.store.files import FileStore
from posttrain.store.jobs import JobStore
from posttrain.store.model_catalog import ModelCatalogStore
from posttrain.store.sessions import SessionStore
from posttrain.store.tables import jobs as jobs_table

log = logging.getLogger("posttrain.services")

PROCESS_START = time.time()
"""Files last changed before this were left by an earlier process, never by a write of this one."""

ORPHAN_GRACE_SECONDS = 300.0
"""How much older than this process a leftover must be to be removed: another server sharing the
data folder may be between publishing a file and committing the row that names it."""


@dataclass
class Services:
    settings: Settings
    engine: Engine
    jobs: JobService
    datasets: DatasetService
    access: AccessControl
    #: Built from the others when not given (the OpenAI Files and fine-tuning APIs).
    files: FileService | None = None
    fine_tuning: FineTuningService | None = None
    #: Every model a tenant can use by id: the bases and what its jobs trained (the models API).
    models: ModelCatalog | None = None
    #: The serving worker's client (started on the first generation request, stopped on close).
    serving: ServingClient | None = None

    def __post_init__(self) -> None:
        if self.serving is None:
            self.serving = ServingClient(self.settings)
        if self.files is None:
            self.files = FileService(store=FileStore(self.engine, uploads_dir(self.settings)), settings=self.settings)
        if self.fine_tuning is None:
            self.fine_tuning = FineTuningService(jobs=self.jobs, files=self.files, datasets=self.jobs.datasets,
                                                 settings=self.settings)
        if self.models is None:
            self.models = ModelCatalog(store=ModelCatalogStore(self.engine), settings=self.settings)

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
        if self.serving is not None:
            self.serving.close()
        self.engine.dispose()


def build_services(settings: Settings) -> Services:
    """Create the data folders, migrate the store to head, and build the services on it."""
    settings.ensure_dirs()
    engine = make_engine(settings.resolved_database_url, busy_timeout_seconds=settings.store_busy_timeout_seconds)
    migrate(engine)
    job_store = JobStore(engine, listed_checkpoints=settings.max_checkpoints_per_job)
    dataset_store = DatasetStore(engine, settings.datasets_dir)
    remove_orphans(engine, dataset_store, settings.jobs_dir)
    swept = FileStore.remove_temp_files(uploads_dir(settings), older_than=PROCESS_START - ORPHAN_GRACE_SECONDS)
    if swept:
        log.info("removed uploads a killed process left", extra={"action": "orphans_removed",
                                                                  "paths": [str(p) for p in swept]})
    return Services(
        settings=settings,
        engine=engine,
        jobs=JobService(store=job_store, datasets=dataset_store, settings=settings),
        datasets=DatasetService(store=dataset_store, settings=settings),
        access=build_access(settings, engine),
    )


def uploads_dir(settings: Settings) -> Path:
    """Where the OpenAI Files API keeps uploads: one folder per tenant inside it."""
    return settings.resolved_home / "uploads"


def remove_orphans(engine: Engine, dataset_store: DatasetStore, jobs_dir: Path) -> None:
    """Remove what a process killed mid-registration or mid-submit left: dataset temp files and
    rows files no record names, and job folders no jobs row names, all older than this process
    by ``ORPHAN_GRACE_SECONDS`` (so no write under way, here or in a server sharing the folder,
    is touched)."""
    cutoff = PROCESS_START - ORPHAN_GRACE_SECONDS
    removed = [str(p) for p in dataset_store.remove_orphans(older_than=cutoff)]
    if jobs_dir.is_dir():
        folders = [p for p in jobs_dir.iterdir() if p.is_dir() and p.stat().st_mtime < cutoff]
        if folders:
            with engine.connect() as conn:
                known = set(conn.execute(select(jobs_table.c.id)).scalars())
            for folder in folders:
                if folder.name not in known:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(str(folder))
    if removed:
        log.info("removed orphans of a killed process", extra={"action": "orphans_removed", "paths": removed})


def build_access(settings: Settings, engine: Engine | None = None) -> AccessControl:
    keys = parse_key_lines(settings.api_keys_file.read_text()) if settings.api_keys_file else {}
    if settings.api_keys_file and not keys:
        raise ValueError(f"{settings.api_keys_file} holds no API keys; add one with `posttrain keys create TENANT`")
    return AccessControl(keys=keys, requests_per_minute=settings.rate_limit_per_minute,
                         sessions=SessionStore(engine) if engine is not None else None,
                         failed_auth_per_minute=settings.failed_auth_per_minute,
                         sign_in_attempts_per_minute=settings.sign_in_attempts_per_minute,
                         body_bytes_per_minute=settings.body_bytes_per_minute,
                         max_body_bytes=settings.max_body_bytes)
