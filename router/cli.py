"""The `tellodb` command: `serve` (and `temporal_memory`) starts the engine (Ray, node actors,
router) in one tree; `head`, `node` and `router` are the roles of a multi-machine cluster
(router.roles), `cluster` changes one (router.cluster_cli); `backup`, `restore` and `keys`.

Shutdown on SIGTERM or SIGINT: stop accepting, let in-flight requests finish, have every node
checkpoint its shards, stop the Ray processes this engine started, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from node.config import DEV_API_KEY, ClusterConfig, ConfigError, configured_dimension, load_config, normalized_backend
from router import __version__, cluster_cli, datadir, ray_local, roles

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


async def serve(config: ClusterConfig, cluster) -> None:
    from router.app import create_app

    app = create_app(config, cluster)

    async def close_cluster(_app: web.Application) -> None:
        await cluster.close()

    app.on_cleanup.append(close_cluster)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=20, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
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


def run_export_model(args: argparse.Namespace) -> int:
    """`tellodb export-model`: the ONNX export into <data_dir>/models/, made where torch is
    installed, so an install without it (an image's runtime stage, a Kubernetes pod) only copies it."""
    setup_logging()
    from node.config import resolve_model_path
    from node.onnx_embedder import export_onnx

    env = dict(os.environ)
    env.update({k: v for k, v in (("TEMPORAL_MEMORY_DATA_DIR", args.data_dir),
                                  ("TEMPORAL_MEMORY_EMBEDDING_MODEL", args.model)) if v})  # validated as in serve
    try:
        config = load_config(args.config, env)
        model, data_dir = config.embedding.model, config.data_dir
        path = export_onnx(resolve_model_path(model, data_dir), data_dir, args.backend, model)
    except ConfigError as exc:
        print(f"tellodb export-model: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def run_server(config_path: str | None, overrides: dict) -> int:
    setup_logging()
    started = time.monotonic()
    log.info("Initializing Temporal Multi-Model Memory Engine (tellodb-cluster %s)...", __version__)
    try:
        env = dict(os.environ)
        env.update({k: str(v) for k, v in overrides.items() if v is not None})
        config = resolve_api_key(load_config(config_path, env))
    except ConfigError as exc:
        log.error("Invalid configuration: %s", exc)
        return 2
    try:
        claim_data_dir(config)
        check_embedder(config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except datadir.DataDirBusy as exc:
        log.error("%s", exc)
        return 3
    except datadir.DataDirMismatch as exc:
        log.error("%s", exc)
        return 4
    log.info("Runtime data root path=%s", os.path.abspath(config.data_dir))
    if not config.ray_address:
        ray_local.prepare(config.data_dir)  # before Ray is imported: it reads some settings then
    elif os.environ.get("RAY_AUTH_MODE") != "token":
        log.warning("Joining Ray at %s without RAY_AUTH_MODE=token: anyone who reaches its ports can run code "
                    "(README: Network and Ray security)", config.ray_address)
    from router.cluster import Cluster  # imports Ray: only once the data directory is ours

    cluster = Cluster(config)
    code = 0
    try:
        cluster.start()
        log.info("Cluster ready seconds=%.1f", time.monotonic() - started)
        asyncio.run(serve(config, cluster))
    except ConfigError as exc:
        log.error("%s", exc)
        code = 2
    except KeyboardInterrupt:
        pass
    finally:
        cluster.shutdown()
    log.info("Stopped code=%d", code)
    return code


def run_keys_command(args: argparse.Namespace) -> int:
    from router import keys
    from router.audit import Audit

    try:
        config = load_config(args.config)
        path = args.file or config.keys_file
        if not path:
            raise keys.KeysError("no keys file: set keys_file in cluster.yaml (or TELLODB_KEYS_FILE), or pass --file")
        if args.keys_command == "list":
            for key, _ in keys.read_file(path).values():
                rate = f" rate={key.rate:g}/s burst={key.burst or '-'}" if key.rate else ""
                print(f"{key.name}\t{key.role}\t{','.join(key.prefixes) or '*'}{rate}")
            return 0
        if args.keys_command == "add":
            secret = keys.add(path, keys.Key(args.name, args.role, tuple(args.prefix), args.rate, args.burst))
            print(secret)  # the only time the key is shown
            print(f"key {args.name!r} added to {path}; store it now, it is not kept", file=sys.stderr)
        else:
            keys.revoke(path, args.name)
            print(f"key {args.name!r} revoked", file=sys.stderr)
    except (keys.KeysError, ConfigError) as exc:
        print(f"tellodb keys: {exc}", file=sys.stderr)
        return 1
    if os.path.isdir(config.data_dir):  # key changes go to the engine's audit trail too
        trail = Audit(config.audit_file or os.path.join(config.data_dir, "audit.log"))
        trail.record("cli", f"key_{args.keys_command}", "ok", key_name=args.name)
        trail.close()
    return 0


def run_backup_command(args: argparse.Namespace) -> int:
    from router import backup

    try:
        if args.command == "backup":
            if not args.key:
                raise backup.BackupError("an API key is needed: --key KEY or TELLODB_API_KEY")
            manifest = backup.backup(args.dest, args.url, args.key, args.force)
            done = f"backed up {manifest['shards']} shards to {args.dest}"
        else:
            manifest = backup.restore(args.src, args.data_dir, args.force)
            done = (f"restored {manifest['shards']} shards into {args.data_dir}; start it with "
                    f"tellodb serve --data-dir {args.data_dir}")
    except backup.BackupError as exc:
        print(f"tellodb {args.command}: {exc}", file=sys.stderr)
        return 1
    print(done, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tellodb", description="tellodb-cluster memory engine")
    parser.add_argument("--version", action="version", version=f"tellodb-cluster {__version__}")
    sub = parser.add_subparsers(dest="command")
    s = sub.add_parser("serve", help="start the engine (Ray, node actors and the HTTP router)")
    s.add_argument("--config", help="cluster.yaml to read (default: $TELLODB_CONFIG, else built-in defaults)")
    s.add_argument("--host", help="bind address (overrides TEMPORAL_MEMORY_HOST)")
    s.add_argument("--port", type=int, help="listen port (overrides PORT)")
    s.add_argument("--data-dir", help="data directory (overrides TEMPORAL_MEMORY_DATA_DIR)")
    b = sub.add_parser("backup", help="back up every shard of a running engine into a folder (online)")
    b.add_argument("dest", help="folder to write (new or empty)")
    b.add_argument("--url", default="http://127.0.0.1:3000", help="the engine (default: %(default)s)")
    b.add_argument("--key", default=os.environ.get("TELLODB_API_KEY"), help="API key (default: $TELLODB_API_KEY)")
    b.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    r = sub.add_parser("restore", help="verify a backup and lay it out as a data directory")
    r.add_argument("src", help="the backup folder")
    r.add_argument("--data-dir", required=True, help="data directory to create (new or empty)")
    r.add_argument("--force", action="store_true", help="replace the shards of a data directory that is not empty")
    k = sub.add_parser("keys", help="manage scoped API keys (the keys file)")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    ka = ksub.add_parser("add", help="create a key; prints it once, stores only its hash")
    ka.add_argument("name")
    ka.add_argument("--role", choices=("read", "write", "admin"), required=True)
    ka.add_argument("--prefix", action="append", default=[], help="entity-id prefix it may touch (repeatable; "
                    "none: every entity)")
    ka.add_argument("--rate", type=float, help="requests per second (default: rate_limit)")
    ka.add_argument("--burst", type=int, help="requests at once (default: rate_burst)")
    ksub.add_parser("list", help="names, roles and prefixes (never keys)")
    kr = ksub.add_parser("revoke", help="remove a key; a running engine refuses it within a second")
    kr.add_argument("name")
    for p in (k,):
        p.add_argument("--config", help="cluster.yaml naming keys_file (default: $TELLODB_CONFIG)")
        p.add_argument("--file", help="the keys file itself (overrides keys_file)")
    e = sub.add_parser("export-model", help="export the embedding model to ONNX into <data_dir>/models/ "
                       "(needs the torch extra; the engine then runs without it)")
    e.add_argument("--config", help="cluster.yaml to read (default: $TELLODB_CONFIG)")
    e.add_argument("--data-dir", help="data directory (default: the configuration's data_dir)")
    e.add_argument("--backend", choices=("onnx", "onnx-int8"), default="onnx",
                   help="onnx (fp32), or onnx-int8 (also the quantised file); default: %(default)s")
    e.add_argument("--model", help="embedding model (default: the configuration's embedding.model)")
    roles.add_parsers(sub)
    cluster_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command in ("head", "node", "router"):
        return roles.run_role(args)
    if args.command == "cluster":
        return cluster_cli.run(args)
    if args.command == "keys":
        return run_keys_command(args)
    if args.command == "export-model":
        return run_export_model(args)
    if args.command in ("backup", "restore"):
        return run_backup_command(args)
    if args.command != "serve":
        parser.print_help()
        return 2
    return run_server(args.config, {"TEMPORAL_MEMORY_HOST": args.host, "PORT": args.port,
                                    "TEMPORAL_MEMORY_DATA_DIR": args.data_dir})


def temporal_memory() -> int:
    """The name the official SDK's `from_local()` looks for on PATH; always serves."""
    return main(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
