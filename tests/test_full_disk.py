"""A full disk: writes get 507 `insufficient_storage` and store nothing of a failed request, reads go
on, and writes work again by themselves once space returns. On a real (small tmpfs) file system."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from conftest import http_json


@pytest.fixture
def small_disk(tmp_path):
    """A 400 MiB tmpfs (the exported ONNX model takes about 90 MiB of it); needs root."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path) -> None:
    """Write zeros to `path` until the file system has no byte left."""
    chunk = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        for size in (1 << 16, 1 << 12, 1 << 8, 1):  # the last scraps
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass


def held(base: str, memory_id: str) -> bool:
    status, _ = http_json(base, "/memory/inspect", {"memory_id": memory_id})
    assert status in (200, 404)
    return status == 200


def test_a_full_disk_answers_507_keeps_reads_and_recovers(make_server, small_disk):
    from node.control.placement import Placement

    server = make_server(data_dir=small_disk / "data", TELLODB_MIN_FREE_MB="0", TELLODB_NODES="2").start()
    base = server.base_url
    placement = Placement(8, ("node-0", "node-1"))
    entities = [f"user-{i}" for i in range(40)]
    status, _ = http_json(base, "/ingest", {"entity_id": entities[0], "memory_id": "user-0::s::0",
                                        "textual_content": "written before the disk filled up"})
    assert status == 201

    filler = small_disk / "filler"
    fill(filler)
    # One node's share of a batch: it fails whole or lands whole, never in part.
    mine = [e for e in entities if placement.node_of(e) == "node-0"][:12]
    text = "a memory about the weather and the garden and the long walk home " * 40
    answers = []
    for attempt in range(5):  # WAL space already on disk may take a few writes first
        items = [{"entity_id": e, "memory_id": f"{e}::full::{attempt}", "textual_content": f"{text} {attempt}"}
                 for e in mine]
        status, body = http_json(base, "/ingest/batch", {"items": items})
        stored = [held(base, it["memory_id"]) for it in items]
        answers.append((status, body, stored))
        assert status in (201, 507), body
        assert stored == [status == 201] * len(items), (status, stored)
        if status == 507:
            assert body["error"]["code"] == "insufficient_storage", body
            break
    assert answers[-1][0] == 507, "the disk never filled up"

    # A batch over both nodes, with ids the engine makes: if any node's part fails, none of it stays.
    both = entities[12:36]
    for attempt in range(5):
        marker = f"crossing batch number {attempt}"
        status, body = http_json(base, "/ingest/batch", {"items": [{"entity_id": e, "textual_content": f"{text} {marker}"}
                                                                for e in both]})
        assert status in (201, 507), body
        if status == 507:
            break
    assert status == 507
    for e in both:
        status, hits = http_json(base, "/query/semantic", {"textual_query": marker, "entity_id": e, "limit": 50})
        assert status == 200 and not [h for h in hits if h["textual_content"].endswith(marker)], (e, hits)

    status, hits = http_json(base, "/query/semantic", {"textual_query": "before the disk filled", "entity_id": entities[0]})
    assert status == 200 and hits[0]["memory_id"] == "user-0::s::0"  # reads go on

    os.remove(filler)
    items = [{"entity_id": e, "memory_id": f"{e}::after::0", "textual_content": "space is back"} for e in entities[:12]]
    status, body = http_json(base, "/ingest/batch", {"items": items})
    assert status == 201, body  # no restart needed
    assert all(held(base, it["memory_id"]) for it in items)
