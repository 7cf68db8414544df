"""Hostile input through the in-process API (real cluster): every input gets a 4xx with the error
body, never a 500. Some requests go over a raw socket, since HTTP clients refuse to send them."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import uuid

import pytest

from conftest import API_KEY

AUTH = {"x-api-key": API_KEY}


def uid() -> str:
    return f"hostile-{uuid.uuid4().hex[:12]}"


def assert_error(status: int, body, expected_status: int, code: str | None = None) -> None:
    assert status == expected_status, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert isinstance(body["error"].get("code"), str) and isinstance(body["error"].get("message"), str), body
    if code is not None:
        assert body["error"]["code"] == code, body


async def send_raw(api, data: bytes) -> tuple[int, dict | None]:
    """Send raw bytes as one HTTP/1.1 request; return (status, JSON body or None)."""
    reader, writer = await asyncio.open_connection(api.server.host, api.server.port)
    try:
        writer.write(data)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        body = await reader.readexactly(length) if length else b""
    finally:
        writer.close()
    return status, (json.loads(body) if body.startswith(b"{") else None)


def raw_request(method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    lines = [f"{method} ".encode() + target + b" HTTP/1.1", b"Host: localhost", b"Connection: close"]
    lines += [k + b": " + v for k, v in headers]
    if body or method == "POST":
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def post_bytes(api, path: str, body: bytes, headers: dict | None = None):
    resp = await api.post(path, data=body, headers={**AUTH, "Content-Type": "application/json", **(headers or {})})
    return resp.status, await resp.json()


# ---- JSON bodies ------------------------------------------------------------------------------

async def test_integer_of_5000_digits_is_a_400_not_a_500(api):
    body = b'{"textual_query": "x", "limit": 1' + b"0" * 5000 + b"}"
    status, payload = await post_bytes(api, "/query/semantic", body)
    assert_error(status, payload, 400, "bad_request")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
async def test_nan_and_infinity_literals_are_malformed_json(api, literal):
    body = b'{"textual_query": "x", "limit": ' + literal + b"}"
    status, payload = await post_bytes(api, "/query/semantic", body)
    assert_error(status, payload, 400, "bad_request")


async def test_metric_of_400_digits_is_a_422_naming_the_field(api):
    body = {"entity_id": uid(), "textual_content": "weight today", "metrics": {"weight": 10 ** 400}}
    status, payload = await post_bytes(api, "/ingest", json.dumps(body).encode())
    assert_error(status, payload, 422, "validation_error")
    assert "metrics" in payload["error"]["message"], payload


@pytest.mark.parametrize("value", [b"1e400", b"-1e400", str(2 ** 70).encode(), str(-(2 ** 70)).encode()])
async def test_out_of_range_metrics_are_422_or_stored(api, value):
    """Floats that overflow to infinity are refused; big integers are stored as floats or refused."""
    body = b'{"entity_id": "' + uid().encode() + b'", "textual_content": "weight", "metrics": {"w": ' + value + b"}}"
    status, payload = await post_bytes(api, "/ingest", body)
    if status != 201:
        assert_error(status, payload, 422, "validation_error")
        assert "metrics" in payload["error"]["message"], payload


async def test_deeply_nested_json_is_a_400(api):
    body = b'{"items": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, payload = await post_bytes(api, "/ingest/batch", body)
    assert_error(status, payload, 400, "bad_request")


@pytest.mark.parametrize("path", ["/ingest", "/ingest/batch", "/query/semantic", "/graph/query", "/graph/walk",
                                  "/graph/export", "/analytics/query", "/entity/export", "/entity/erase",
                                  "/memory/inspect", "/memory/delete"])
@pytest.mark.parametrize("body", [b"", b"null", b"[]", b'"x"', b"{", b"\xff\xfe", b'{"a": "\\ud800"}'])
async def test_every_post_route_refuses_bad_bodies_with_4xx(api, path, body):
    status, payload = await post_bytes(api, path, body)
    assert status in (400, 422), (path, body, status, payload)
    assert_error(status, payload, status)


@pytest.mark.parametrize("path", ["/ingest", "/query/semantic", "/graph/walk", "/analytics/query", "/memory/inspect"])
async def test_wrong_types_in_every_field_are_422(api, path):
    for field in ("entity_id", "textual_content", "textual_query", "limit", "node", "depth", "label", "memory_id",
                  "relations", "metrics", "timestamp", "bucket", "turn_window_radius", "edge_types"):
        for value in ({}, [[]], 1.5, True, -1, 10 ** 30, "\u0000", "x" * 600):
            body = {"entity_id": "e", "textual_content": "t", "textual_query": "q", "node": "n", "label": "l",
                    "memory_id": "m", field: value}
            status, payload = await post_bytes(api, path, json.dumps(body).encode())
            assert status < 500, (path, field, value, status, payload)


# ---- encodings and content types ----------------------------------------------------------------

async def test_gzip_header_on_a_plain_body_is_a_400(api):
    status, payload = await post_bytes(api, "/query/semantic", b'{"textual_query": "x"}',
                                       {"Content-Encoding": "gzip"})
    assert_error(status, payload, 400, "bad_request")


async def test_gzip_body_is_accepted(api):
    status, payload = await post_bytes(api, "/query/semantic", gzip.compress(b'{"textual_query": "x", "limit": 1}'),
                                       {"Content-Encoding": "gzip"})
    assert status == 200, payload


@pytest.mark.parametrize("encoding", ["compress", "x-unknown", "gzip, identity, zork"])
async def test_unknown_content_encoding_is_a_415(api, encoding):
    status, payload = await post_bytes(api, "/query/semantic", b'{"textual_query": "x"}',
                                       {"Content-Encoding": encoding})
    assert_error(status, payload, 415, "unsupported_media_type")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "image/png", ""])
async def test_any_content_type_is_read_as_json(api, content_type):
    """SDKs and curl users send varied (or no) content types; the body is parsed as JSON regardless."""
    status, payload = await post_bytes(api, "/query/semantic", b'{"textual_query": "x", "limit": 1}',
                                       {"Content-Type": content_type})
    assert status == 200, payload


# ---- headers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("header", [b"x-api-key: \xff\xfe" + API_KEY.encode(), b"Authorization: Bearer \xc3\x28",
                                    b"Authorization: \xff", b"x-api-key: \xed\xa0\x80"])
async def test_non_utf8_key_headers_are_401_without_traceback(api, header, caplog):
    name, value = header.split(b": ", 1)
    with caplog.at_level(logging.ERROR):
        status, payload = await send_raw(api, raw_request("GET", b"/stats", [(name, value)]))
    assert_error(status, payload, 401, "unauthorized")
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


async def test_huge_header_is_refused_with_4xx(api):
    status, _ = await send_raw(api, raw_request("GET", b"/stats", [(b"x-api-key", b"k" * 200_000)]))
    assert 400 <= status < 500, status


# ---- query strings ----------------------------------------------------------------------------

@pytest.mark.parametrize("query", [
    b"textual_query=%ED%A0%80", b"textual_query=%ff%fe", b"entity_id=%ED%A0%80&textual_query=x",
    b"textual_query=%", b"textual_query=%zz", b"limit=1" + b"0" * 5000, b"limit=NaN", b"limit=1e3",
    b"window_start_ms=-1", b"window_end_ms=99999999999999999999999", b"limit=1&limit=2",
    b"entity_id=%00", b"textual_query=%00",
])
async def test_temporal_query_string_is_never_a_500(api, query):
    status, payload = await send_raw(api, raw_request("GET", b"/temporal/query?" + query, [(b"x-api-key",
                                                                                           API_KEY.encode())]))
    assert status in (200, 400, 422), (query, status, payload)
    if status != 200:
        assert_error(status, payload, status)


@pytest.mark.parametrize("query", [b"entity_id=%ED%A0%80", b"entity_id=%ff", b"recent=1" + b"0" * 5000,
                                   b"recent=x", b"entity_id=a&entity_id=b", b"entity_id=%", b"entity_id=%00"])
async def test_profile_query_string_is_never_a_500(api, query):
    status, payload = await send_raw(api, raw_request("GET", b"/profile?" + query, [(b"x-api-key",
                                                                                    API_KEY.encode())]))
    assert status in (400, 404, 422), (query, status, payload)
    assert_error(status, payload, status)


@pytest.mark.parametrize("path", [b"/temporal/query", b"/profile"])
async def test_repeated_query_parameter_is_a_422(api, path):
    status, payload = await send_raw(api, raw_request("GET", path + b"?entity_id=a&entity_id=b",
                                                      [(b"x-api-key", API_KEY.encode())]))
    assert_error(status, payload, 422, "validation_error")
    assert "repeated" in payload["error"]["message"]


async def test_raw_non_ascii_request_target_is_a_400_from_the_parser(api):
    """aiohttp's HTTP parser refuses it before the app runs (plain-text body, not ours)."""
    status, _ = await send_raw(api, raw_request("GET", b"/temporal/query?textual_query=\xed\xa0\x80",
                                                [(b"x-api-key", API_KEY.encode())]))
    assert status == 400


# ---- methods and paths ------------------------------------------------------------------------

@pytest.mark.parametrize("method,path", [("GET", "/ingest"), ("PUT", "/query/semantic"), ("DELETE", "/stats"),
                                         ("POST", "/health"), ("PATCH", "/profile"), ("POST", "/temporal/query")])
async def test_wrong_method_is_405_with_error_body(api, method, path):
    resp = await api.request(method, path, headers=AUTH)
    assert_error(resp.status, await resp.json(), 405, "method_not_allowed")
    assert method not in resp.headers["Allow"] and resp.headers["Allow"], resp.headers


async def test_unknown_path_is_404_with_error_body(api):
    resp = await api.get("/no/such/route", headers=AUTH)
    assert_error(resp.status, await resp.json(), 404, "not_found")


# ---- answers are strict JSON ------------------------------------------------------------------

def strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"{name} is not JSON: {text[:300]}")
    return json.loads(text, parse_constant=refuse)


async def test_analytics_that_overflow_a_double_answer_null_not_infinity(api):
    entity = uid()
    for _ in range(2):
        status, payload = await post_bytes(api, "/ingest", json.dumps(
            {"entity_id": entity, "textual_content": "huge", "metrics": {"x": 1.7e308}}).encode())
        assert status == 201, payload
    for bucket in (None, "day"):
        resp = await api.post("/analytics/query", json={"entity_id": entity, "label": "x", "bucket": bucket},
                              headers=AUTH)
        assert resp.status == 200
        body = strict_json(await resp.text())
        assert body["count"] == 2 and body["max"] == 1.7e308
        assert body["sum"] is None and body["avg"] is None and body["stddev"] is None, body
