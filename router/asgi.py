"""Serve an ASGI application (the MCP SDK's Streamable HTTP app) from an aiohttp route.

The official MCP SDK serves Streamable HTTP as an ASGI (Starlette) app; the engine's HTTP is aiohttp.
`AsgiMount` runs the app's lifespan for the life of the aiohttp app (`cleanup_ctx`) and turns each
aiohttp request into one ASGI `http` call, streaming the response back (JSON or server-sent events).
The aiohttp middlewares (keys, rate limits, metrics, errors) run before the app sees the request.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

from aiohttp import web

Asgi = Callable[[dict, Callable, Callable], Any]


class AsgiMount:
    def __init__(self, app: Asgi) -> None:
        self.app = app

    async def lifespan(self, _app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: ASGI lifespan startup before serving, shutdown after."""
        inbox: asyncio.Queue[dict] = asyncio.Queue()
        started, stopped = asyncio.Event(), asyncio.Event()
        failure: list[str] = []

        async def receive() -> dict:
            return await inbox.get()

        async def send(message: dict) -> None:
            kind = message["type"]
            if kind.endswith(".failed"):
                failure.append(message.get("message", kind))
            (started if kind.startswith("lifespan.startup") else stopped).set()

        task = asyncio.create_task(self.app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                            receive, send))
        await inbox.put({"type": "lifespan.startup"})
        await asyncio.wait({task, asyncio.create_task(started.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if failure or task.done():
            raise RuntimeError(f"the mounted ASGI app did not start: {failure or task.exception()}")
        yield
        await inbox.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(task, 10)
        except asyncio.TimeoutError:
            task.cancel()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        done = asyncio.Event()
        response: web.StreamResponse | None = None
        sent_body = False
        host, port = (request.transport.get_extra_info("sockname") or ("127.0.0.1", 0))[:2] \
            if request.transport else ("127.0.0.1", 0)
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
            "scheme": request.scheme, "path": request.path, "raw_path": request.raw_path.split("?")[0].encode(),
            "query_string": request.query_string.encode(), "root_path": "",
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1", "replace")) for k, v in request.headers.items()],
            "client": (request.remote or "", 0), "server": (host, port), "state": {},
        }

        async def receive() -> dict:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()  # the client stays until the response is over
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            nonlocal response
            if message["type"] == "http.response.start":
                response = web.StreamResponse(status=message["status"])
                for k, v in message.get("headers", []):
                    name = k.decode("latin-1")
                    if name.lower() not in ("content-length", "transfer-encoding"):
                        response.headers.add(name, v.decode("latin-1"))
                await response.prepare(request)
            elif message["type"] == "http.response.body":
                assert response is not None
                if message.get("body"):
                    await response.write(message["body"])
                if not message.get("more_body"):
                    done.set()

        try:
            await self.app(scope, receive, send)
        finally:
            done.set()
        if response is None:
            raise web.HTTPInternalServerError(reason="the mounted app sent no response")
        await response.write_eof()
        return response
