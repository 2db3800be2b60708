"""A bounded storm of hostile and careless clients against a real server while a job trains and a
normal client polls its status; then an audit of what the storm left in the store.

Run: .venv/bin/python bench/abuse.py [--seconds 60] [--quiet-seconds 10] [--rate 200] [--only big,slow] [--keep]

A real `posttrain serve` (local worker, SQLite, API keys for two tenants) trains one LoRA job of
tenant ``alice`` for the whole run. Alice's normal client polls the job's status first alone (the
quiet p99) and then while tenant ``bob`` and keyless strangers attack, each from a loopback
address of its own (127.0.0.2-9; alice is 127.0.0.1):

- big bodies to the open sign-in form and to authenticated registrations;
- idle connections held open, headers and bodies sent a byte at a time;
- bursts of wrong keys and of sign-in attempts;
- same-name registrations racing unregisters, appends with one bad row among good ones;
- bad input: lone surrogates, NaN and huge numbers, over-long and escaping paths, ids with ``/``;
- floods of submits past the queue quota; reads of alice's job and dataset by bob.

The storm is bounded: all attackers together open at most ``--rate`` requests and connections a
second (``--rate 0``: as fast as they can, which saturates the server's CPU). It prints the
requests tried, how many got a 5xx, the integrity violations an audit finds afterwards (a dataset
record whose rows file is missing or holds another row count, a job without its folder or a
folder without its job, anything of alice's bob could read), alice's status p99 during the storm
against the quiet one, and the server's peak RSS. Targets: no 5xx, 0 violations,
p99 within 3x of quiet, peak RSS bounded by configuration (printed beside it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from posttrain.demo import colour_rows
from posttrain.services.access import digest, new_key
from posttrain.trainer.tiny_model import create_tiny_model
from tests.conftest import start_server, stop_server
from tests.integration.test_api import lora_request

BIG_BODY_BYTES = 20 * 1024 * 1024
#: Each attacker connects from a loopback address of its own (Linux routes all of 127/8 to lo), and
#: alice from 127.0.0.1: per-address limits then treat them as the different clients they stand for.
ADDRESSES = {"big": "127.0.0.2", "idle": "127.0.0.3", "slow": "127.0.0.4", "keys": "127.0.0.5",
             "races": "127.0.0.6", "bad": "127.0.0.7", "flood": "127.0.0.8", "snoop": "127.0.0.9"}


def client_from(address: str, base: str, **kwargs) -> httpx.Client:
    return httpx.Client(base_url=base, transport=httpx.HTTPTransport(local_address=address), **kwargs)


class Tally:
    """Requests tried and status codes seen, shared by the attacker threads."""

    def __init__(self, rate: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_slot = time.monotonic()
        self.codes: Counter[str] = Counter()
        self.five_xx: list[str] = []
        self.violations: list[str] = []

    def saw(self, kind: str, response: httpx.Response | None, *, error: str | None = None) -> None:
        with self.lock:
            if response is None:
                self.codes[f"{kind}:{error or 'closed'}"] += 1
                return
            self.codes[f"{kind}:{response.status_code}"] += 1
            if response.status_code >= 500:
                self.five_xx.append(f"{kind} {response.request.method} {response.request.url.path} -> "
                                    f"{response.status_code} {response.text[:200]}")

    def pace(self) -> None:
        """Wait for this request's slot: all attackers together send at most ``rate`` a second
        (0: as fast as they can)."""
        if not self.interval:
            return
        with self.lock:
            slot = self.next_slot = max(self.next_slot + self.interval, time.monotonic())
        time.sleep(max(0.0, slot - time.monotonic()))

    def violation(self, what: str) -> None:
        with self.lock:
            self.violations.append(what)

    @property
    def tried(self) -> int:
        return sum(self.codes.values())


def _call(tally: Tally, kind: str, client: httpx.Client, method: str, path: str, **kwargs) -> httpx.Response | None:
    tally.pace()
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        tally.saw(kind, None, error=type(exc).__name__)
        return None
    tally.saw(kind, response)
    return response


# -- the attackers: each loops until the deadline ---------------------------------------------------

def big_bodies(tally: Tally, base: str, bob: str, deadline: float) -> None:
    body = b"x" * BIG_BODY_BYTES
    with client_from(ADDRESSES["big"], base, timeout=30) as client:
        while time.monotonic() < deadline:
            _call(tally, "big-login", client, "POST", "/ui/login", content=body,
                  headers={"content-type": "application/x-www-form-urlencoded"})
            _call(tally, "big-register", client, "POST", "/v1/datasets", content=body,
                  headers={"content-type": "application/json", "authorization": f"Bearer {bob}"})


def held_sockets(tally: Tally, base: str, deadline: float, *, count: int = 300, slow: bool = False) -> None:
    """Idle connections (or, ``slow``, a header line dribbled a byte a second), reopened as the
    server closes them."""
    host, port = urlsplit(base).hostname, urlsplit(base).port
    kind = "slow-headers" if slow else "idle-socket"
    source = (ADDRESSES["slow" if slow else "idle"], 0)
    sockets: list[socket.socket] = []
    while time.monotonic() < deadline:
        while len(sockets) < count and time.monotonic() < deadline:
            tally.pace()
            try:
                sockets.append(socket.create_connection((host, port), timeout=2, source_address=source))
                tally.saw(kind, None, error="opened")
            except OSError:
                tally.saw(kind, None, error="refused")
                break
        for sock in list(sockets):
            try:
                sock.sendall(b"G" if slow else b"")
                if not slow:
                    sock.setblocking(False)
                    if sock.recv(1) == b"":
                        raise ConnectionResetError
                    sock.setblocking(True)
            except BlockingIOError:
                sock.setblocking(True)
            except OSError:
                sockets.remove(sock)
                sock.close()
                tally.saw(kind, None, error="closed-by-server")
        time.sleep(1.0)
    for sock in sockets:
        sock.close()


def wrong_keys(tally: Tally, base: str, deadline: float) -> None:
    with client_from(ADDRESSES["keys"], base, timeout=10) as client:
        while time.monotonic() < deadline:
            _call(tally, "wrong-key", client, "GET", "/v1/post-training/jobs",
                  headers={"authorization": f"Bearer {new_key()}"})
            _call(tally, "sign-in", client, "POST", "/ui/login", data={"api_key": new_key()})


def dataset_races(tally: Tally, base: str, bob: str, deadline: float, *, seed: int) -> None:
    rng = random.Random(seed)
    headers = {"authorization": f"Bearer {bob}"}
    with client_from(ADDRESSES["races"], base, timeout=30, headers=headers) as client:
        while time.monotonic() < deadline:
            name = f"race-{rng.randrange(3)}"
            rows = colour_rows(repeat=rng.randrange(1, 6))
            action = rng.choice(["register", "register", "unregister", "append", "bad-append"])
            if action == "register":
                _call(tally, "race-register", client, "POST", "/v1/datasets", json={
                    "purpose": "post-training/messages", "dataset_id": name,
                    "source": {"type": "rows", "rows": rows}})
            elif action == "unregister":
                _call(tally, "race-unregister", client, "DELETE", f"/v1/datasets/{name}")
            else:
                bad = [*rows[:3], {"nothing": "to learn"}, *rows[3:]] if action == "bad-append" else rows
                _call(tally, f"race-{action}", client, "POST", f"/v1/datasetio/append-rows/{name}", json={"rows": bad})


def bad_input(tally: Tally, base: str, bob: str, model: str, deadline: float) -> None:
    headers = {"authorization": f"Bearer {bob}", "content-type": "application/json"}
    bodies: list[bytes] = [
        b'{"purpose": "post-training/messages", "dataset_id": "s\\ud800", "source": {"type": "rows", "rows": []}}',
        (b'{"purpose": "post-training/messages", "dataset_id": "m", "metadata": {"k": "\\udfff"},'
         b' "source": {"type": "rows", "rows": [{"input_query": "a", "expected_answer": "b"}]}}'),
        b'{"purpose": "post-training/messages", "dataset_id": "' + b"x" * 5000 + b'", "source": {"type": "rows", "rows": []}}',
        b'{"purpose": "post-training/messages", "dataset_id": "u", "source": {"type": "uri", "uri": "file:///etc/passwd"}}',
        b"[" * 100_000,
        b'{"a": 1e999999}',
        b"\xff\xfe not utf-8",
    ]
    submits = []
    for change in ({"lr": float("nan")}, {"lr": 10**400}, {"weight_decay": float("inf")}):
        body = lora_request(model, "bob-data")
        body["training_config"]["optimizer_config"].update(change)
        submits.append(json.dumps(body, allow_nan=True).replace("1" + "0" * 400, "1e400").encode())
    for change in ({"job_uuid": "a/../../b"}, {"job_uuid": "x" * 300},
                   {"checkpoint_dir": "/etc"}, {"checkpoint_dir": "/" + "d" * 300}):
        submits.append(json.dumps(lora_request(model, "bob-data", **change)).encode())
    with client_from(ADDRESSES["bad"], base, timeout=30, headers=headers) as client:
        while time.monotonic() < deadline:
            for body in bodies:
                _call(tally, "bad-register", client, "POST", "/v1/datasets", content=body)
            for body in submits:
                _call(tally, "bad-submit", client, "POST", "/v1/post-training/supervised-fine-tune", content=body)
            _call(tally, "bad-cursor", client, "GET", "/v1/post-training/job/events",
                  params={"job_uuid": "nope"}, headers={"last-event-id": "9" * 40})


def submit_flood(tally: Tally, base: str, bob: str, model: str, deadline: float) -> None:
    with client_from(ADDRESSES["flood"], base, timeout=30, headers={"authorization": f"Bearer {bob}"}) as client:
        while time.monotonic() < deadline:
            response = _call(tally, "flood-submit", client, "POST", "/v1/post-training/supervised-fine-tune",
                             json=lora_request(model, "bob-data"))
            if response is not None and response.status_code == 200:
                # Keep the queue from growing past the storm: bob cancels what got in.
                _call(tally, "flood-cancel", client, "POST", "/v1/post-training/job/cancel",
                      json={"job_uuid": response.json()["job_uuid"]})


def snooping(tally: Tally, base: str, bob: str, alice_job: str, deadline: float) -> None:
    reads = [("GET", "/v1/post-training/job/status", {"job_uuid": alice_job}),
             ("GET", "/v1/post-training/job/artifacts", {"job_uuid": alice_job}),
             ("GET", "/v1/datasets/alice-data", None),
             ("GET", "/v1/datasetio/iterrows/alice-data", None)]
    with client_from(ADDRESSES["snoop"], base, timeout=30, headers={"authorization": f"Bearer {bob}"}) as client:
        while time.monotonic() < deadline:
            for method, path, params in reads:
                response = _call(tally, "snoop", client, method, path, params=params)
                if response is not None and response.status_code < 400:
                    tally.violation(f"bob read {path} of alice: {response.status_code}")
            response = _call(tally, "snoop-cancel", client, "POST", "/v1/post-training/job/cancel",
                             json={"job_uuid": alice_job})
            if response is not None and response.status_code < 400:
                tally.violation("bob cancelled alice's job")


ATTACKER_NICE = 19


def _niced(target, *args, **kwargs) -> None:
    """Run an attacker at the lowest CPU priority (Linux: a thread's own nice value).

    Attackers would be other machines; here they share the server's few cores, and at the same
    priority the storm measured how the server and its own load generator split the CPU, not how
    the server copes. Their pace is still ``--rate``: the tally printed shows it was kept."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ATTACKER_NICE)
    target(*args, **kwargs)


ATTACKERS = ("big", "idle", "slow", "keys", "races", "bad", "flood", "snoop")


def _attackers(tally: Tally, base: str, bob: str, model: str, alice_job: str, deadline: float):
    """Each attacker thread's (name, target, args, kwargs); names as ``ATTACKERS`` (``--only``)."""
    yield "big", big_bodies, (tally, base, bob, deadline), {}
    yield "idle", held_sockets, (tally, base, deadline), {}
    yield "slow", held_sockets, (tally, base, deadline), {"slow": True}
    yield "keys", wrong_keys, (tally, base, deadline), {}
    for n in range(3):
        yield "races", dataset_races, (tally, base, bob, deadline), {"seed": n}
    yield "bad", bad_input, (tally, base, bob, model, deadline), {}
    yield "flood", submit_flood, (tally, base, bob, model, deadline), {}
    yield "snoop", snooping, (tally, base, bob, alice_job, deadline), {}


# -- the normal client, the audit, the server's memory ----------------------------------------------

def poll_status(base: str, key: str, job_uuid: str, seconds: float, results: multiprocessing.Queue) -> None:
    """Alice's normal client, in a process of its own: its latencies are the server's, not this
    process's attacker threads' contention for one interpreter."""
    with httpx.Client(base_url=base, timeout=60, headers={"authorization": f"Bearer {key}"}) as client:
        results.put(_poll(client, job_uuid, seconds))


def polled(base: str, key: str, job_uuid: str, seconds: float) -> multiprocessing.Process:
    results: multiprocessing.Queue = multiprocessing.Queue()
    process = multiprocessing.Process(target=poll_status, args=(base, key, job_uuid, seconds, results))
    process.start()
    process.results = results  # type: ignore[attr-defined]
    return process


def _poll(client: httpx.Client, job_uuid: str, seconds: float) -> list[float]:
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        response = client.get("/v1/post-training/job/status", params={"job_uuid": job_uuid})
        latencies.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"alice's status poll answered {response.status_code}: {response.text[:300]}")
        time.sleep(0.02)
    return latencies


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else values[0]


def audit(home: Path, tally: Tally) -> int:
    """Dataset records against their rows files, jobs against their folders, in the server's store."""
    from sqlalchemy import create_engine, select

    from posttrain.store.tables import datasets, jobs

    engine = create_engine(f"sqlite:///{home / 'posttrain.db'}")
    checked = 0
    with engine.connect() as conn:
        for row in conn.execute(select(datasets.c.tenant, datasets.c.identifier, datasets.c.row_count,
                                       datasets.c.rows_path)):
            checked += 1
            path = Path(row.rows_path)
            if not path.is_file():
                tally.violation(f"dataset {row.tenant}/{row.identifier}: rows file {path.name} is missing")
                continue
            lines = sum(1 for _ in path.open(encoding="utf-8"))
            if lines != row.row_count:
                tally.violation(f"dataset {row.tenant}/{row.identifier}: record says {row.row_count} rows, "
                                f"file holds {lines}")
        job_ids = set(conn.execute(select(jobs.c.id)).scalars())
    engine.dispose()
    folders = {p.name for p in (home / "jobs").iterdir() if p.is_dir()} if (home / "jobs").is_dir() else set()
    checked += len(job_ids) + len(folders)
    for job_id in sorted(job_ids - folders):
        tally.violation(f"job {job_id} has no folder")
    for name in sorted(folders - job_ids):
        tally.violation(f"folder jobs/{name} has no job")
    return checked


def rss_peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_now_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the storm")
    parser.add_argument("--quiet-seconds", type=float, default=10.0, help="alice polling alone, before the storm")
    parser.add_argument("--rate", type=float, default=200.0,
                        help="requests and connections a second, all attackers together (0: unbounded)")
    parser.add_argument("--keep", action="store_true", help="keep the data folder")
    parser.add_argument("--only", default="", help=f"comma-separated attackers to run (of {', '.join(ATTACKERS)})")
    args = parser.parse_args()
    args_only = {name for name in args.only.split(",") if name}
    if args_only - set(ATTACKERS):
        parser.error(f"unknown attackers: {', '.join(sorted(args_only - set(ATTACKERS)))}")

    home = Path(tempfile.mkdtemp(prefix="posttrain-abuse-"))
    model = home / "models" / "tiny-llama"
    create_tiny_model(model)
    alice, bob = new_key(), new_key()
    keys = home / "keys.txt"
    keys.write_text(f"alice:{digest(alice)}\nbob:{digest(bob)}\n")
    env = {"POSTTRAIN_API_KEYS_FILE": str(keys), "POSTTRAIN_RATE_LIMIT_PER_MINUTE": "6000",
           "POSTTRAIN_MAX_QUEUED_JOBS_PER_TENANT": "3"}
    server = start_server(home, model, extra_env=env)
    tally = Tally(args.rate)
    try:
        pid = server.process.pid
        rss_start = rss_now_mib(pid)
        alice_client = httpx.Client(base_url=server.base_url, timeout=60, headers={"authorization": f"Bearer {alice}"})
        bob_client = httpx.Client(base_url=server.base_url, timeout=60, headers={"authorization": f"Bearer {bob}"})
        for client, name in ((alice_client, "alice-data"), (bob_client, "bob-data")):
            client.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": name,
                                              "source": {"type": "rows", "rows": colour_rows(repeat=8)}}
                        ).raise_for_status()
        job = lora_request(str(model), "alice-data")
        job["training_config"]["n_epochs"] = 1000  # trains through the whole run; cancelled at the end
        job["training_config"]["max_steps_per_epoch"] = 4
        alice_client.post("/v1/post-training/supervised-fine-tune", json=job).raise_for_status()
        while alice_client.get("/v1/post-training/job/status",
                               params={"job_uuid": job["job_uuid"]}).json()["status"] != "in_progress":
            time.sleep(0.2)

        quiet_poller = polled(server.base_url, alice, job["job_uuid"], args.quiet_seconds)
        quiet = quiet_poller.results.get()
        quiet_poller.join()
        stormy_poller = polled(server.base_url, alice, job["job_uuid"], args.seconds)
        deadline = time.monotonic() + args.seconds
        attackers = [threading.Thread(target=_niced, args=(target, *args), kwargs=kwargs)
                     for name, target, args, kwargs in _attackers(tally, server.base_url, bob, str(model),
                                                                  job["job_uuid"], deadline)
                     if not args_only or name in args_only]
        for thread in attackers:
            thread.start()
        stormy = stormy_poller.results.get()
        stormy_poller.join()
        for thread in attackers:
            thread.join(timeout=120)
        status = alice_client.get("/v1/post-training/job/status", params={"job_uuid": job["job_uuid"]}).json()
        if status["status"] != "in_progress":
            tally.violation(f"alice's job is {status['status']} after the storm, not still training")
        alice_client.post("/v1/post-training/job/cancel", json={"job_uuid": job["job_uuid"]})
        rss_peak = rss_peak_mib(pid)
        alice_client.close()
        bob_client.close()
    finally:
        stop_server(server)
    checked = audit(home, tally)

    ratio = p99(stormy) / p99(quiet)
    rate = f"{args.rate:.0f} a second at most" if args.rate else "unbounded"
    print(f"requests tried:           {tally.tried} in {args.seconds:.0f} s ({rate})")
    print(f"5xx answers:              {len(tally.five_xx)}  (target 0)")
    for line in tally.five_xx[:10]:
        print(f"    {line}")
    print(f"integrity violations:     {len(tally.violations)} of {checked} records and folders audited  (target 0)")
    for line in tally.violations[:10]:
        print(f"    {line}")
    print(f"alice's status p99:       quiet {p99(quiet) * 1000:.1f} ms, storm {p99(stormy) * 1000:.1f} ms "
          f"({len(stormy)} polls): {ratio:.2f}x quiet  (target <= 3x)")
    print(f"server RSS:               {rss_start:.0f} MiB at start, {rss_peak:.0f} MiB peak "
          f"({rss_peak / rss_start:.2f}x; bounded by configuration: the open-path and body limits)")
    print("outcomes by kind:")
    for key, count in sorted(tally.codes.items()):
        print(f"    {key:32s} {count}")
    met = not tally.five_xx and not tally.violations and ratio <= 3
    print("targets met" if met else "targets missed")
    if args.keep:
        print(f"data folder kept: {home}")
    else:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
