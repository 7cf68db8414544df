"""The marks of loadtest/hops.py, inside the engine: loaded by the `sitecustomize` that hops.py puts
on the engine's PYTHONPATH (when TELLODB_HOPS_DIR is set), in the router and in every node actor.

`install_marks()` patches each module of PATCHES as it is imported: the function a hop begins and
ends in gets a wrapper that appends `name.b` / `name.e` with time.perf_counter(), and each process
writes its marks to `<TELLODB_HOPS_DIR>/<pid>.marks` (once per answered request, once per node call).
"""

from __future__ import annotations

import os
import sys
import time

_marks: list[tuple[str, float]] = []
_fd: list[int] = []  # [fd, pid] of this process's marks file


def _flush() -> None:
    if not _marks:
        return
    if not _fd or _fd[1] != os.getpid():
        path = os.path.join(os.environ["TELLODB_HOPS_DIR"], f"{os.getpid()}.marks")
        _fd[:] = [os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), os.getpid()]
    lines, _marks[:] = _marks[:], []
    os.write(_fd[0], "".join(f"{n} {t:.7f}\n" for n, t in lines).encode())


def _wrap(owner, attr: str, name: str, flush: bool = False, only=None) -> None:
    """Mark `name.b` when owner.attr starts and `name.e` when it ends (sync or async)."""
    import functools
    import inspect

    fn = getattr(owner, attr, None)
    if fn is None:
        return
    clock, append = time.perf_counter, _marks.append
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapped(*args, **kwargs):
            if only is not None and not only(args):
                return await fn(*args, **kwargs)
            append((name + ".b", clock()))
            try:
                return await fn(*args, **kwargs)
            finally:
                append((name + ".e", clock()))
                if flush:
                    _flush()
    else:
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if only is not None and not only(args):
                return fn(*args, **kwargs)
            append((name + ".b", clock()))
            try:
                return fn(*args, **kwargs)
            finally:
                append((name + ".e", clock()))
                if flush:
                    _flush()
    if hasattr(fn, "__middleware_version__"):
        wrapped.__middleware_version__ = fn.__middleware_version__
    setattr(owner, attr, wrapped)


def _mark_access(module) -> None:
    make = module.make_middleware

    def make_middleware(*args, **kwargs):
        middleware = make(*args, **kwargs)
        holder = type("Holder", (), {"m": staticmethod(middleware)})
        _wrap(holder, "m", "r.access")
        return holder.m

    module.make_middleware = make_middleware


PATCHES = {  # module -> what to mark in it, right after it is imported
    "aiohttp.web_protocol": lambda m: _wrap(m.RequestHandler, "data_received", "r.http"),
    "aiohttp.web_response": lambda m: _wrap(m.Response, "write_eof", "r.write", flush=True),
    "router.app": lambda m: _wrap(m, "metrics_middleware", "r.mw"),
    "router.access": _mark_access,
    "router.http": lambda m: _wrap(m, "read_json", "r.read_json"),
    "router.schemas": lambda m: _wrap(m, "parse", "r.parse"),
    "router.handlers": lambda m: _wrap(m, "query", "r.handler"),
    "router.cluster": lambda m: _wrap(m.Cluster, "query", "r.cluster"),
    "router.node_client": lambda m: _wrap(m.NodeClient, "_call", "r.call"),
    "ray.actor": lambda m: _wrap(m.ActorMethod, "_remote", "r.submit",
                                 only=lambda a: getattr(a[0], "_method_name", None) == "many"),
    "node.service": lambda m: (_wrap(m.Node, "many", "n.many", flush=True), _wrap(m.Node, "query", "n.query")),
    "node.embedder": lambda m: (_wrap(m.BatchingEmbedder, "embed", "n.embed"),
                                _wrap(m.BatchingEmbedder, "_timed_encode", "n.encode")),
    "node.store.search": lambda m: (_wrap(m.Search, "search", "n.search"),
                                    _wrap(m.Search, "dense", "n.dense"),
                                    _wrap(m.Search, "_bm25", "n.bm25"), _wrap(m.Search, "_slot_mates", "n.slots"),
                                    _wrap(m.Search, "scored", "n.score"), _wrap(m, "apply_validity", "n.validity")),
    "node.store.vector_index": lambda m: _wrap(m.VectorIndex, "candidates", "n.hnsw"),
}


def install_marks() -> None:
    """Mark the hops in this process: patch each module of PATCHES as it is imported."""
    import importlib.abc

    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname not in PATCHES:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                PATCHES[fullname](module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Hook())
