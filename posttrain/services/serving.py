"""The API's side of the serving worker: starts it when first needed and streams its events, typed.

Models never load in the API process (no torch on the request path): generation runs in
``python -m posttrain.serving``, a child process answering HTTP on a Unix socket under the data
folder. The client starts it on first use, waits until it answers, and starts it again if it
died. Closing a ``generate`` stream early closes its HTTP response, which the worker sees as a
disconnect: the request's rows leave the batch at its next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

import posttrain
from posttrain.domain.serving import (
    GENERATION_FAILED,
    OVERLOADED,
    ErrorEvent,
    GenerationRequest,
    ServingProtocolError,
    StreamEvent,
    parse_event,
)
from posttrain.settings import Settings

log = logging.getLogger("posttrain.services")

#: The longest path a Unix socket may have (108 bytes on Linux, less elsewhere), with room to spare.
SOCKET_PATH_LIMIT = 100
WORKER_NOT_RUNNING: dict[str, Any] = {"running": False, "bases": [], "adapters": [], "base_loads_total": 0,
                                      "memory_bytes": 0, "active_requests": 0, "active_rows": 0,
                                      "waiting_requests": 0, "cancelled_rows_total": 0,
                                      "mixed_adapter_steps_total": 0, "last_mixed_step": None}


class ServingUnavailable(Exception):
    """The serving worker could not be started (its log says why)."""


class ServingClient:
    """Talks to the one serving worker of this server, starting it when first needed."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._process: subprocess.Popen[bytes] | None = None
        self._socket: Path | None = None
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self.starts = 0

    @property
    def folder(self) -> Path:
        return self._settings.resolved_home / "serving"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- the worker process ----------------------------------------------------------------------
    def _socket_path(self) -> Path:
        path = self.folder / "worker.sock"
        if len(str(path)) > SOCKET_PATH_LIMIT:  # a deep data folder: the socket lives in a private temp folder
            path = Path(tempfile.mkdtemp(prefix="posttrain-serve-")) / "worker.sock"
        return path

    def _start(self) -> None:
        self.stop_worker()
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.folder.chmod(0o700)  # the worker's socket and log are this user's alone
        self._socket = self._socket_path()
        settings = self._settings
        python = str(settings.serve_python) if settings.serve_python else sys.executable
        command = [python, "-m", "posttrain.serving", "--socket", str(self._socket),
                   "--memory-bytes", str(settings.serve_memory_bytes), "--max-batch", str(settings.serve_max_batch),
                   "--max-waiting", str(settings.serve_max_waiting), "--device", settings.device,
                   "--engine", settings.serve_engine, "--kv-cache-bytes", str(settings.serve_kv_cache_bytes),
                   "--max-lora-rank", str(settings.serve_max_lora_rank)]
        if settings.serve_threads:
            command += ["--threads", str(settings.serve_threads)]
        with (self.folder / "worker.log").open("ab") as log_file:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                             env=_worker_environment(python))
        self.starts += 1
        log.info("serving worker started", extra={"action": "serving_worker_started", "pid": self._process.pid,
                                                  "socket": str(self._socket)})

    async def _wait_ready(self, client: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + self._settings.serve_start_timeout_seconds
        while True:
            process = self._process
            if process is None or process.poll() is not None:
                raise ServingUnavailable(f"the serving worker exited at start; see {self.folder / 'worker.log'}")
            try:
                (await client.get("/stats", timeout=5)).raise_for_status()
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    self.stop_worker()
                    raise ServingUnavailable("the serving worker did not answer in time") from None
                await asyncio.sleep(0.05)

    async def _ready_client(self, *, restart: bool = False) -> httpx.AsyncClient:
        """An HTTP client on the worker's socket, for this event loop; the worker started (again) if needed."""
        loop = asyncio.get_running_loop()
        if self._client_loop is not loop or self._lock is None:
            self._client, self._client_loop, self._lock = None, loop, asyncio.Lock()
        async with self._lock:
            if restart or not self.running:
                await asyncio.to_thread(self._start)
                self._client = None
            if self._client is None:
                self._client = self._new_client()
                await self._wait_ready(self._client)
            return self._client

    def _existing_client(self) -> httpx.AsyncClient | None:
        """A client on the running worker's socket for this event loop; None when no worker runs."""
        if not self.running:
            return None
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client, self._client_loop, self._lock = self._new_client(), loop, asyncio.Lock()
        return self._client

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(self._socket)),
                                 base_url="http://serving", timeout=httpx.Timeout(30.0))

    # -- the protocol ----------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """The request's events, typed; close the iterator (``aclose``) to stop the generation early.

        A worker that cannot be started answers ``overloaded`` (the API's 503), not an exception.
        """
        try:
            client = await self._ready_client()
        except ServingUnavailable as exc:
            yield ErrorEvent(code=OVERLOADED, message=f"the serving worker is unavailable: {exc}")
            return
        for attempt in range(2):
            received = False
            try:
                async with client.stream("POST", "/generate", json=request.to_json(),
                                         timeout=httpx.Timeout(None, connect=10.0)) as response:
                    if response.status_code != 200:
                        yield _refusal(await response.aread(), response.status_code)
                        return
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue
                        received = True
                        try:
                            yield parse_event(json.loads(line))
                        except (ValueError, ServingProtocolError) as exc:
                            yield ErrorEvent(code=GENERATION_FAILED, message=f"bad line from the serving worker: {exc}")
                            return
                return
            except httpx.TransportError as exc:
                if received or attempt:
                    yield ErrorEvent(code=GENERATION_FAILED, message=f"the serving worker stopped: {exc}")
                    return
                log.warning("serving worker unreachable, restarting it", extra={"action": "serving_worker_restart"})
                try:
                    client = await self._ready_client(restart=True)
                except ServingUnavailable as unavailable:
                    yield ErrorEvent(code=OVERLOADED, message=f"the serving worker is unavailable: {unavailable}")
                    return

    async def stats(self) -> dict[str, Any]:
        """The worker's own accounting (what is loaded, how much memory, active requests); zeros when not running."""
        client = self._existing_client()
        if client is None:
            return dict(WORKER_NOT_RUNNING, memory_budget=self._settings.serve_memory_bytes)
        try:
            response = await client.get("/stats")
        except httpx.TransportError:  # it died since: it holds nothing
            return dict(WORKER_NOT_RUNNING, memory_budget=self._settings.serve_memory_bytes)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        body["running"] = True
        return body

    async def forget(self, path: str) -> None:
        """Drop a base or adapter folder from the worker's memory (after the batch using it); no-op when not running."""
        client = self._existing_client()
        if client is None:
            return
        try:
            (await client.post("/forget", json={"path": path})).raise_for_status()
        except httpx.TransportError:
            pass  # the worker died: nothing of it is in memory any more

    def stop_worker(self) -> None:
        process, self._process = self._process, None
        self._client = None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._socket is not None:
            self._socket.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the worker (app shutdown)."""
        self.stop_worker()


def _worker_environment(python: str) -> dict[str, str]:
    """This environment, plus this checkout on the path when the worker runs another interpreter (a vLLM
    venv has no posttrain installed)."""
    env = dict(os.environ)
    if python != sys.executable:
        checkout = str(Path(posttrain.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([checkout, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _refusal(body: bytes, status: int) -> ErrorEvent:
    try:
        event = parse_event(json.loads(body))
    except (ValueError, ServingProtocolError):
        event = None
    if isinstance(event, ErrorEvent):
        return event
    return ErrorEvent(code=GENERATION_FAILED, message=f"the serving worker answered {status}")
