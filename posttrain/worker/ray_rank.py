"""What runs on each Ray Train worker of a job: our own trainer process, and the relay to the driver.

Each rank starts ``python -m posttrain.trainer SPEC`` as a child process, exactly as the local
executor does, with the standard variables of a torch job (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) set, so the trainer itself decides how to join
its peers. A child process rather than the trainer in the Ray worker's own interpreter, because the
trainer owns its process: it takes file descriptor 1 for the protocol, installs signal handlers
(only possible in a main thread, and Ray runs this function in another) and leaves with
``os._exit`` once paused. The rendezvous port is a fresh one chosen on rank 0's node: Ray Train's
own process group already holds the one Ray put in ``MASTER_PORT``.

Rank 0 sends its trainer's protocol lines to the ``Relay`` actor, which the driver empties onto its
own stdout. The final line is held back: a trainer that ends without one, or with ``cancelled``
when nobody asked it to stop (its Ray worker vanished, a peer was lost), makes this function
raise, which is what Ray Train's failure handling restarts the whole group on; the restarted
trainer resumes from the job's newest checkpoint in its output folder.

Imports Ray and the standard library only (no torch: the trainer process imports that).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from posttrain.worker.warm import log_tail, trainer_command

#: How often a rank asks the relay whether the driver wants its trainer to stop or pause.
POLL_SECONDS = 0.3

#: How long a rank other than 0 whose trainer failed waits for rank 0's verdict (a ``failed`` line:
#: the same failure on every rank, not one Ray should retry) before it raises as a lost rank.
VERDICT_WAIT_SECONDS = 10.0

TERMINAL_KINDS = frozenset({"completed", "cancelled", "paused", "failed"})


class Relay:
    """One per job attempt, created by the driver (a Ray actor of no CPU): rank 0's protocol lines
    on their way to the driver, the driver's orders to the ranks, and who the ranks are. It outlives
    restarts of the worker group, so the driver sees one stream for the attempt."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._final: str | None = None
        self._order: str | None = None
        self._workers: dict[int, dict[str, Any]] = {}
        self._group_starts = 0

    def post(self, lines: list[str]) -> None:
        self._lines.extend(lines)

    def take(self) -> list[str]:
        lines, self._lines = self._lines, []
        return lines

    def finish(self, line: str) -> None:
        self._final = line

    def final(self) -> str | None:
        return self._final

    def order(self, order: str) -> None:
        """``stop`` wins over ``pause``; a pause once stopping changes nothing."""
        if order == "stop" or self._order is None:
            self._order = order

    def current_order(self) -> str | None:
        return self._order

    def joined(self, rank: int, info: dict[str, Any]) -> None:
        if rank == 0:
            self._group_starts += 1
        self._workers[rank] = info

    def workers(self) -> dict[str, Any]:
        return {"workers": [self._workers[r] for r in sorted(self._workers)], "group_starts": self._group_starts}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def rank_loop(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: run this rank's trainer to its end (see the module)."""
    import ray
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    context = ray.train.get_context()
    rank, size = context.get_world_rank(), context.get_world_size()
    relay = config["relay"]
    ray.get(relay.joined.remote(rank, {"rank": rank, "pid": os.getpid(), "node": ray.util.get_node_ip_address()}))
    rendezvous = (ray.util.get_node_ip_address(), free_port()) if rank == 0 else None
    master_addr, master_port = broadcast_from_rank_zero(rendezvous)
    if ray.get(relay.current_order.remote()) == "stop":  # cancelled while the group was starting
        if rank == 0:
            ray.get(relay.finish.remote(json.dumps({"event": "cancelled"})))
        return
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(context.get_local_rank()),
           "LOCAL_WORLD_SIZE": str(context.get_local_world_size()), "MASTER_ADDR": str(master_addr),
           "MASTER_PORT": str(master_port), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    log_path = Path(config["log_dir"]) / f"{config['log_stem']}-rank-{rank}.log"
    with open(log_path, "ab") as stderr:
        command = trainer_command(sys.executable, config["nice"], config["spec"], module=config["module"])
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                   env=env, process_group=0)
    final: list[str] = []
    send = (lambda lines: relay.post.remote(lines)) if rank == 0 else None
    reader = threading.Thread(target=_read, args=(process.stdout, send, final), daemon=True, name="trainer-stdout")
    reader.start()
    asked = _follow_orders(process, relay)
    reader.join(timeout=30)
    code = process.returncode
    last = final[-1] if final else None
    kind = json.loads(last)["event"] if last else None
    if asked == "stop" and kind in (None, "cancelled"):  # stopped as asked, maybe before its handler was in place
        if rank == 0:
            ray.get(relay.finish.remote(json.dumps({"event": "cancelled"})))
        return
    if rank == 0:
        if kind in ("completed", "paused", "failed"):
            ray.get(relay.finish.remote(last))
            return
    elif code == 0 or _rank_zero_decided(relay):
        return
    raise RuntimeError(f"trainer of rank {rank} ended with exit code {code} and {kind or 'no final event'}"
                       f"{' (nobody asked it to stop)' if kind == 'cancelled' else ''}: {log_tail(log_path)}")


def _read(stream: IO[bytes], send: Callable[[list[str]], Any] | None, final: list[str]) -> None:
    """Forward the trainer's lines (rank 0) in small batches, holding back the final one."""
    batch: list[str] = []
    last_sent = time.monotonic()
    for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if not line:
            continue
        try:
            kind = json.loads(line).get("event")
        except (ValueError, AttributeError):
            kind = None
        if kind in TERMINAL_KINDS:
            final.append(line)
        elif send is not None:  # the other ranks' trainers report nothing; their lines are dropped
            batch.append(line)
            if kind != "metric" or time.monotonic() - last_sent > 0.2:
                send(batch)
                batch, last_sent = [], time.monotonic()
    if send is not None and batch:
        send(batch)


def _follow_orders(process: subprocess.Popen[bytes], relay: Any) -> str | None:
    """Wait for the trainer to exit, passing on the driver's order: stop (SIGTERM to the trainer's
    group) or pause (SIGUSR1 to the trainer alone, as the launcher does). Returns the order given."""
    import ray

    given: str | None = None
    while process.poll() is None:
        order = ray.get(relay.current_order.remote())
        if order is not None and order != given:
            sig = signal.SIGTERM if order == "stop" else signal.SIGUSR1
            try:
                if order == "stop":
                    os.killpg(process.pid, sig)
                else:
                    os.kill(process.pid, sig)
            except ProcessLookupError:
                pass
            given = order
        try:
            process.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            pass
    return given


def _rank_zero_decided(relay: Any) -> bool:
    import ray

    deadline = time.monotonic() + VERDICT_WAIT_SECONDS
    while time.monotonic() < deadline:
        if ray.get(relay.final.remote()) is not None:
            return True
        time.sleep(POLL_SECONDS)
    return False
