"""Start-up shared by `tellodb serve` (router.cli) and the cluster roles (router.roles): logging,
the API key's default, claiming the data directory, the embedder check, and serving the HTTP app
until SIGTERM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from node.config import DEV_API_KEY, ClusterConfig, ConfigError, configured_dimension, normalized_backend
from router import datadir, tuning

log = logging.getLogger("tellodb")


class ClientErrorFilter(logging.Filter):
    """aiohttp logs a request its parser refuses (a line too long, a NUL in a header: a 400 to the
    client) as an ERROR with a traceback; it is the client's error, so one INFO line says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
            reason = (exc.message or "").strip().splitlines()[0][:200] if exc.message else ""
            record.msg, record.args = f"{record.getMessage()}: {exc.code} {reason}", ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def setup_logging() -> None:
    level = os.environ.get("TELLODB_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level if level in logging._nameToLevel else "INFO", stream=sys.stderr,
                        format="%(asctime)s %(levelname)5s %(name)s: %(message)s")
    for noisy in ("chromadb", "httpx", "sentence_transformers", "transformers", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(ClientErrorFilter())


def resolve_api_key(config: ClusterConfig) -> ClusterConfig:
    """No key configured: the development key on loopback (with a warning), refusal elsewhere."""
    if config.api_key:
        return config
    if not config.is_loopback:
        raise ConfigError(
            f"TELLODB_API_KEY / TEMPORAL_MEMORY_API_KEY: required when binding to {config.host} "
            "(the development key is only allowed on loopback addresses)")
    log.warning("No API key configured: using the development key %s (loopback only; set TELLODB_API_KEY)",
                DEV_API_KEY)
    return dataclasses.replace(config, api_key=DEV_API_KEY)


def reload_keys(app: web.Application) -> None:
    """SIGHUP: read the keys file again (it is also re-read when it changes)."""
    from router.access import KEYRING
    from router.keys import KeysError

    try:
        app[KEYRING].reload()
        log.info("Keys reloaded path=%s", app[KEYRING].path)
    except KeysError as exc:
        log.error("Keys not reloaded, the previous ones stay: %s", exc)


def reserve_port(config: ClusterConfig) -> list[socket.socket]:
    """Bind the HTTP port before Ray starts, without listening yet. Ray's processes take free ports as
    they come up, and one took the port a client had been told to poll (it then read Ray's gRPC as a
    broken HTTP status line); a port someone else holds is refused now, not after the Ray start.
    Bound but not listening, the port refuses connections until `serve` is ready. One socket per
    address the host resolves to (`localhost`: both loopbacks), as aiohttp's TCPSite binds."""
    try:
        found = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"host: cannot resolve {config.host}: {exc.strerror}") from None
    socks: list[socket.socket] = []
    for family, kind, proto, _, address in dict.fromkeys(found):
        sock = socket.socket(family, kind, proto)
        socks.append(sock)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        except OSError as exc:
            for s in socks:
                s.close()
            raise ConfigError(f"port: cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    return socks


async def serve(config: ClusterConfig, cluster, socks: list[socket.socket] | None = None) -> None:
    """Serve the app until SIGTERM, on `socks` (from `reserve_port`) or on sockets bound now."""
    from router.app import create_app

    app = create_app(config, cluster)

    async def close_cluster(_app: web.Application) -> None:
        await cluster.close()

    app.on_cleanup.append(close_cluster)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=tuning.SHUTDOWN_GRACE_S, access_log=None)
    await runner.setup()
    try:
        for sock in socks or reserve_port(config):
            await web.SockSite(runner, sock).start()
    except (OSError, ConfigError) as exc:
        await runner.cleanup()
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"port: cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    host, port = runner.addresses[0][:2]
    log.info("Router ready routes=%d max_body_bytes=%d", len(app.router.routes()), config.max_body_bytes)
    log.info("Memory Engine live address=%s:%s", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_keys, app)
    await stop.wait()
    log.info("Shutting down: draining requests, flushing shards, stopping Ray")
    started = time.monotonic()
    await runner.cleanup()
    log.info("HTTP server stopped seconds=%.1f", time.monotonic() - started)


def claim_data_dir(config: ClusterConfig) -> None:
    """Make the data directory private and hold it for this process (before any start-up work)."""
    try:
        datadir.make_private(config.data_dir)
    except OSError as exc:
        raise ConfigError(f"data_dir: cannot create {config.data_dir}: {exc.strerror}") from None
    datadir.lock(config.data_dir, config.host, config.port)
    tightened = datadir.tighten(config.data_dir)
    if tightened:
        log.info("Data directory made private (0700 folders, 0600 files) changed=%d", tightened)
    datadir.check_identity(config.data_dir, datadir.identity(
        config.shards, config.embedding.model, configured_dimension(config.embedding.model, config.data_dir)))


def check_embedder(config: ClusterConfig) -> None:
    """Refuse to start, with the fix, when the nodes could not embed (no torch and no ONNX export
    here), before Ray starts and the failure turns into a node actor's traceback."""
    from node.embedder import check_embedder as check

    # With replicas each node has a folder of its own, models/ included (router.cluster.serve_node_config).
    dirs = [config.data_dir] if config.replication == 1 else \
        [os.path.join(config.data_dir, "nodes", name) for name in config.node_names]
    for data_dir in dirs:
        check(config.embedding.model, normalized_backend(config), data_dir)
