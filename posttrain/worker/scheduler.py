"""The scheduler: reaps lost jobs, claims scheduled ones up to the free slots, launches each.

It runs in a background thread of ``posttrain serve`` (the embedded default) or alone in
``posttrain worker``; several schedulers may share one PostgreSQL store, since claiming is atomic.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

from posttrain.domain.jobs import Job
from posttrain.errors import StoreUnavailable
from posttrain.store.jobs import JobStore
from posttrain.worker.devices import GpuPool
from posttrain.worker.launcher import LaunchConfig, Launcher
from posttrain.worker.search import SearchDriver
from posttrain.worker.warm import WarmPool

log = logging.getLogger("posttrain.worker")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Scheduler:
    def __init__(self, *, store: JobStore, slots: int, poll_seconds: float, config: LaunchConfig,
                 owner: str | None = None, warm: WarmPool | None = None, gpus: list[str] | None = None) -> None:
        self.store = store
        self.gpus = GpuPool(gpus or [], per_job=config.devices_per_job)
        self.warm = warm
        self.slots = slots
        self.poll_seconds = poll_seconds
        self.config = config
        self.owner = owner or worker_id()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._active: dict[str, tuple[Launcher, threading.Thread]] = {}
        #: Hyperparameter searches this worker drives (worker/search.py): they take no slot.
        self._drivers: dict[str, tuple[SearchDriver, threading.Thread]] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="posttrain-scheduler", daemon=True)
        self._thread.start()
        log.info("scheduler %s started with %d slot(s)%s", self.owner, self.slots,
                 f", one job per GPU on {','.join(self.gpus.gpus)}" if self.gpus.enabled else "",
                 extra={"action": "scheduler_started"})

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming, stop running trainers and hand their jobs back to the queue."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=timeout)
        with self._lock:
            active = list(self._active.values())
            drivers = list(self._drivers.values())
        for launcher, _ in active:
            launcher.request_shutdown()
        for driver, _ in drivers:
            driver.request_shutdown()
        for _, thread in [*active, *drivers]:
            thread.join(timeout=timeout)
        if self.warm is not None:
            self.warm.close()
        log.info("scheduler %s stopped", self.owner, extra={"action": "scheduler_stopped"})

    def run_forever(self) -> None:
        """For ``posttrain worker``: the loop in the calling thread, until ``stop``."""
        self._loop()

    @property
    def running(self) -> list[str]:
        with self._lock:
            return list(self._active)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except StoreUnavailable as exc:  # the store is locked or away: try again next tick
                log.warning("scheduler tick waits for the store: %s", exc, extra={"action": "store_unavailable"})
            except Exception:  # nor may anything else end the loop
                log.exception("scheduler tick failed", extra={"action": "scheduler_tick_failed"})
            self._stop.wait(self.poll_seconds)

    def tick(self) -> None:
        for job_id, status in self.store.requeue_expired():
            log.warning("job %s lost its worker; now %s", job_id, status.value,
                        extra={"action": "job_requeued", "job_id": job_id})
        with self._lock:
            for job_id in [j for j, (_, t) in self._active.items() if not t.is_alive()]:
                self.gpus.give_back(self._active.pop(job_id)[0].gpu)
            for job_id in [j for j, (_, t) in self._drivers.items() if not t.is_alive()]:
                del self._drivers[job_id]
            free = self.slots - len(self._active)
            if self.gpus.enabled:  # one job per GPU
                free = min(free, self.gpus.free())
        while free > 0 and not self._stop.is_set():
            job = self.store.claim_next(owner=self.owner, lease_seconds=self.config.lease_seconds)
            if job is None:
                break
            if job.search is not None and job.parent_job_id is None:
                self._drive(job)
                continue
            launcher = Launcher(job=job, owner=self.owner, store=self.store, config=self.config,
                                warm=self.warm.take() if self.warm else None, gpu=self.gpus.take())
            thread = threading.Thread(target=launcher.run, name=f"launcher-{job.id[:8]}", daemon=True)
            with self._lock:
                self._active[job.id] = (launcher, thread)
            thread.start()
            log.info("claimed job %s (attempt %d)", job.job_uuid, job.attempt,
                     extra={"action": "job_claimed", "job_id": job.id})
            free -= 1
        while not self._stop.is_set():  # a search's driver takes no slot: claim one even when they are all busy
            search = self.store.claim_next(owner=self.owner, lease_seconds=self.config.lease_seconds, searches_only=True)
            if search is None:
                break
            self._drive(search)
        if self.warm is not None and free > 0 and not self._stop.is_set():
            self.warm.refill()  # an idle slot keeps a trainer warm for the next job

    def _drive(self, job: Job) -> None:
        """Run a claimed hyperparameter search's driver in a thread; it holds the search's lease."""
        driver = SearchDriver(job=job, owner=self.owner, store=self.store, lease_seconds=self.config.lease_seconds,
                              tick_seconds=min(self.config.heartbeat_seconds, 1.0))
        thread = threading.Thread(target=driver.run, name=f"search-{job.id[:8]}", daemon=True)
        with self._lock:
            self._drivers[job.id] = (driver, thread)
        thread.start()
        log.info("claimed search %s (attempt %d)", job.job_uuid, job.attempt,
                 extra={"action": "search_claimed", "job_id": job.id})


def launch_config_from(settings) -> LaunchConfig:  # noqa: ANN001 - posttrain.settings.Settings
    return LaunchConfig(
        lease_seconds=settings.lease_seconds,
        heartbeat_seconds=settings.heartbeat_seconds,
        cancel_grace_seconds=settings.cancel_grace_seconds,
        device=settings.device,
        cpu_bf16=settings.cpu_bf16,
        compile=settings.compile,
        resume_point_seconds=settings.resume_point_seconds,
        threads=settings.trainer_threads,
        nice=settings.trainer_nice,
        trust_remote_code=settings.trust_remote_code,
        save_merged=settings.save_merged_checkpoints,
        keep_checkpoints=settings.keep_checkpoints,
        max_checkpoints_per_job=settings.max_checkpoints_per_job,
        wandb_mode=settings.wandb_mode,
        wandb_dir=str(settings.resolved_wandb_dir),
        grader_hidden_paths=tuple(settings.grader_hidden_paths),
        devices_per_job=settings.devices_per_job,
    )
