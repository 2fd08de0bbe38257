"""The load generator's SSE reader against a raw asyncio server: chunked bodies cut anywhere,
plain bodies, error statuses, and what the request carries."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.benchmarks.sse_client import HTTPStatusError, split_url, stream_events


async def _serve_once(response: list[bytes], seen: dict):
    """A server that records one request and answers with ``response``, written piece by piece."""

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        seen["request_line"] = lines[0]
        seen["headers"] = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
        seen["body"] = await reader.readexactly(int(seen["headers"]["content-length"]))
        for piece in response:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _chunked(body: bytes, cuts: list[int]) -> bytes:
    out, start = b"", 0
    for end in sorted({c for c in cuts if 0 < c < len(body)}) + [len(body)]:
        part = body[start:end]
        out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
        start = end
    return out + b"0\r\n\r\n"


async def _collect(url, body=b"{}", headers=None):
    return [e async for e in stream_events(url, body, headers or {})]


@settings(max_examples=30, deadline=None)
@given(texts=st.lists(st.text(max_size=20), min_size=1, max_size=6),
       cuts=st.lists(st.integers(1, 400), max_size=8), wire_cuts=st.lists(st.integers(1, 500), max_size=6))
def test_events_survive_any_chunk_and_write_boundaries(texts, cuts, wire_cuts):
    events = [json.dumps({"choices": [{"text": t}]}).encode() for t in texts] + [b"[DONE]"]
    body = b"".join(b"data: " + e + b"\n\n" for e in events)
    wire = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + \
        _chunked(body, cuts)
    bounds = sorted({c for c in wire_cuts if c < len(wire)})
    pieces = [wire[a:b] for a, b in zip([0] + bounds, bounds + [len(wire)])]

    async def run():
        seen = {}
        server, port = await _serve_once(pieces, seen)
        async with server:
            got = await _collect(f"http://127.0.0.1:{port}/v1/completions", b'{"a":1}',
                                 {"Authorization": "Bearer k"})
        return got, seen

    got, seen = asyncio.run(run())
    assert got == events
    assert seen["request_line"] == "POST /v1/completions HTTP/1.1"
    assert seen["body"] == b'{"a":1}' and seen["headers"]["authorization"] == "Bearer k"


def test_non_200_raises_with_the_body_and_plain_bodies_are_read():
    async def run():
        err = b'{"error":{"message":"max_tokens must be >= 1"}}'
        server, port = await _serve_once(
            [b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\n\r\n" % len(err) + err], {})
        async with server:
            with pytest.raises(HTTPStatusError, match="HTTP 400: .*max_tokens") as info:
                await _collect(f"http://127.0.0.1:{port}/x")
        assert info.value.status == 400
        server, port = await _serve_once([b"HTTP/1.1 200 OK\r\n\r\ndata: 1\n\nda", b"ta: [DONE]\n"], {})
        async with server:  # no length, no chunking: read to the end of the connection
            assert await _collect(f"http://127.0.0.1:{port}/x") == [b"1", b"[DONE]"]

    asyncio.run(run())


def test_split_url_takes_http_only():
    assert split_url("http://h:81/v1/completions?x=1") == ("h", 81, "/v1/completions?x=1")
    assert split_url("http://h") == ("h", 80, "/")
    for bad in ("https://h/x", "h:80/x", "http:///x"):
        with pytest.raises(ValueError, match="http://"):
            split_url(bad)
