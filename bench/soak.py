"""Soak test: a storm of small jobs from concurrent clients while workers are killed at random.

Builds a throwaway data folder with the tiny demo model, a fresh store (a new PostgreSQL database on
the server ``bash scripts/start-postgres`` gives, or a SQLite file with ``--sqlite``), and starts:

* one API server, ``python -m posttrain serve --no-worker``, on a free loopback port;
* ``--workers`` standalone workers, ``python -m posttrain worker``, one slot each, with short leases
  (``POSTTRAIN_LEASE_SECONDS=4``, heartbeat 1 s, poll 0.2 s, ``POSTTRAIN_MAX_ATTEMPTS=10``,
  ``POSTTRAIN_TRAINER_THREADS=1``), all on the same data folder and store.

The storm: ``--clients`` threads (one keep-alive ``httpx.Client`` each) submit ``--jobs`` LoRA SFT
jobs of 1 epoch x 1-2 steps on one small dataset, each client keeping at most ``--outstanding`` of
its own jobs unfinished, and poll the status of their jobs (one call every ``--poll`` s). A mix:
some jobs are cancelled right after submit, some once they are seen ``in_progress``; about 1 in 20
is submitted a second time with the same ``job_uuid`` (expects 409, not counted) and about 1 in 20
extra bodies are invalid (expects 400, not counted). Meanwhile a chaos thread SIGKILLs a random
worker every ``--kill-every`` s (+-50 %; one restarted less than half that ago is spared), checks
that its trainer children (the job's, and an idle warm spare's) stop by themselves within
``--orphan-grace`` s (they watch their stdin, which closes with their launcher; a warm spare notices
only once its imports are done), and restarts it ``--pause`` s later.
Every status call made during the storm is timed.

When the clients are done (every one of their jobs terminal) or ``--storm-timeout`` has passed, the
chaos stops, every worker is running again, and the script waits up to ``--wait`` s for every
accepted job to be terminal. Then it reads ``GET /v1/post-training/jobs`` and each job's status and
prints: jobs submitted (accepted), refused (400 / 409), accounted for (terminal, by status), jobs
listed twice, jobs not terminal at the deadline, worker kills, how long the killed workers'
trainers took to stop, p50 / p99 / max status latency during the storm and the requests made. From the store it
also prints how many attempts jobs took, failures by reason (``worker_lost`` = out of attempts),
and any job whose state history is not a legal path ending in exactly one terminal state, and from
the logs it counts tracebacks and errors.

Exit status 1 when submitted != accounted for, a job is listed twice (or listed but never
submitted), a job has two terminal states, or a trainer outlived its killed worker by more than
``--orphan-grace`` s.

    .venv/bin/python bench/soak.py [--quick] [--jobs 200] [--clients 8] [--workers 2] [--sqlite] [--keep]

Other ``POSTTRAIN_*`` variables in the environment reach the server and the workers, except those
this script sets. Everything it starts is stopped on exit (also on Ctrl-C), the database dropped
and the data folder removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import free_port  # noqa: E402 - one helper for tests and benches
from tests.integration.test_api import lora_request  # noqa: E402 - the request shape the tests check

SUBMIT_PATH = "/v1/post-training/supervised-fine-tune"
STATUS_PATH = "/v1/post-training/job/status"
CANCEL_PATH = "/v1/post-training/job/cancel"
LIST_PATH = "/v1/post-training/jobs"
TERMINAL = ("completed", "cancelled", "failed")
DATASET_ID = "soak-colours"


# -- setup ------------------------------------------------------------------------------------------


def lora_body(job_uuid: str, model: str, *, steps: int) -> dict:
    """A LoRA SFT body as a Llama Stack client sends it (the tests' own request, 1 epoch of ``steps``)."""
    body = lora_request(model, DATASET_ID, job_uuid=job_uuid)
    body["training_config"].update(max_steps_per_epoch=steps, max_validation_steps=1)
    body["training_config"]["data_config"]["shuffle"] = True
    return body


def invalid_body(job_uuid: str, model: str, rng: random.Random) -> dict:
    """A body the server must refuse with a 400 (and never store)."""
    body = lora_body(job_uuid, model, steps=1)
    kind = rng.randrange(3)
    if kind == 0:
        body["training_config"]["n_epochs"] = 0
    elif kind == 1:
        body["hyperparam_search_config"] = {"strategy": "grid"}
    else:
        body["training_config"]["data_config"]["batch_size"] = 0
    return body


def postgres_admin_url(explicit: str | None) -> str:
    if explicit:
        return explicit
    out = subprocess.run(["bash", str(REPO / "scripts" / "start-postgres")], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def create_database(admin_url: str) -> tuple[str, str]:
    from sqlalchemy import create_engine, text

    name = f"soak_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, admin_url.rsplit("/", 1)[0] + f"/{name}"


def drop_database(admin_url: str, name: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; empty when it is gone)."""
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                found += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return found


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def our_trainers(home: Path) -> list[int]:
    """Live trainer processes (any parent, warm spares included) started for the data folder ``home``."""
    pids, marker = [], f"POSTTRAIN_HOME={home}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and "posttrain.trainer" in cmdline(int(entry.name)):
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ and alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids


class Fleet:
    """The API server and the workers, each worker restartable; logs under ``<home>/logs``."""

    def __init__(self, home: Path, env: dict[str, str], workers: int) -> None:
        self.home, self.env = home, env
        self.logs = home / "logs"
        self.logs.mkdir(exist_ok=True)
        self.server: subprocess.Popen | None = None
        self.base_url = ""
        self.workers: list[subprocess.Popen | None] = [None] * workers
        self.starts = [0] * workers
        self.started_at = [0.0] * workers
        self.lock = threading.Lock()
        self.closed = False

    def start_server(self) -> None:
        port = free_port()
        env = {**self.env, "POSTTRAIN_PORT": str(port), "POSTTRAIN_RUN_WORKER": "false", "POSTTRAIN_WORKER_SLOTS": "0"}
        log = open(self.logs / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.server = subprocess.Popen([sys.executable, "-m", "posttrain", "serve", "--no-worker", "--log-level", "warning"],
                                       cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"server exited early:\n{(self.logs / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(self.base_url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready within 60 s")

    def start_worker(self, index: int) -> subprocess.Popen | None:
        with self.lock:
            if self.closed:
                return None
            self.starts[index] += 1
            env = {**self.env, "POSTTRAIN_WORKER_SLOTS": "1"}
            log = open(self.logs / f"worker-{index}-{self.starts[index]}.log", "ab")  # noqa: SIM115
            process = subprocess.Popen([sys.executable, "-m", "posttrain", "worker", "--log-level", "info"],
                                       cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            self.workers[index] = process
            self.started_at[index] = time.monotonic()
            return process

    def up_for(self, seconds: float) -> list[int]:
        """Workers running for at least ``seconds``."""
        with self.lock:
            now = time.monotonic()
            return [i for i, w in enumerate(self.workers) if w is not None and now - self.started_at[i] >= seconds]

    def kill_worker(self, index: int) -> tuple[int, list[tuple[int, bool]]]:
        """SIGKILL worker ``index``; return its pid and its trainers (pid, started as a warm spare)."""
        with self.lock:
            process = self.workers[index]
            if process is None or self.closed:
                return -1, []
            trainers = [(p, "--warm" in cmdline(p)) for p in children(process.pid) if "posttrain.trainer" in cmdline(p)]
            process.kill()
            process.wait()
            self.workers[index] = None
            return process.pid, trainers

    def stop_all(self) -> None:
        with self.lock:
            self.closed = True
            workers = [w for w in self.workers if w is not None]
        for process in workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in workers:
            stop_process(process, timeout=30)
        if self.server is not None:
            stop_process(self.server)
        for pid in our_trainers(self.home):  # none expected: every trainer we started ends with its launcher
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- the storm --------------------------------------------------------------------------------------


@dataclass
class Plan:
    kind: str  # "job" | "dup" | "invalid"
    cancel: str = "none"  # "none" | "early" | "running" (for kind "job")
    steps: int = 1


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: set[str] = field(default_factory=set)
    refused: Counter = field(default_factory=Counter)  # "400 invalid", "409 duplicate", unexpected codes
    unexpected: list[str] = field(default_factory=list)
    submit_errors: list[str] = field(default_factory=list)  # uuids whose submit had no answer
    cancels: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    status_errors: Counter = field(default_factory=Counter)
    seen_terminal: dict[str, str] = field(default_factory=dict)
    bodies: list[dict] = field(default_factory=list)  # accepted bodies, for duplicates


def make_plans(count: int, rng: random.Random) -> list[Plan]:
    plans = []
    for _ in range(count):
        roll = rng.random()
        cancel = "early" if roll < 0.15 else ("running" if roll < 0.30 else "none")
        plans.append(Plan("job", cancel=cancel, steps=rng.choice((1, 2))))
    extras = max(1, count // 20)
    for _ in range(extras):  # inserted after the first few jobs, so a duplicate has something to copy
        plans.insert(rng.randrange(min(len(plans), 8), len(plans) + 1), Plan("dup"))
        plans.insert(rng.randrange(0, len(plans) + 1), Plan("invalid"))
    return plans


class Client(threading.Thread):
    def __init__(self, index: int, base_url: str, model: str, plans: list[Plan], plans_lock: threading.Lock,
                 tally: Tally, *, outstanding: int, poll: float, deadline: float, stop: threading.Event, seed: int) -> None:
        super().__init__(name=f"client-{index}", daemon=True)
        self.http = httpx.Client(base_url=base_url, timeout=30)
        self.model, self.plans, self.plans_lock, self.tally = model, plans, plans_lock, tally
        self.outstanding, self.poll, self.deadline, self.stop = outstanding, poll, deadline, stop
        self.rng = random.Random(seed)
        self.mine: list[tuple[str, str]] = []  # (job_uuid, cancel mode) not yet seen terminal
        self.error: BaseException | None = None

    def next_plan(self) -> Plan | None:
        with self.plans_lock:
            return self.plans.pop(0) if self.plans else None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
        finally:
            self.http.close()

    def _run(self) -> None:
        turn, exhausted = 0, False
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            if not exhausted and len(self.mine) < self.outstanding:
                plan = self.next_plan()
                if plan is None:
                    exhausted = True
                else:
                    self.submit(plan)
                    continue
            if exhausted and not self.mine:
                return
            if self.mine:
                turn = (turn + 1) % len(self.mine)
                self.check(turn)
            self.stop.wait(self.poll)

    def submit(self, plan: Plan) -> None:
        tally = self.tally
        if plan.kind == "invalid":
            response = self.http.post(SUBMIT_PATH, json=invalid_body(f"soak-bad-{uuid.uuid4()}", self.model, self.rng))
            with tally.lock:
                if response.status_code == 400:
                    tally.refused["400 invalid"] += 1
                else:
                    tally.unexpected.append(f"invalid body answered {response.status_code}: {response.text[:200]}")
            return
        if plan.kind == "dup":
            with tally.lock:
                body = self.rng.choice(tally.bodies) if tally.bodies else None
            if body is None:
                plan = Plan("job")  # nothing accepted yet to repeat: a plain job instead
            else:
                response = self.http.post(SUBMIT_PATH, json=body)
                with tally.lock:
                    if response.status_code == 409:
                        tally.refused["409 duplicate"] += 1
                    else:
                        tally.unexpected.append(f"duplicate {body['job_uuid']} answered {response.status_code}: "
                                                f"{response.text[:200]}")
                return
        job_uuid = f"soak-{uuid.uuid4()}"
        body = lora_body(job_uuid, self.model, steps=plan.steps)
        try:
            response = self.http.post(SUBMIT_PATH, json=body)
        except httpx.HTTPError as exc:
            with tally.lock:
                tally.submit_errors.append(job_uuid)
                tally.unexpected.append(f"submit {job_uuid}: {type(exc).__name__}: {exc}")
            return
        with tally.lock:
            if response.status_code != 200:
                tally.unexpected.append(f"submit {job_uuid} answered {response.status_code}: {response.text[:200]}")
                return
            tally.accepted.add(job_uuid)
            tally.bodies.append(body)
        if plan.cancel == "early":
            self.cancel(job_uuid, "early")
        self.mine.append((job_uuid, plan.cancel))

    def cancel(self, job_uuid: str, when: str) -> None:
        response = self.http.post(CANCEL_PATH, json={"job_uuid": job_uuid})
        with self.tally.lock:
            # 409: it had already ended (completed before the cancel arrived)
            self.tally.cancels[f"{when} {response.status_code}"] += 1

    def check(self, index: int) -> None:
        job_uuid, mode = self.mine[index]
        started = time.perf_counter()
        try:
            response = self.http.get(STATUS_PATH, params={"job_uuid": job_uuid})
        except httpx.HTTPError as exc:
            with self.tally.lock:
                self.tally.latencies_ms.append((time.perf_counter() - started) * 1000)
                self.tally.status_errors[type(exc).__name__] += 1
            return
        elapsed = (time.perf_counter() - started) * 1000
        with self.tally.lock:
            self.tally.latencies_ms.append(elapsed)
            if response.status_code != 200:
                self.tally.status_errors[str(response.status_code)] += 1
                return
        status = response.json()["status"]
        if status in TERMINAL:
            with self.tally.lock:
                self.tally.seen_terminal[job_uuid] = status
            self.mine.pop(index)
        elif mode == "running" and status == "in_progress":
            self.cancel(job_uuid, "running")
            self.mine[index] = (job_uuid, "sent")


@dataclass
class Chaos:
    kills: int = 0
    trainers_hit: Counter = field(default_factory=Counter)  # "warm" / "cold" children of killed workers
    orphans: list[str] = field(default_factory=list)  # trainers still alive ``grace`` s after their worker's kill
    stop_s: dict[str, list[float]] = field(default_factory=lambda: {"warm": [], "cold": []})
    error: BaseException | None = None


def chaos_loop(fleet: Fleet, chaos: Chaos, *, every: float, pause: float, grace: float, stop: threading.Event,
               seed: int) -> None:
    rng = random.Random(seed)
    watch: list[tuple[int, str, float, int]] = []  # (trainer pid, "warm" | "cold", killed at, worker pid)

    def check_orphans(final: bool) -> None:
        for entry in list(watch):
            pid, kind, killed_at, worker_pid = entry
            waited = time.monotonic() - killed_at
            if not alive(pid):
                chaos.stop_s[kind].append(waited)
                watch.remove(entry)
            elif waited > grace or final:
                chaos.orphans.append(f"{kind} trainer {pid} of killed worker {worker_pid} alive {waited:.0f} s later")
                watch.remove(entry)

    try:
        while not stop.wait(every * rng.uniform(0.5, 1.5)):
            candidates = fleet.up_for(every / 2)  # a restarted worker gets some time to claim and train
            if not candidates:
                continue
            index = rng.choice(candidates)
            worker_pid, trainers = fleet.kill_worker(index)
            if worker_pid < 0:
                return
            chaos.kills += 1
            killed_at = time.monotonic()
            for pid, warm in trainers:
                chaos.trainers_hit["warm" if warm else "cold"] += 1
                watch.append((pid, "warm" if warm else "cold", killed_at, worker_pid))
            while time.monotonic() - killed_at < pause:
                check_orphans(False)
                time.sleep(0.1)
            fleet.start_worker(index)
            check_orphans(False)
        deadline = time.monotonic() + grace + 1
        while watch and time.monotonic() < deadline:
            check_orphans(False)
            time.sleep(0.1)
        check_orphans(True)
    except BaseException as exc:  # noqa: BLE001 - reported by the main thread
        chaos.error = exc


# -- the end ----------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] if ordered else float("nan")


def wait_terminal(base_url: str, uuids: list[str], deadline: float) -> dict[str, str]:
    """Poll until every job is terminal or the deadline; the last status seen of each."""
    last: dict[str, str] = {}
    pending = list(uuids)
    with httpx.Client(base_url=base_url, timeout=30) as http:
        while True:
            still = []
            for job_uuid in pending:
                response = http.get(STATUS_PATH, params={"job_uuid": job_uuid})
                last[job_uuid] = response.json()["status"] if response.status_code == 200 else f"http {response.status_code}"
                if last[job_uuid] not in TERMINAL:
                    still.append(job_uuid)
            pending = still
            if not pending or time.monotonic() > deadline:
                return last
            time.sleep(1.0)


def store_audit(database_url: str, uuids: set[str]) -> dict:
    """Attempts, failure reasons, checkpoints and state histories, straight from the store."""
    from sqlalchemy import select

    from posttrain.store.engine import make_engine
    from posttrain.store.tables import checkpoints, job_events, jobs

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(jobs.c.job_uuid, jobs.c.status, jobs.c.attempt, jobs.c.error_code)).all()
            ckpts = Counter(r[0] for r in conn.execute(select(checkpoints.c.job_uuid)).all())
            events = conn.execute(select(job_events.c.job_uuid, job_events.c.data)
                                  .where(job_events.c.type == "state").order_by(job_events.c.seq)).all()
    finally:
        engine.dispose()
    history: dict[str, list[str]] = {}
    for job_uuid, data in events:
        history.setdefault(job_uuid, []).append((data if isinstance(data, dict) else json.loads(data))["status"])
    legal = {"scheduled": {"in_progress", "cancelled"},
             "in_progress": {"completed", "failed", "cancelled", "scheduled"}}
    bad_history, two_terminal = [], []
    for job_uuid, states in history.items():
        if sum(s in TERMINAL for s in states) > 1:
            two_terminal.append(f"{job_uuid}: {' > '.join(states)}")
        elif states[0] != "scheduled" or any(b not in legal.get(a, set()) for a, b in itertools.pairwise(states)):
            bad_history.append(f"{job_uuid}: {' > '.join(states)}")
    completed = [r for r in rows if r.status == "completed"]
    return {
        "stored": len(rows),
        "stored_not_submitted": sorted({r.job_uuid for r in rows} - uuids),
        "attempts": Counter(r.attempt for r in rows),
        "failed_by_code": Counter(r.error_code or "?" for r in rows if r.status == "failed"),
        "completed_wrong_checkpoints": [f"{r.job_uuid}: {ckpts.get(r.job_uuid, 0)}" for r in completed
                                        if ckpts.get(r.job_uuid, 0) != 1],
        "requeues": sum(states.count("scheduled") - 1 for states in history.values()),
        "bad_history": bad_history,
        "two_terminal": two_terminal,
        "status_mismatch": [f"{r.job_uuid}: row {r.status}, history {history.get(r.job_uuid, ['-'])[-1]}" for r in rows
                            if history.get(r.job_uuid, ["-"])[-1] != r.status],
    }


def log_audit(logs: Path) -> dict[str, Counter]:
    counts: dict[str, Counter] = {}
    patterns = {"tracebacks": re.compile(r"^Traceback"), "ERROR lines": re.compile(r" ERROR "),
                "launcher failed": re.compile(r"launcher failed"), "tick failed": re.compile(r"scheduler tick failed"),
                "trainer ignored SIGTERM": re.compile(r"ignored SIGTERM")}
    for path in sorted(logs.glob("*.log")):
        kind = "server" if path.name.startswith("server") else "workers"
        for line in path.read_text(errors="replace").splitlines():
            for name, pattern in patterns.items():
                if pattern.search(line):
                    counts.setdefault(kind, Counter())[name] += 1
    return counts


# -- main -------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="valid jobs to submit (default 200; --quick: 40)")
    parser.add_argument("--quick", action="store_true", help="40 jobs")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="standalone workers, one slot each (default 2)")
    parser.add_argument("--outstanding", type=int, default=3, help="unfinished jobs a client keeps at most (default 3)")
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between a client's status calls (default 0.2)")
    parser.add_argument("--kill-every", type=float, default=10.0,
                        help="mean seconds between worker kills (default 10); a worker up for less than half of it is spared")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds a killed worker stays down (default 2)")
    parser.add_argument("--orphan-grace", type=float, default=30.0,
                        help="seconds a killed worker's trainers get to stop by themselves (default 30)")
    parser.add_argument("--storm-timeout", type=float, default=1800, help="most seconds of storm (default 1800)")
    parser.add_argument("--wait", type=float, default=600, help="most seconds to wait for the rest after it (default 600)")
    parser.add_argument("--sqlite", action="store_true", help="a SQLite file instead of a PostgreSQL database")
    parser.add_argument("--postgres-url", help="admin URL of a PostgreSQL server (default: bash scripts/start-postgres)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--keep", action="store_true", help="keep the data folder (logs under logs/) and the database")
    args = parser.parse_args()
    if args.quick:
        args.jobs = 40
    if min(args.jobs, args.clients, args.workers, args.outstanding) < 1 or args.kill_every <= 0:
        parser.error("--jobs, --clients, --workers, --outstanding and --kill-every must be positive")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)

    from posttrain.demo import DEMO_MODEL_NAME, colour_rows
    from posttrain.trainer.tiny_model import create_tiny_model

    started_at = time.monotonic()
    load_at_start = Path("/proc/loadavg").read_text().split()[0]
    home = Path(tempfile.mkdtemp(prefix="posttrain-soak-"))
    for sub in ("models", "files", "jobs", "datasets"):
        (home / sub).mkdir()
    admin_url, db_name = None, None
    fleet: Fleet | None = None
    stop, chaos_stop = threading.Event(), threading.Event()
    try:
        if args.sqlite:
            database_url = f"sqlite:///{home / 'posttrain.db'}"
            store_name = "SQLite file"
        else:
            admin_url = postgres_admin_url(args.postgres_url)
            db_name, database_url = create_database(admin_url)
            store_name = f"PostgreSQL database {db_name}"
        t0 = time.monotonic()
        model = home / "models" / DEMO_MODEL_NAME
        create_tiny_model(model)
        print(f"tiny model built in {time.monotonic() - t0:.1f} s; store: {store_name}; seed {seed}", flush=True)

        env = {
            **os.environ,
            "POSTTRAIN_HOME": str(home),
            "POSTTRAIN_DATABASE_URL": database_url,
            "POSTTRAIN_HOST": "127.0.0.1",
            "POSTTRAIN_MODEL_ROOTS": json.dumps([str(home / "models")]),
            "POSTTRAIN_FILE_ROOTS": json.dumps([str(home / "files")]),
            "POSTTRAIN_LEASE_SECONDS": "4",
            "POSTTRAIN_HEARTBEAT_SECONDS": "1",
            "POSTTRAIN_POLL_SECONDS": "0.2",
            "POSTTRAIN_CANCEL_GRACE_SECONDS": "5",
            "POSTTRAIN_MAX_ATTEMPTS": "10",
            "POSTTRAIN_TRAINER_THREADS": "1",
        }
        fleet = Fleet(home, env, args.workers)
        fleet.start_server()  # migrates the store before any worker starts
        for index in range(args.workers):
            fleet.start_worker(index)
        time.sleep(1.0)
        dead = [i for i, w in enumerate(fleet.workers) if w is None or w.poll() is not None]
        if dead:
            raise RuntimeError(f"worker(s) {dead} exited at start; see {fleet.logs}")
        print(f"server on {fleet.base_url} (pid {fleet.server.pid}), workers "
              f"{[w.pid for w in fleet.workers if w]}; logs in {fleet.logs}", flush=True)
        response = httpx.post(fleet.base_url + "/v1/datasets", timeout=30,
                              json={"purpose": "post-training/messages", "dataset_id": DATASET_ID,
                                    "source": {"type": "rows", "rows": colour_rows()}})
        response.raise_for_status()

        rng = random.Random(seed)
        plans, plans_lock, tally = make_plans(args.jobs, rng), threading.Lock(), Tally()
        storm_start = time.monotonic()
        storm_deadline = storm_start + args.storm_timeout
        clients = [Client(i, fleet.base_url, str(model), plans, plans_lock, tally, outstanding=args.outstanding,
                          poll=args.poll, deadline=storm_deadline, stop=stop, seed=seed + 1 + i)
                   for i in range(args.clients)]
        chaos = Chaos()
        chaos_thread = threading.Thread(target=chaos_loop, name="chaos", daemon=True, args=(fleet, chaos),
                                        kwargs=dict(every=args.kill_every, pause=args.pause, grace=args.orphan_grace,
                                                    stop=chaos_stop, seed=seed))
        for client in clients:
            client.start()
        chaos_thread.start()
        next_report = storm_start + 15
        while any(c.is_alive() for c in clients):
            for client in clients:
                client.join(timeout=0.5)
            if time.monotonic() > next_report:
                with tally.lock:
                    print(f"  {time.monotonic() - storm_start:4.0f} s: {len(tally.accepted)} accepted, "
                          f"{len(tally.seen_terminal)} seen terminal, {chaos.kills} kills", flush=True)
                next_report += 15
        storm_s = time.monotonic() - storm_start
        chaos_stop.set()
        chaos_thread.join(timeout=args.orphan_grace + args.pause + 30)
        errors = [f"{c.name}: {c.error!r}" for c in clients if c.error] + ([f"chaos: {chaos.error!r}"] if chaos.error else [])
        for index, worker in enumerate(fleet.workers):  # every worker up for the drain
            if worker is None or worker.poll() is not None:
                fleet.start_worker(index)
        print(f"storm over after {storm_s:.0f} s; waiting up to {args.wait:.0f} s for every accepted job", flush=True)

        with tally.lock:
            accepted = set(tally.accepted)
            unknown = list(tally.submit_errors)
        for job_uuid in unknown:  # a submit without an answer that the server did store counts as accepted
            if httpx.get(fleet.base_url + STATUS_PATH, params={"job_uuid": job_uuid}, timeout=30).status_code == 200:
                accepted.add(job_uuid)
        final = wait_terminal(fleet.base_url, sorted(accepted), time.monotonic() + args.wait)
        listed = [j["job_uuid"] for j in httpx.get(fleet.base_url + LIST_PATH, timeout=60).json()["data"]]
        listed_counts = Counter(listed)
        twice = sorted(u for u, n in listed_counts.items() if n > 1)
        listed_unknown = sorted(set(listed) - accepted)
        missing = sorted(accepted - set(listed))
        by_status = Counter(final[u] for u in accepted)
        not_terminal = sorted(u for u in accepted if final[u] not in TERMINAL)
        accounted = sum(1 for u in accepted if final[u] in TERMINAL and listed_counts[u] == 1)
        audit = store_audit(database_url, accepted)
        for worker in fleet.workers:  # stop now, so the logs are complete before they are read
            if worker is not None:
                stop_process(worker)
        logs = log_audit(fleet.logs)

        lat = tally.latencies_ms
        print()
        facts = {
            "machine": f"{os.cpu_count()} cores, {platform.machine()}, load {load_at_start} at start, "
                       f"{Path('/proc/loadavg').read_text().split()[0]} at end (1-min average)",
            "store": store_name,
            "setup": f"{args.clients} clients (outstanding {args.outstanding}, poll {args.poll} s), "
                     f"{args.workers} workers x 1 slot, lease 4 s, max attempts 10, "
                     f"kill every ~{args.kill_every:.0f} s, down {args.pause:.0f} s",
            "storm": f"{storm_s:.0f} s" + (" (storm timeout reached)" if storm_s >= args.storm_timeout else ""),
        }
        for key, value in facts.items():
            print(f"{key:>30}: {value}")
        print()
        refused = sum(tally.refused.values())
        rows = [
            ("jobs submitted (accepted)", len(accepted)),
            ("refused", f"{refused} ({', '.join(f'{k}: {v}' for k, v in sorted(tally.refused.items())) or '-'})"),
            ("accounted for (terminal)", f"{accounted} (" + ", ".join(f"{s} {by_status[s]}" for s in TERMINAL) + ")"),
            ("  failed by reason", ", ".join(f"{k}: {v}" for k, v in sorted(audit["failed_by_code"].items())) or "-"),
            ("jobs listed twice", len(twice)),
            ("listed but not submitted", len(listed_unknown)),
            ("submitted but not listed", len(missing)),
            ("not terminal at the deadline", len(not_terminal)),
            ("worker kills", (f"{chaos.kills} (their trainer children: {chaos.trainers_hit['cold']} started cold, "
                              f"{chaos.trainers_hit['warm']} started warm)")),
            (f"orphans (alive > {args.orphan_grace:.0f} s)", len(chaos.orphans)),
            *[(f"  {kind} ones stopped after", (f"median {pct(v, 0.5):.1f} s, max {max(v):.1f} s, "
                                                f"{sum(x > 5 for x in v)} of {len(v)} took > 5 s"))
              for kind, v in chaos.stop_s.items() if v],
            ("requeues / attempts", f"{audit['requeues']} requeues; attempts per job "
             + ", ".join(f"{k}: {v}" for k, v in sorted(audit["attempts"].items()))),
            ("cancels sent (when answer)", ", ".join(f"{k}: {v}" for k, v in sorted(tally.cancels.items())) or "-"),
            ("status calls in the storm", f"{len(lat)} ({len(lat) / storm_s:.1f}/s), errors "
             + (", ".join(f"{k}: {v}" for k, v in tally.status_errors.items()) or "0")),
            ("status latency in the storm", (f"p50 {pct(lat, 0.5):.1f} ms, p99 {pct(lat, 0.99):.1f} ms, "
                                             f"max {max(lat, default=float('nan')):.1f} ms")),
            ("store audit", (f"{audit['stored']} jobs stored; {len(audit['two_terminal'])} with two terminal states, "
                             f"{len(audit['bad_history'])} with an illegal history, {len(audit['status_mismatch'])} "
                             f"row/history mismatches, {len(audit['completed_wrong_checkpoints'])} completed without "
                             f"exactly 1 checkpoint, {len(audit['stored_not_submitted'])} stored but not accepted")),
            ("logs", "; ".join(f"{k}: " + ", ".join(f"{n} {c}" for n, c in v.items()) for k, v in logs.items()) or "clean"),
        ]
        for key, value in rows:
            print(f"{key:>30}: {value}")
        details = [("unexpected answers", tally.unexpected), ("thread errors", errors), ("listed twice", twice),
                   ("listed, not submitted", listed_unknown), ("not listed", missing),
                   ("not terminal", [f"{u}: {final[u]}" for u in not_terminal]), ("orphan trainers", chaos.orphans),
                   ("two terminal states", audit["two_terminal"]), ("illegal history", audit["bad_history"]),
                   ("row/history mismatch", audit["status_mismatch"]),
                   ("completed without 1 checkpoint", audit["completed_wrong_checkpoints"]),
                   ("stored, not accepted", audit["stored_not_submitted"])]
        for title, items in details:
            if items:
                print(f"\n{title} ({len(items)}):")
                for item in items[:10]:
                    print(f"  {item}")
                if len(items) > 10:
                    print(f"  … {len(items) - 10} more")

        ok = (len(accepted) == accounted and not twice and not listed_unknown and not audit["two_terminal"]
              and not chaos.orphans and not errors)
        print(f"\nsubmitted {len(accepted)} vs accounted for {accounted}: {'OK' if ok else 'FAILED'}"
              f"   (whole run {time.monotonic() - started_at:.0f} s)")
        return 0 if ok else 1
    finally:
        stop.set()
        chaos_stop.set()
        if fleet is not None:
            fleet.stop_all()
        if args.keep:
            print(f"data folder kept: {home}" + (f"; database kept: {db_name}" if db_name else ""))
        else:
            if admin_url and db_name:
                try:
                    drop_database(admin_url, db_name)
                except Exception as exc:  # noqa: BLE001
                    print(f"could not drop database {db_name}: {exc}", file=sys.stderr)
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
