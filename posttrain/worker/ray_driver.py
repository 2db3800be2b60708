"""The Ray executor's driver: ``python -m posttrain.worker.ray_driver [options] SPEC.json``.

It speaks the trainer protocol (docs/trainer-protocol.md) on stdout and takes the same controls
(SIGTERM, SIGUSR1, stdin closing), so the launcher runs it exactly where it would run the trainer
and sees the same reports: the lease, the store and every state move stay the launcher's. Inside,
it connects to an existing Ray cluster and runs the job as one Ray Train ``TorchTrainer`` run of
``--workers`` ranks, each rank our own trainer process (``ray_rank``); rank 0's lines come back
through a ``Relay`` actor and are printed here, ``started`` with what Ray placed where
(``resources.ray``).

- SIGTERM or stdin closing: every rank is told to stop its trainer (SIGTERM to each); rank 0's
  ``cancelled`` is printed. A group that does not stop within ``--stop-grace`` seconds is left to
  Ray: this process exits, and a driver's exit ends its Ray job's actors, ranks included.
- SIGUSR1: every rank pauses its trainer (SIGUSR1); rank 0's ``paused`` names the resume point.
- A lost rank (its Ray worker or node gone, its trainer killed): Ray Train's failure handling
  (``--max-failures``) restarts the whole group, and the trainers resume from the job's newest
  checkpoint, re-sending its ``checkpoint`` events, as a new local attempt would. Past that many
  failures the driver exits 1 with no final event and the launcher requeues the job (an attempt).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from posttrain.domain.protocol import Cancelled, Failed, FailureCode, LogLine
from posttrain.domain.recipes import TrainerSpec
from posttrain.worker.ray_rank import Relay, rank_loop

#: What the trainer processes of the ranks run (a test may name a stand-in speaking the protocol).
TRAINER_MODULE = "posttrain.trainer"

#: How long connecting to the cluster may take before the attempt ends (Ray itself waits minutes).
CONNECT_TIMEOUT_SECONDS = 60.0


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m posttrain.worker.ray_driver")
    parser.add_argument("spec", help="the trainer spec (JSON) the launcher wrote")
    parser.add_argument("--address", default=None, help="the Ray cluster (host:port of its head); default: Ray's own")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (ranks) for the job")
    parser.add_argument("--max-failures", type=int, default=3, help="group restarts Ray Train makes after lost ranks")
    parser.add_argument("--stop-grace", type=float, default=8.0, help="seconds the ranks get to stop on cancel")
    parser.add_argument("--nice", type=int, default=10, help="niceness of each rank's trainer process")
    parser.add_argument("--trainer-module", default=TRAINER_MODULE, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _take_stdout() -> IO[str]:
    """A private handle on the real stdout; fd 1 and ``sys.stdout`` go to stderr (Ray's chatter)."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return protocol


def _controls(orders: queue.Queue[str]) -> None:
    """SIGTERM and stdin closing (the launcher is gone) mean stop; SIGUSR1 means pause."""
    signal.signal(signal.SIGTERM, lambda *_: orders.put("stop"))
    signal.signal(signal.SIGUSR1, lambda *_: orders.put("pause"))

    def watch_stdin() -> None:
        while os.read(0, 65536):
            pass
        orders.put("stop")

    threading.Thread(target=watch_stdin, name="launcher-stdin", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    out = _take_stdout()

    def emit(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    orders: queue.Queue[str] = queue.Queue()
    _controls(orders)
    try:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError as exc:
        emit(Failed(code=FailureCode.USAGE, message=f"the ray executor needs Ray Train on the worker: "
                                                    f"pip install 'posttrain[ray]' ({exc})").to_line())
        return 1
    spec_path = Path(args.spec).resolve()
    spec = TrainerSpec.model_validate_json(spec_path.read_text(encoding="utf-8"))
    _connect(ray, args.address or "auto", orders, emit)
    relay = ray.remote(num_cpus=0)(Relay).remote()
    use_gpu = spec.device == "cuda" or (spec.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    trainer = TorchTrainer(
        rank_loop,
        train_loop_config={"relay": relay, "spec": str(spec_path), "module": args.trainer_module, "nice": args.nice,
                           "log_dir": str(spec_path.parent), "log_stem": spec_path.stem.replace("spec", "trainer")},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=use_gpu),
        run_config=RunConfig(name=f"{spec_path.stem}-{int(time.time())}", storage_path=str(spec_path.parent / "ray"),
                             failure_config=FailureConfig(max_failures=args.max_failures)),
    )
    placed = {"address": args.address or "auto", "use_gpu": use_gpu, "max_failures": args.max_failures}
    return _drive(trainer, relay, orders, emit, placed, stop_grace=args.stop_grace)


def _connect(ray: Any, address: str, orders: queue.Queue[str], emit: Any) -> None:
    """``ray.init`` on ``address``, in a thread: an unreachable cluster makes it wait (and retry) for
    minutes, so past ``CONNECT_TIMEOUT_SECONDS`` the driver leaves with exit code 1 and no final
    event (not the job's fault: the launcher requeues it), and a stop meanwhile is a ``cancelled``."""
    failure: list[BaseException] = []

    def connect() -> None:
        try:
            ray.init(address=address, logging_level=logging.WARNING, configure_logging=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failure.append(exc)

    thread = threading.Thread(target=connect, name="ray-init", daemon=True)
    thread.start()
    deadline = time.monotonic() + CONNECT_TIMEOUT_SECONDS
    while thread.is_alive() and time.monotonic() < deadline:
        if not orders.empty() and orders.get() == "stop":
            emit(Cancelled().to_line())
            out_now(0)
        thread.join(timeout=0.2)
    if thread.is_alive() or failure:
        why = f"{type(failure[0]).__name__}: {failure[0]}" if failure else f"no answer in {CONNECT_TIMEOUT_SECONDS:.0f} s"
        emit(LogLine(level="error", message=f"cannot reach the Ray cluster at {address}: {why}"[:2000]).to_line())
        out_now(1)


def _drive(trainer: Any, relay: Any, orders: queue.Queue[str], emit: Any, placed: dict[str, Any], *,
           stop_grace: float) -> int:
    """Run the group while printing rank 0's lines and passing on orders; print the final line."""
    import ray

    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - reported as the attempt's end below
            failure.append(exc)

    run = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    run.start()
    stopping_since: float | None = None
    while run.is_alive():
        _print_lines(ray.get(relay.take.remote()), relay, emit, placed)
        while not orders.empty():
            order = orders.get()
            relay.order.remote(order)
            if order == "stop" and stopping_since is None:
                stopping_since = time.monotonic()
        if stopping_since is not None and time.monotonic() - stopping_since > stop_grace:
            emit(LogLine(level="warning", message="the Ray workers did not stop in time; "
                                                  "leaving them to Ray (this driver's job ends)").to_line())
            emit(Cancelled().to_line())
            out_now(0)
        run.join(timeout=0.2)
    _print_lines(ray.get(relay.take.remote()), relay, emit, placed)
    final = ray.get(relay.final.remote())
    if final is not None:
        emit(final)
        code = 1 if json.loads(final).get("event") == "failed" else 0
    elif stopping_since is not None:
        emit(Cancelled().to_line())
        code = 0
    else:
        reason = f"{type(failure[0]).__name__}: {failure[0]}" if failure else "no final event"
        emit(LogLine(level="error", message=f"Ray Train ended the run without a result: {reason}"[:2000]).to_line())
        code = 1
    ray.shutdown()
    return code


def _print_lines(lines: list[str], relay: Any, emit: Any, placed: dict[str, Any]) -> None:
    import ray

    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict) and event.get("event") == "started" and isinstance(event.get("resources"), dict):
            event["resources"] = {**event["resources"], "executor": "ray",
                                  "ray": {**placed, **ray.get(relay.workers.remote())}}
            line = json.dumps(event)
        emit(line)


def out_now(code: int) -> None:
    """Leave at once: what matters is printed; the cluster ends this driver's job and its actors."""
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
