"""The `tellodb` command: `serve` (and `temporal_memory`) starts the engine (Ray, node actors,
router) in one tree; `head`, `node` and `router` are the roles of a multi-machine cluster
(router.roles), `cluster` changes one (router.cluster_cli); `backup`, `restore` and `keys`.

Shutdown on SIGTERM or SIGINT: stop accepting, let in-flight requests finish, have every node
checkpoint its shards, stop the Ray processes this engine started, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

from node.config import EMBEDDING_BACKENDS, ConfigError, load_config
from router import __version__, cluster_cli, datadir, ray_local, roles
from router.serving import check_embedder, claim_data_dir, reserve_port, resolve_api_key, serve, setup_logging

log = logging.getLogger("tellodb")


def run_export_model(args: argparse.Namespace) -> int:
    """`tellodb export-model`: the ONNX export into <data_dir>/models/, made where torch is
    installed, so an install without it (an image's runtime stage, a Kubernetes pod) only copies it."""
    setup_logging()
    from node.config import EmbeddingConfig, normalized_backend, resolve_model_path
    from node.onnx_embedder import export_onnx

    env = dict(os.environ)
    env.update({k: v for k, v in (("TEMPORAL_MEMORY_DATA_DIR", args.data_dir),
                                  ("TEMPORAL_MEMORY_EMBEDDING_MODEL", args.model)) if v})  # validated as in serve
    try:
        config = load_config(args.config, env)
        model, data_dir = config.embedding.model, config.data_dir
        configured = normalized_backend(config)
        backend = args.backend or (configured if configured != "torch" else EmbeddingConfig().backend)
        path = export_onnx(resolve_model_path(model, data_dir), data_dir, backend, model)
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
        socks = reserve_port(config)
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
    if config.ray_port_range:
        log.warning("ray_port_range is for `tellodb head`, `node` and `router`; serve keeps its Ray on loopback")
    if not config.ray_address:
        ray_local.prepare(config.data_dir)  # before Ray is imported: it reads some settings then
    elif os.environ.get("RAY_AUTH_MODE") != "token":
        log.warning("Joining Ray at %s without RAY_AUTH_MODE=token: anyone who reaches its ports can run code "
                    "(docs/ops/security.md)", config.ray_address)
    from router.cluster import Cluster  # imports Ray: only once the data directory is ours

    cluster = Cluster(config)
    code = 0
    try:
        cluster.start()
        log.info("Cluster ready seconds=%.1f", time.monotonic() - started)
        asyncio.run(serve(config, cluster, socks))
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
    """`tellodb keys`: the keys file is --file, else keys_file, else <data_dir>/keys.yaml (the file
    the engine reads by default); each change is also recorded in the data directory's audit file."""
    from router import keys
    from router.audit import Audit

    try:
        config = load_config(args.config)
        path = datadir.keys_path(args.file or config.keys_file, config.data_dir)
        if args.keys_command == "list":
            for key, _ in keys.read_file(path).values():
                rate = f" rate={key.rate:g}/s burst={key.burst or '-'}" if key.rate else ""
                print(f"{key.name}\t{key.role}\t{','.join(key.prefixes) or '*'}{rate}")
            return 0
        if args.keys_command == "add":
            datadir.make_private(os.path.dirname(os.path.abspath(path)))
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
        trail = Audit(datadir.audit_path(config.audit_file, config.data_dir))
        trail.record("cli", f"key_{args.keys_command}", "ok", key_name=args.name)
        trail.close()
    return 0


def run_backup_command(args: argparse.Namespace) -> int:
    from router import backup
    from router.client import ClientError

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
    except ClientError as exc:  # backup.BackupError too
        print(f"tellodb {args.command}: {exc}", file=sys.stderr)
        return 1
    print(done, file=sys.stderr)
    return 0


def run_command(args: argparse.Namespace, run) -> int:
    """A command's failures its own handler does not word (a folder it cannot write, Ctrl-C) as one
    line too: a user sees what went wrong, never a traceback."""
    try:
        return run(args)
    except OSError as exc:
        print(f"tellodb {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tellodb {args.command}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tellodb", description="tellodb-cluster memory engine",
        epilog="A command that fails (a wrong key, a URL that does not answer, a folder it cannot write) says why "
               "in one line on stderr and exits non-zero: 1 for the commands, 2 for a bad configuration.")
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
    k = sub.add_parser("keys", help="manage scoped API keys (the keys file)", description=(
        "Manage scoped API keys. The keys file is --file, else keys_file (cluster.yaml or TELLODB_KEYS_FILE), "
        "else <data_dir>/keys.yaml, which the engine reads by default: `tellodb keys add` works without "
        "configuration. Each change is recorded in the data directory's audit file."))
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
        p.add_argument("--config", help="cluster.yaml naming keys_file or data_dir (default: $TELLODB_CONFIG)")
        p.add_argument("--file", help="the keys file itself (default: keys_file, else <data_dir>/keys.yaml)")
    e = sub.add_parser("export-model", help="export the embedding model to ONNX into <data_dir>/models/ "
                       "(needs the torch extra; the engine then runs without it)")
    e.add_argument("--config", help="cluster.yaml to read (default: $TELLODB_CONFIG)")
    e.add_argument("--data-dir", help="data directory (default: the configuration's data_dir)")
    e.add_argument("--backend", choices=[b for b in EMBEDDING_BACKENDS if b != "torch"],
                   help="onnx (fp32), onnx-w8 or onnx-int8 (fp32 and the quantised file); "
                        "default: the configuration's embedding.backend (onnx-w8 unless set)")
    e.add_argument("--model", help="embedding model (default: the configuration's embedding.model)")
    roles.add_parsers(sub)
    cluster_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command in ("head", "node", "router"):
        return roles.run_role(args)
    commands = {"cluster": cluster_cli.run, "keys": run_keys_command, "export-model": run_export_model,
                "backup": run_backup_command, "restore": run_backup_command}
    if args.command in commands:
        return run_command(args, commands[args.command])
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
