"""The worker's HTTP face on its Unix socket: ``POST /generate`` (NDJSON), ``GET /stats``, ``POST /forget``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from posttrain.domain.serving import BAD_REQUEST, GenerationRequest, ServingProtocolError, StreamEvent
from posttrain.serving.loop import EngineLoop


def build_app(engine: EngineLoop) -> Starlette:
    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    async def generate(request: Request) -> Response:
        try:
            generation = GenerationRequest.from_json(json.loads(await request.body()))
        except (ValueError, ServingProtocolError) as exc:
            return JSONResponse({"type": "error", "code": BAD_REQUEST, "message": str(exc)}, status_code=400)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent | None] = asyncio.Queue()

        def emit(event: StreamEvent | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        ticket = engine.submit(generation, emit)

        async def watch_disconnect() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    ticket.cancel()
                    engine.wake()
                    return

        async def lines() -> AsyncIterator[str]:
            watcher = asyncio.create_task(watch_disconnect())
            try:
                while (event := await events.get()) is not None:
                    yield json.dumps(event.to_json(), allow_nan=False) + "\n"
            finally:
                watcher.cancel()
                if not ticket.done:
                    ticket.cancel()
                    engine.wake()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def stats(_request: Request) -> Response:
        return JSONResponse(engine.stats())

    async def forget(request: Request) -> Response:
        try:
            body: Any = json.loads(await request.body())
            path = body["path"]
            if not isinstance(path, str):
                raise TypeError("'path' must be a string")
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"type": "error", "code": BAD_REQUEST, "message": f"bad body: {exc}"}, status_code=400)
        forgotten = await asyncio.wrap_future(engine.forget(path))
        return JSONResponse({"path": path, "forgotten": forgotten})

    return Starlette(routes=[Route("/generate", generate, methods=["POST"]), Route("/stats", stats, methods=["GET"]),
                             Route("/forget", forget, methods=["POST"])], lifespan=lifespan)
