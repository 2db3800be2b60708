"""Running one claimed job: spawn the trainer process, hold the job's lease, record its reports.

The trainer speaks JSON lines on stdout (docs/trainer-protocol.md). This launcher owns the lease:
it renews it while the trainer lives, and every write it makes is guarded by (owner, attempt),
so once the job has moved on (cancelled, requeued after a lost lease) nothing it says counts.

A renewal that finds the job ``pausing`` (the user paused it) asks the trainer to pause: SIGUSR1
once it has reported ``started`` (its handler is installed by then), after which it writes a resume
point at the next step boundary, reports ``paused`` and exits; before that, nothing has been
trained, so it is simply stopped. Either way the job is then parked (``paused``, no lease, the
attempt not charged) and the slot is free.

A job on several devices (``POSTTRAIN_DEVICES_PER_JOB``, docs/scale-out.md) is started with torch's
own launcher, ``python -m torch.distributed.run --standalone --nproc-per-node N -m posttrain.trainer
SPEC``, which starts the N ranks (each in a session of its own) and watches them: rank 0 speaks the
protocol on the stdout they share, the others write nothing there. SIGTERM to it reaches every rank
(it forwards the signal); a rank that dies makes it stop the others and exit non-zero, so the
attempt ends like any lost trainer and the job is requeued from its newest checkpoint. A pause's
SIGUSR1 goes to the ranks themselves (torch's launcher would take it as a signal to die); the
ranks agree at the next step boundary and pause together.

A store hiccup (``StoreUnavailable``: locked by another process, a dropped connection) does not
end the attempt: a missed lease renewal is tried again at the next beat, and every other write
(events, checkpoints, the job's end) is retried with backoff until it lands or the lease is
lost. Only a hiccup longer than the lease lets the job be requeued.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, TypedDict, TypeVar

from posttrain.domain.jobs import Job, JobStatus
from posttrain.domain.pins import pin_problem
from posttrain.domain.protocol import (
    TERMINAL_EVENTS,
    AnyEvent,
    Cancelled,
    CheckpointWritten,
    Completed,
    Failed,
    FailureCode,
    Paused,
    ProtocolError,
    Started,
    StepMetric,
    parse_line,
)
from posttrain.domain.recipes import JobKind, TrainerSpec
from posttrain.errors import LeaseLost, StoreUnavailable
from posttrain.store.jobs import JobStore
from posttrain.worker.warm import log_tail, spawn_trainer, trainer_command

log = logging.getLogger("posttrain.worker")

#: How often buffered per-step metrics are written to the store.
METRIC_FLUSH_SECONDS = 0.5

#: Backoff between retries of a write the store could not take (doubling up to the cap).
RETRY_FIRST_SECONDS = 0.1
RETRY_MAX_SECONDS = 2.0

_T = TypeVar("_T")


@dataclass
class LaunchConfig:
    lease_seconds: float
    heartbeat_seconds: float
    cancel_grace_seconds: float
    device: str = "auto"
    cpu_bf16: bool = True
    compile: str = "auto"
    resume_point_seconds: float = 600.0
    threads: int | None = None
    nice: int = 10
    trust_remote_code: bool = False
    save_merged: bool = False
    #: Epoch checkpoints a job keeps when its recipe names no number, and the most any job keeps
    #: (``POSTTRAIN_KEEP_CHECKPOINTS``, ``POSTTRAIN_MAX_CHECKPOINTS_PER_JOB``); None: no bound.
    keep_checkpoints: int | None = None
    max_checkpoints_per_job: int | None = None
    #: ``POSTTRAIN_WANDB_MODE`` and ``POSTTRAIN_WANDB_DIR``, for the jobs whose recipe asks for a W&B run.
    wandb_mode: Literal["off", "offline", "online"] = "off"
    wandb_dir: str | None = None
    #: ``Settings.grader_hidden_paths``: what a GRPO job's python grader may not see.
    grader_hidden_paths: tuple[str, ...] = ()
    python: str = sys.executable
    #: ``POSTTRAIN_DEVICES_PER_JOB``: the most devices (GPUs, or CPU processes) one SFT job trains on,
    #: and the number a job that names none gets.
    devices_per_job: int = 1
    #: What ``python -m`` runs: the trainer, or in tests a stand-in speaking its protocol
    #: (docs/trainer-protocol.md) without the training stack.
    trainer_module: str = "posttrain.trainer"
    #: Where a job's trainer runs (``POSTTRAIN_EXECUTOR``): ``local``, a child process of this
    #: worker; ``ray``, the ranks of a Ray Train run on the cluster at ``ray_address``
    #: (``executor_command``).
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    ray_workers: int = 1
    ray_max_failures: int = 3


class _Lease(TypedDict):
    owner: str
    attempt: int


class _Held(_Lease):
    job_id: str


@dataclass
class _Outcome:
    terminal: Completed | Cancelled | Paused | Failed | None = None
    stop_reason: str | None = None  # why we asked the trainer to stop: "lease_lost" | "shutdown" | "pause"
    stderr_tail: list[str] = field(default_factory=list)


def _memory_total_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


class Launcher:
    """One job, one trainer process, one thread of control (``run``) plus a stdout reader."""

    def __init__(self, *, job: Job, owner: str, store: JobStore, config: LaunchConfig,
                 warm: subprocess.Popen[bytes] | None = None, gpu: str | None = None) -> None:
        self.job = job
        self.gpu = gpu  # the one GPU this job's trainer sees (CUDA_VISIBLE_DEVICES), or None
        self._warm = warm
        self.owner = owner
        self.store = store
        self.config = config
        self.attempt = job.attempt
        self._shutdown = threading.Event()
        self._lost = threading.Event()  # the store refused a write: the job moved on without us
        self._outcome = _Outcome()
        self._process: subprocess.Popen[bytes] | None = None
        self._store_waits = 0  # writes currently waiting for the store to come back
        self._started = threading.Event()  # the trainer reported ``started``: its SIGUSR1 handler is in place
        self._pause_sent = False

    # -- public ---------------------------------------------------------------------------------

    def request_shutdown(self) -> None:
        """The worker is stopping: stop the trainer and give the job back to the queue."""
        self._shutdown.set()

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:
            log.exception("launcher failed for %s", self.job.job_uuid, extra={"action": "launcher_failed"})
            self._kill()
            try:
                self.store.release(job_id=self.job.id, owner=self.owner, attempt=self.attempt,
                                   reason=f"launcher error: {exc}")
            except LeaseLost:
                log.info("job %s moved on", self.job.job_uuid, extra={"action": "trainer_stopped", "job_id": self.job.id})

    # -- the work -------------------------------------------------------------------------------

    def _spec(self) -> Path:
        """Write the trainer's input: the job's plan, plus how this worker runs it."""
        plan = self.job.plan
        assert plan is not None, "a claimed job is read with its plan"
        folder = Path(plan.train_rows_path).parent
        spec = TrainerSpec(
            job_uuid=self.job.job_uuid,
            plan=plan,
            device=self.config.device,
            cuda_visible_devices=self.gpu,
            cpu_bf16=self.config.cpu_bf16,
            compile=self.config.compile,
            resume_dir=str(folder / "resume"),
            resume_every_seconds=self.config.resume_point_seconds or None,
            threads=self.config.threads,
            trust_remote_code=self.config.trust_remote_code,
            save_merged=self.config.save_merged,
            keep_checkpoints=self._keep(),
            wandb_mode=self.config.wandb_mode,
            wandb_dir=self.config.wandb_dir,
            grader_hidden_paths=self.config.grader_hidden_paths,
        )
        path = folder / f"spec-attempt-{self.attempt}.json"
        path.write_text(spec.model_dump_json(indent=2))
        return path

    def world_size(self) -> int:
        """How many ranks this job trains on: what its recipe asks for, else the operator's number,
        never over it; one for the methods that train on one device (GRPO)."""
        plan = self.job.plan
        if plan is None or plan.recipe.method not in (JobKind.SFT, JobKind.DPO):
            return 1
        return max(1, min(plan.recipe.devices or self.config.devices_per_job, self.config.devices_per_job))

    def _command(self, spec: Path) -> list[str]:
        if self.config.executor == "ray":
            return executor_command(self.config, spec)
        return ranks_command(self.config.python, self.config.nice, str(spec), module=self.config.trainer_module,
                             ranks=self.world_size())

    def _run(self) -> None:
        if self._refused_a_swapped_folder():
            return
        spec = self._spec()
        folder = spec.parent
        stderr_path = folder / f"trainer-attempt-{self.attempt}.log"
        warm = self._warm
        if warm is not None and self.world_size() > 1:  # a warm trainer is one process; let it go
            self._process = warm
            self._kill()
            self._process = warm = None
        if warm is not None and warm.poll() is None and warm.stdin is not None:
            # A warm trainer has the training stack imported; it takes the spec (and where to
            # write its log) as one line on stdin, then keeps stdin open as its lifeline.
            self._process = warm
            warm.stdin.write(json.dumps({"spec": str(spec), "stderr": str(stderr_path)}).encode() + b"\n")
            warm.stdin.flush()
        else:
            self._process = spawn_trainer(self._command(spec), stderr_path)
        log.info("trainer started for %s (pid %s, %s)", self.job.job_uuid, self._process.pid,
                 "warm" if self._process is warm else "cold",
                 extra={"action": "trainer_started", "job_id": self.job.id})
        reader = threading.Thread(target=self._read, args=(self._process.stdout,), daemon=True,
                                  name=f"trainer-reader-{self.job.id[:8]}")
        reader.start()
        self._supervise()
        deadline = time.monotonic() + 10
        while reader.is_alive() and (time.monotonic() < deadline or self._store_waits):
            reader.join(timeout=0.2)  # a reader still waiting on the store has events to land
        self._finish(stderr_path)

    def _refused_a_swapped_folder(self) -> bool:
        """Fail the job, starting no trainer, when a folder its plan pinned at submit (model,
        adapter, output folder) was swapped since: for a link, another folder or contents that lead
        elsewhere (``domain.pins``). The trainer checks again right before it loads and writes."""
        plan = self.job.plan
        problem = next((p for p in (pin_problem(pin) for pin in plan.pins) if p), None) if plan else None
        if problem is None:
            return False
        log.warning("job %s refused: %s", self.job.job_uuid, problem,
                    extra={"action": "path_changed", "job_id": self.job.id})
        if self._warm is not None:  # not used: let it go rather than keep a trainer waiting on stdin
            self._process = self._warm
            self._kill()
        try:
            self._retrying(lambda: self.store.finish(job_id=self.job.id, **self._lease(), status=JobStatus.FAILED,
                                                     error_code=FailureCode.PATH_CHANGED.value, error_message=problem))
        except LeaseLost:
            log.info("job %s moved on", self.job.job_uuid, extra={"action": "trainer_stopped", "job_id": self.job.id})
        return True

    def _supervise(self) -> None:
        """Renew the lease until the trainer exits; stop it when the job moved on or we shut down."""
        assert self._process is not None
        interval = min(self.config.heartbeat_seconds, 1.0)
        last_renewal = 0.0
        stop_sent_at: float | None = None
        while self._process.poll() is None:
            now = time.monotonic()
            if stop_sent_at is None:
                if self._shutdown.is_set():
                    self._outcome.stop_reason = "shutdown"
                elif now - last_renewal >= interval and not self._lost.is_set():
                    last_renewal = now
                    try:
                        status = self.store.renew_lease(job_id=self.job.id, owner=self.owner,
                                                        attempt=self.attempt, lease_seconds=self.config.lease_seconds)
                        if status is JobStatus.PAUSING:
                            self._pause()
                    except LeaseLost:
                        self._moved_on()
                    except StoreUnavailable as exc:  # try again at the next beat; the lease still runs
                        log.warning("lease renewal for %s waits for the store: %s", self.job.job_uuid, exc,
                                    extra={"action": "store_unavailable", "job_id": self.job.id})
                if self._outcome.stop_reason:
                    self._terminate()
                    stop_sent_at = now
            elif now - stop_sent_at > self.config.cancel_grace_seconds:
                log.warning("trainer for %s ignored SIGTERM; killing it", self.job.job_uuid,
                            extra={"action": "trainer_killed", "job_id": self.job.id})
                self._kill()
            try:
                self._process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass

    def _pause(self) -> None:
        """The user paused the job: ask the trainer once (see the module's docstring)."""
        if self._pause_sent or self._outcome.stop_reason:
            return
        self._pause_sent = True
        assert self._process is not None
        log.info("pausing %s", self.job.job_uuid, extra={"action": "trainer_pausing", "job_id": self.job.id})
        if self._started.is_set():
            # The trainer only (its own children keep the default); with several ranks, the ranks.
            pids = rank_pids(self._process.pid) if self.world_size() > 1 else [self._process.pid]
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
        else:
            self._outcome.stop_reason = "pause"

    def _terminate(self) -> None:
        if self._process and self._process.poll() is None:
            try:
                os.killpg(self._process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _kill(self) -> None:
        if self._process and self._process.poll() is None:
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._process.wait()

    # -- reports --------------------------------------------------------------------------------

    def _read(self, stream: IO[bytes]) -> None:
        """Record the trainer's events as they come; per-step metrics in batches. A line that is
        not a protocol event is kept as a warning in the job's log."""
        buffered: list[tuple[str, dict[str, Any]]] = []
        last_flush = time.monotonic()
        for raw in stream:
            try:
                event = parse_line(raw)
            except ProtocolError:
                buffered.append(("log", {"level": "warning", "message": raw.decode("utf-8", "replace").rstrip()}))
                continue
            if isinstance(event, StepMetric):
                buffered.append((event.kind, {**event.to_dict(), "attempt": self.attempt}))
            else:
                self._flush(buffered)
                buffered = []
                self._handle(event)
            if time.monotonic() - last_flush > METRIC_FLUSH_SECONDS:
                self._flush(buffered)
                buffered = []
                last_flush = time.monotonic()
        self._flush(buffered)

    def _moved_on(self) -> None:
        """The store refused a write under our lease: the job was cancelled, requeued or claimed
        again. Drop everything the trainer still says and stop it (``_supervise`` does)."""
        self._lost.set()
        self._outcome.stop_reason = self._outcome.stop_reason or "lease_lost"

    def _flush(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        if events and not self._lost.is_set():
            try:
                self._retrying(lambda: self.store.append_events(job_id=self.job.id, owner=self.owner,
                                                                attempt=self.attempt, events=events))
            except LeaseLost:
                self._moved_on()

    def _handle(self, event: AnyEvent) -> None:
        if isinstance(event, Started):
            self._started.set()
        if isinstance(event, TERMINAL_EVENTS):
            self._outcome.terminal = event
        elif not self._lost.is_set():
            try:
                self._retrying(lambda: self._record(event))
            except LeaseLost:
                self._moved_on()

    def _retrying(self, write: Callable[[], _T]) -> _T:
        """Run one store write, retrying with backoff while the store is unavailable. It ends when
        the write lands, when the store refuses it (``LeaseLost``: the job moved on), or, once the
        worker is shutting down, after a last grace period (then the error propagates). Each
        write is one transaction, so a retry never doubles what the first try wrote."""
        delay, gave_up_at, waiting = RETRY_FIRST_SECONDS, None, False
        try:
            while True:
                try:
                    return write()
                except StoreUnavailable as exc:
                    now = time.monotonic()
                    if self._shutdown.is_set():
                        gave_up_at = gave_up_at or now + self.config.cancel_grace_seconds
                        if now >= gave_up_at:
                            raise
                    if not waiting:
                        waiting = True
                        self._store_waits += 1
                    log.warning("store unavailable for %s; retrying in %.1f s: %s", self.job.job_uuid, delay, exc,
                                extra={"action": "store_unavailable", "job_id": self.job.id})
                    time.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_SECONDS)
        finally:
            if waiting:
                self._store_waits -= 1

    def _keep(self) -> int | None:
        """How many epoch checkpoints this job keeps: its recipe's number, else the operator's
        default, never over the operator's cap (None: all)."""
        plan = self.job.plan
        asked = plan.recipe.keep_checkpoints if plan is not None else None
        bounds = [n for n in (asked or self.config.keep_checkpoints, self.config.max_checkpoints_per_job)
                  if n is not None]
        return min(bounds) if bounds else None

    def _lease(self) -> _Lease:
        """What every write under this launcher's lease names: who holds the job, for which attempt."""
        return _Lease(owner=self.owner, attempt=self.attempt)

    def _record(self, event: AnyEvent) -> None:
        job_id, lease = self.job.id, self._lease()
        if isinstance(event, Started):
            resources = {
                **event.resources,
                "worker": self.owner,
                "attempt": self.attempt,
                "pid": self._process.pid if self._process else None,
                "memory_total_bytes": _memory_total_bytes(),
            }
            self.store.set_resources(job_id=job_id, **lease, resources=resources)
            self.store.append_event(job_id=job_id, **lease, type=event.kind,
                                    data={**event.to_dict(), "resources": resources})
        elif isinstance(event, CheckpointWritten):
            self.store.record_checkpoint(
                job_id=job_id, **lease,
                identifier=event.identifier, epoch=event.epoch, step=event.step, path=event.path,
                train_loss=event.train_loss, validation_loss=event.validation_loss, perplexity=event.perplexity,
                metrics=event.token_metrics(),
                keep=self._keep(),
            )
        else:
            self.store.append_event(job_id=job_id, **lease, type=event.kind, data=event.to_dict())

    def _finish(self, stderr_path: Path) -> None:
        """Write the job's end, unless it has already moved on without us."""
        job_uuid, job_id = self.job.job_uuid, self.job.id
        code = self._process.returncode if self._process else None
        if self._outcome.stop_reason != "lease_lost":
            try:
                self._retrying(lambda: self._end(code, stderr_path))
            except LeaseLost:
                self._outcome.stop_reason = "lease_lost"
        if self._outcome.stop_reason == "lease_lost":
            log.info("job %s moved on; trainer stopped", job_uuid, extra={"action": "trainer_stopped", "job_id": job_id})
        log.info("job %s trainer exited with %s", job_uuid, code, extra={"action": "trainer_exited", "job_id": job_id})

    def _end(self, code: int | None, stderr_path: Path) -> None:
        """The move that ends this attempt: complete, fail, or give the job back to the queue."""
        outcome, terminal = self._outcome, self._outcome.terminal
        common = _Held(job_id=self.job.id, **self._lease())
        if outcome.stop_reason == "shutdown":
            self.store.release(**common, reason="worker shut down", count_attempt=False)
        elif isinstance(terminal, Paused):
            where = f"resume point {terminal.resume_point}" if terminal.resume_point else "its newest checkpoint"
            self.store.park(**common, reason=f"paused after step {terminal.step}; continues from {where}")
        elif outcome.stop_reason == "pause":
            self.store.park(**common, reason="paused before the first step")
        elif isinstance(terminal, Completed):
            self.store.finish(**common, status=JobStatus.COMPLETED)
        elif isinstance(terminal, Failed):
            self.store.finish(**common, status=JobStatus.FAILED, error_code=terminal.code.value,
                              error_message=terminal.message or "training failed")
        else:
            tail = log_tail(stderr_path)
            reason = f"trainer exited with code {code} before finishing" + (f": {tail}" if tail else "")
            self.store.release(**common, reason=reason)


def ranks_command(python: str, nice: int, spec: str, *, module: str, ranks: int) -> list[str]:
    """The command that runs the trainer ``module`` on ``spec``: itself for one rank, else under
    torch's launcher with ``ranks`` processes on this machine. No restarts of the launcher's own: a
    lost rank ends the attempt, and the store requeues the job (from its newest checkpoint)."""
    if ranks == 1:
        return trainer_command(python, nice, spec, module=module)
    return trainer_command(python, nice, "--standalone", "--nproc-per-node", str(ranks), "--max-restarts", "0",
                           "-m", module, spec, module="torch.distributed.run")


def rank_pids(pid: int) -> list[int]:
    """The ranks torch's launcher at ``pid`` started: the processes whose parent it is, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": the command may hold spaces and parentheses; split after the last ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def executor_command(config: LaunchConfig, spec: Path) -> list[str]:
    """The process that runs a job's spec and speaks the trainer protocol on its stdout: the
    trainer itself, or for the ray executor the driver (``posttrain.worker.ray_driver``) that
    runs the trainer on Ray Train workers and relays rank 0's reports. The launcher treats both
    alike: same lease, same signals, same reports. (The local executor's command is ``ranks_command``.)"""
    options = ["--workers", str(config.ray_workers), "--max-failures", str(config.ray_max_failures),
               "--stop-grace", str(max(config.cancel_grace_seconds - 2.0, 1.0)), "--nice", str(config.nice),
               "--trainer-module", config.trainer_module]
    if config.ray_address:
        options += ["--address", config.ray_address]
    return trainer_command(config.python, 0, *options, str(spec), module="posttrain.worker.ray_driver")
