"""``python -m posttrain.serving --socket PATH --memory-bytes N``: the serving worker process."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from posttrain.serving.loop import EngineLoop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.serving", description=__doc__)
    parser.add_argument("--socket", required=True, help="Unix socket path to answer HTTP on")
    parser.add_argument("--memory-bytes", type=int, required=True, help="budget for the parameters of loaded models")
    parser.add_argument("--max-batch", type=int, default=32, help="most rows decoded together")
    parser.add_argument("--max-waiting", type=int, default=1024, help="requests waiting past this are refused")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--engine", default="auto", choices=["auto", "transformers", "vllm"],
                        help="auto: vLLM where it is installed and a GPU is present, else transformers")
    parser.add_argument("--kv-cache-bytes", type=int, default=1024**3, help="vLLM's KV cache (vllm engine only)")
    parser.add_argument("--max-lora-rank", type=int, default=64, help="largest LoRA rank served (vllm engine only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    import torch
    import uvicorn

    from posttrain.serving.app import build_app

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    path = Path(args.socket)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    engine = _engine(args, device)
    logging.getLogger("posttrain.serving").info("serving engine %s on %s", engine.name, device)
    _exit_with_parent()
    listener = _private_socket(path)
    server = uvicorn.Server(uvicorn.Config(build_app(engine), log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=5))
    server.run(sockets=[listener])
    return 0


def _engine(args: argparse.Namespace, device: str) -> EngineLoop:
    """The engine the operator asked for; ``auto`` takes vLLM only where it is installed and a GPU is present."""
    name = args.engine
    if name == "auto":
        name = "vllm" if device == "cuda" and importlib.util.find_spec("vllm") is not None else "transformers"
    if name == "vllm":
        if args.threads > 0:  # vLLM pins its own threads to every core unless told not to
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        from posttrain.serving.vllm_engine import VllmEngine

        return VllmEngine(memory_bytes=args.memory_bytes, max_batch=args.max_batch, max_waiting=args.max_waiting,
                          device=device, kv_cache_bytes=args.kv_cache_bytes, max_lora_rank=args.max_lora_rank)
    from posttrain.serving.engine import Engine

    return Engine(memory_bytes=args.memory_bytes, max_batch=args.max_batch, max_waiting=args.max_waiting,
                  device=device)


def _private_socket(path: Path) -> socket.socket:
    """The listening Unix socket, readable and writable by this user only (uvicorn's own ``uds`` would make it
    0666, open to every local user)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    return listener


def _exit_with_parent() -> None:
    """The API process started this worker: when it goes (even killed), the worker goes too."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
