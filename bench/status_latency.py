"""Status-endpoint latency with a full store, idle and while a job trains.

Builds a throwaway data folder with the tiny demo model and ``--jobs`` finished jobs (two
checkpoints each) in the SQLite store, starts a real ``python -m posttrain serve`` on a free port,
and times ``GET /v1/post-training/job/status?job_uuid=<random existing job>`` from this process
over keep-alive connections (``--concurrency`` threads, one ``httpx.Client`` each):

* phase ``idle``: nothing trains (every stored job is terminal, so the worker has nothing to do);
* phase ``training``: one LoRA fine-tune on the demo rows runs, measured once it has reported
  training steps; the phase counts only if the job is still ``in_progress`` when it ends.

It prints p50 / p99 / max latency and requests/s per phase, the training/idle ratios, whether the
target (p99 < 10 ms while training) is met, the server's CPU time per request, and, for scale, the
figures quoted (not measured here) for Llama Stack 0.2.23's own server on the same machine.

    .venv/bin/python bench/status_latency.py [--jobs 10000] [--requests 2000] [--concurrency 4]

Other ``POSTTRAIN_*`` variables in the environment (e.g. ``POSTTRAIN_TRAINER_NICE``,
``POSTTRAIN_TRAINER_THREADS``) reach the server unchanged, to compare settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import free_port  # noqa: E402 - one helper for tests and benches
from tests.integration.test_api import lora_request  # noqa: E402 - the request shape the tests check

STATUS_PATH = "/v1/post-training/job/status"
TARGET_P99_MS = 10.0
# Quoted for scale, not measured by this script: Llama Stack 0.2.23's own server, same machine.
LLAMA_STACK_QUOTED = {"version": "0.2.23", "req_per_s": 8.0, "p99_idle_ms": 267.0, "p99_training_ms": 532.0}


# -- setup ------------------------------------------------------------------------------------------


def lora_body(job_uuid: str, model: str, dataset_id: str, *, n_epochs: int, steps: int, batch_size: int) -> dict:
    """A LoRA SFT body as a Llama Stack client sends it (the tests' own request, resized)."""
    body = lora_request(model, dataset_id, job_uuid=job_uuid)
    body["training_config"].update(n_epochs=n_epochs, max_steps_per_epoch=steps, max_validation_steps=1)
    body["training_config"]["data_config"].update(batch_size=batch_size, shuffle=True)
    return body


def fill_store(database_url: str, home: Path, model: str, count: int) -> list[str]:
    """Migrate the store and insert ``count`` terminal jobs (two checkpoints and three events each)."""
    from sqlalchemy import insert

    from posttrain.store.engine import make_engine, migrate
    from posttrain.store.tables import checkpoints, job_events, jobs

    engine = make_engine(database_url)
    migrate(engine)
    rng = random.Random(7)
    base = datetime.now(UTC) - timedelta(days=30)
    job_rows, ckpt_rows, event_rows, uuids = [], [], [], []
    for i in range(count):
        job_uuid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        uuids.append(job_uuid)
        scheduled = base + timedelta(seconds=200 * i)
        started, completed = scheduled + timedelta(seconds=2), scheduled + timedelta(seconds=90)
        status = "completed" if i % 10 < 8 else ("failed" if i % 10 == 8 else "cancelled")
        request = lora_body(job_uuid, model, "demo-colours", n_epochs=2, steps=12, batch_size=4)
        folder = home / "jobs" / uuid.uuid5(uuid.NAMESPACE_URL, job_uuid).hex
        plan = {"method": "sft", "model": model, "output_dir": str(folder / "output"),
                "train_rows_path": str(folder / "train.jsonl"), "validation_rows_path": None,
                "training_config": request["training_config"], "algorithm_config": request["algorithm_config"], "seed": 42}
        job_rows.append(dict(
            job_uuid=job_uuid, tenant="default", kind="sft", status=status, request=request, plan=plan,
            scheduled_at=scheduled, started_at=started, completed_at=completed, attempt=1, max_attempts=3,
            lease_owner="bench-worker", lease_expires_at=completed, cancel_requested=status == "cancelled",
            error_code="error" if status == "failed" else None,
            error_message="training failed (bench fixture)" if status == "failed" else None,
            resources={"device": "cpu", "dtype": "fp32", "requested_dtype": "bf16", "threads": 2, "torch": "bench"},
        ))
        n_ckpts = 2 if status == "completed" else 1
        for epoch in range(1, n_ckpts + 1):
            loss = 3.0 / epoch
            ckpt_rows.append(dict(job_uuid=job_uuid, identifier=f"{job_uuid}-epoch-{epoch}", epoch=epoch,
                                  step=12 * epoch, path=str(folder / "output" / f"epoch-{epoch}"),
                                  created_at=started + timedelta(seconds=40 * epoch),
                                  train_loss=loss, validation_loss=loss * 1.1, perplexity=2.718 ** (loss * 1.1)))
        for when, data in ((scheduled, {"status": "scheduled"}), (started, {"status": "in_progress", "attempt": 1}),
                           (completed, {"status": status})):
            event_rows.append(dict(job_uuid=job_uuid, created_at=when, type="state", data=data))
    with engine.begin() as conn:
        conn.execute(insert(jobs), job_rows)
        conn.execute(insert(checkpoints), ckpt_rows)
        conn.execute(insert(job_events), event_rows)
    engine.dispose()
    return uuids


@dataclass
class Server:
    process: subprocess.Popen
    base_url: str
    log_path: Path


def start_server(home: Path, database_url: str) -> Server:
    port = free_port()
    env = {
        **os.environ,
        "POSTTRAIN_HOME": str(home),
        "POSTTRAIN_DATABASE_URL": database_url,
        "POSTTRAIN_PORT": str(port),
        "POSTTRAIN_HOST": "127.0.0.1",
        "POSTTRAIN_MODEL_ROOTS": json.dumps([str(home / "models")]),
        "POSTTRAIN_FILE_ROOTS": json.dumps([str(home / "files")]),
    }
    log_path = home / "server.log"
    log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen([sys.executable, "-m", "posttrain", "serve", "--log-level", "warning"],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(base_url + "/readyz", timeout=2).status_code == 200:
                return Server(process, base_url, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become ready within 60 s")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


# -- measuring --------------------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (not of its children), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot, from /proc/stat (steal excluded)."""
    user, nice_, system, _idle, _iowait, irq, softirq = (int(x) for x in Path("/proc/stat").read_text().split()[1:8])
    return (user + nice_ + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def autogroup(pid: int | None) -> str:
    """The scheduler autogroup of ``pid`` (nice only weighs tasks against others in the same group)."""
    try:
        return Path(f"/proc/{pid}/autogroup").read_text().strip()
    except (OSError, TypeError):
        return "n/a"


@dataclass
class PhaseResult:
    name: str
    latencies_ms: list[float]
    wall_s: float
    errors: int
    server_cpu_s: float
    client_cpu_s: float
    machine_cpu_s: float
    trainer_cpu_s: float | None = None

    @property
    def other_cores(self) -> float:
        """Cores busy with processes that are not this benchmark's (other work on the machine)."""
        ours = self.server_cpu_s + self.client_cpu_s + (self.trainer_cpu_s or 0.0)
        return max(0.0, self.machine_cpu_s - ours) / self.wall_s

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s


def measure(name: str, base_url: str, uuids: list[str], *, requests: int, concurrency: int, server_pid: int,
            seed: int, trainer_pid: int | None = None) -> PhaseResult:
    """``requests`` status GETs for random stored jobs over ``concurrency`` keep-alive clients."""
    rng = random.Random(seed)
    chosen = [rng.choice(uuids) for _ in range(requests)]
    shares = [chosen[i::concurrency] for i in range(concurrency)]
    results: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    clients = [httpx.Client(base_url=base_url, timeout=30) for _ in range(concurrency)]
    for client in clients:  # open the connection and warm the path
        for job_uuid in rng.sample(uuids, 20):
            client.get(STATUS_PATH, params={"job_uuid": job_uuid})
    barrier = threading.Barrier(concurrency + 1)

    def work(index: int) -> None:
        client, out = clients[index], results[index]
        barrier.wait()
        for job_uuid in shares[index]:
            started = time.perf_counter()
            response = client.get(STATUS_PATH, params={"job_uuid": job_uuid})
            out.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                errors[index] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    pids = [server_pid] + ([trainer_pid] if trainer_pid else [])
    cpu_before = [process_cpu_seconds(p) for p in pids]
    client_before, machine_before = time.process_time(), machine_busy_seconds()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    cpu = [process_cpu_seconds(p) - b for p, b in zip(pids, cpu_before, strict=True)]
    client_cpu = time.process_time() - client_before
    machine_cpu = machine_busy_seconds() - machine_before
    for client in clients:
        client.close()
    return PhaseResult(name, [x for r in results for x in r], wall, sum(errors), cpu[0], client_cpu,
                       machine_cpu, cpu[1] if trainer_pid else None)


def metric_events(db_path: Path, job_uuid: str) -> int:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute("SELECT count(*) FROM job_events WHERE job_uuid = ? AND type = 'metric'", (job_uuid,)).fetchone()[0]


def wait_for_training(client: httpx.Client, db_path: Path, job_uuid: str, timeout: float = 90) -> dict:
    """Until the job is in_progress, has resources_allocated and has reported a training step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(STATUS_PATH, params={"job_uuid": job_uuid}).json()
        if status["status"] not in ("scheduled", "in_progress"):
            raise RuntimeError(f"the training job ended before it was measured: {status}")
        if status["status"] == "in_progress" and status.get("resources_allocated") and metric_events(db_path, job_uuid) > 0:
            return status
        time.sleep(0.25)
    raise RuntimeError(f"the training job did not report a step within {timeout:.0f} s")


# -- report -----------------------------------------------------------------------------------------


def report(phases: list[PhaseResult], *, training_valid: bool, facts: dict[str, str], steps_during: int | None) -> None:
    print()
    for key, value in facts.items():
        print(f"{key:>22}: {value}")
    print()
    header = f"{'phase':<10} {'requests':>8} {'errors':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    print(header)
    print("-" * len(header))
    for p in phases:
        print(f"{p.name:<10} {p.requests:>8} {p.errors:>6} {p.rps:>8.0f} {p.pct(0.5):>8.2f} {p.pct(0.99):>8.2f} "
              f"{max(p.latencies_ms):>8.2f}")
    print(f"\nCPU during each phase (cores busy = CPU seconds / wall seconds; {os.cpu_count()} cores in all):")
    header = (f"{'phase':<10} {'server ms/req':>13} {'server cores':>12} {'client cores':>12} {'trainer cores':>13} "
              f"{'other processes':>15}")
    print(header)
    print("-" * len(header))
    for p in phases:
        trainer = "-" if p.trainer_cpu_s is None else f"{p.trainer_cpu_s / p.wall_s:.2f}"
        print(f"{p.name:<10} {1000 * p.server_cpu_s / p.requests:>13.2f} {p.server_cpu_s / p.wall_s:>12.2f} "
              f"{p.client_cpu_s / p.wall_s:>12.2f} {trainer:>13} {p.other_cores:>15.2f}")
    noisy = [p.name for p in phases if p.other_cores > 0.15]
    if noisy:
        print(f"WARNING: other processes kept the CPUs busy during {', '.join(noisy)} (see 'other processes'); "
              f"the figures are not those of a quiet machine")
    print()
    by_name = {p.name: p for p in phases}
    idle, training = by_name.get("idle"), by_name.get("training")
    if idle and training:
        print(f"training/idle: p99 x{training.pct(0.99) / idle.pct(0.99):.2f}, req/s x{training.rps / idle.rps:.2f}"
              + (f"  (trainer reported {steps_during} steps during the training phase)" if steps_during is not None else ""))
    if training is None or not training_valid:
        print("training phase INVALID: the job was not in_progress for the whole measurement; no verdict")
    else:
        verdict = "target met" if training.pct(0.99) < TARGET_P99_MS else "target missed"
        print(f"p99 while training {training.pct(0.99):.2f} ms vs target < {TARGET_P99_MS:.0f} ms: {verdict}")
    q = LLAMA_STACK_QUOTED
    print(f"\nfor scale, QUOTED (not measured by this script): Llama Stack {q['version']} server on this machine, same endpoint:"
          f"\n  {q['req_per_s']:.0f} req/s, p99 {q['p99_idle_ms']:.0f} ms idle, p99 {q['p99_training_ms']:.0f} ms while training")


# -- main -------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="terminal jobs in the store (default 10000)")
    parser.add_argument("--requests", type=int, default=2000, help="status requests per phase (default 2000)")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent keep-alive clients (default 4)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data folder (server.log, the db)")
    args = parser.parse_args()
    if args.jobs < 1 or args.requests < 1 or args.concurrency < 1:
        parser.error("--jobs, --requests and --concurrency must be at least 1")

    from posttrain.demo import DEMO_DATASET_ID, DEMO_MODEL_NAME, colour_rows
    from posttrain.trainer.tiny_model import create_tiny_model

    home = Path(tempfile.mkdtemp(prefix="posttrain-bench-"))
    for sub in ("models", "files", "jobs", "datasets"):
        (home / sub).mkdir()
    db_path = home / "posttrain.db"
    database_url = f"sqlite:///{db_path}"
    server: Server | None = None
    job_uuid: str | None = None
    started_at = time.monotonic()
    load_at_start = Path("/proc/loadavg").read_text().split()[0]
    try:
        t0 = time.monotonic()
        model = home / "models" / DEMO_MODEL_NAME
        create_tiny_model(model)
        print(f"tiny model built in {time.monotonic() - t0:.1f} s", flush=True)
        t0 = time.monotonic()
        uuids = fill_store(database_url, home, str(model), args.jobs)
        print(f"{args.jobs} jobs stored in {time.monotonic() - t0:.1f} s ({db_path.stat().st_size / 1e6:.1f} MB db)", flush=True)
        server = start_server(home, database_url)
        print(f"server ready on {server.base_url} (pid {server.process.pid})", flush=True)
        control = httpx.Client(base_url=server.base_url, timeout=30)

        idle = measure("idle", server.base_url, uuids, requests=args.requests, concurrency=args.concurrency,
                       server_pid=server.process.pid, seed=1)
        print(f"idle: {idle.rps:.0f} req/s, p99 {idle.pct(0.99):.2f} ms", flush=True)

        response = control.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": DEMO_DATASET_ID,
                                                      "source": {"type": "rows", "rows": colour_rows(repeat=50)}})
        response.raise_for_status()
        job_uuid = f"bench-{uuid.uuid4()}"
        body = lora_body(job_uuid, str(model), DEMO_DATASET_ID, n_epochs=50, steps=50, batch_size=8)
        response = control.post("/v1/post-training/supervised-fine-tune", json=body)
        response.raise_for_status()
        t0 = time.monotonic()
        status = wait_for_training(control, db_path, job_uuid)
        resources = status["resources_allocated"]
        print(f"training job in_progress with steps reported after {time.monotonic() - t0:.1f} s", flush=True)
        steps_before = metric_events(db_path, job_uuid)
        trainer_pid = resources.get("pid")
        training = measure("training", server.base_url, uuids, requests=args.requests, concurrency=args.concurrency,
                           server_pid=server.process.pid, seed=2, trainer_pid=trainer_pid)
        after = control.get(STATUS_PATH, params={"job_uuid": job_uuid}).json()
        time.sleep(0.6)  # metric events are flushed every 0.5 s
        steps_during = metric_events(db_path, job_uuid) - steps_before
        training_valid = after["status"] == "in_progress" and steps_during > 0
        print(f"training: {training.rps:.0f} req/s, p99 {training.pct(0.99):.2f} ms; job {after['status']} afterwards",
              flush=True)

        facts = {
            "machine": f"{os.cpu_count()} cores, {platform.machine()}, {platform.system()} {platform.release()}",
            "load before the run": f"{load_at_start} (1-min load average; a quiet machine is near 0)",
            "python": platform.python_version(),
            "torch (trainer)": f"{resources.get('torch')} on {resources.get('device')}, {resources.get('threads')} threads, "
                               f"dtype {resources.get('dtype')}",
            "trainer nice": f"{os.environ.get('POSTTRAIN_TRAINER_NICE', '10 (default)')}; "
                            f"autogroup: server {autogroup(server.process.pid)}, trainer {autogroup(trainer_pid)}",
            "store": f"SQLite {sqlite3.sqlite_version}, {args.jobs} jobs",
            "client": f"{args.concurrency} keep-alive httpx clients (threads) in one process, {args.requests} requests/phase",
        }
        report([idle, training], training_valid=training_valid, facts=facts, steps_during=steps_during)
        print(f"\nwhole run {time.monotonic() - started_at:.0f} s")
        return 0 if training_valid else 1
    finally:
        if server is not None:
            if job_uuid is not None:
                try:
                    httpx.post(server.base_url + "/v1/post-training/job/cancel", json={"job_uuid": job_uuid}, timeout=30)
                except httpx.HTTPError:
                    pass
            stop_server(server)
        if args.keep:
            print(f"data folder kept: {home}")
        else:
            import shutil

            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
