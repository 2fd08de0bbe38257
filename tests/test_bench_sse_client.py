"""The load generator's SSE reader against a raw asyncio server: chunked bodies cut anywhere,
plain bodies, error statuses, and what the request carries."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.benchmarks.sse_client import ConnectionPool, HTTPStatusError, split_url, stream_events


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


async def _keep_alive_server(responses: list[bytes], *, close_after: int | None = None):
    """Answers requests in order from ``responses``, several per connection; closes a
    connection after ``close_after`` answers on it (silently, as an idle timeout does)."""
    stats = {"connections": 0, "requests": 0}
    answers = iter(responses)

    async def handle(reader, writer):
        stats["connections"] += 1
        served = 0
        try:
            while close_after is None or served < close_after:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(x for x in head.decode().split("\r\n") if x.lower().startswith("content-length"))
                             .split(":")[1])
                await reader.readexactly(length)
                stats["requests"] += 1
                writer.write(next(answers))
                await writer.drain()
                served += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], stats


_OK = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


@settings(max_examples=20, deadline=None)
@given(bodies=st.lists(st.lists(st.integers(0, 99), min_size=1, max_size=4), min_size=2, max_size=5),
       cuts=st.lists(st.integers(1, 60), max_size=4), trailer=st.booleans())
def test_a_pool_reuses_one_connection_for_requests_in_turn(bodies, cuts, trailer):
    """Each response read to its end (chunk terminator and any trailer fields included) leaves
    the connection clean for the next request."""
    wires = []
    for ids in bodies:
        body = b"".join(b"data: %d\n\n" % i for i in ids)
        chunked = _chunked(body, cuts)
        if trailer:  # a trailer field before the blank line that ends the message
            chunked = chunked[:-2] + b"x-t: 1\r\n\r\n"
        wires.append(_OK + chunked)

    async def run():
        server, port, stats = await _keep_alive_server(wires)
        pool = ConnectionPool()
        async with server:
            got = []
            for _ in bodies:
                got.append([e async for e in stream_events(f"http://127.0.0.1:{port}/x", b"{}", {}, pool)])
        pool.close()
        return got, stats

    got, stats = asyncio.run(run())
    assert got == [[b"%d" % i for i in ids] for ids in bodies]
    assert stats == {"connections": 1, "requests": len(bodies)}


def test_a_pool_opens_anew_after_close_an_unfinished_read_or_a_stale_connection():
    done = _OK + _chunked(b"data: 1\n\n", [])

    async def run():
        pool = ConnectionPool()
        url = "http://127.0.0.1:{}/x"
        # the server says it closes: the next request needs a new connection
        closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 9\r\n\r\ndata: 1\n\n"
        server, port, stats = await _keep_alive_server([closing, closing], close_after=1)
        async with server:
            for _ in range(2):
                assert [e async for e in stream_events(url.format(port), b"{}", {}, pool)] == [b"1"]
        assert stats["connections"] == 2
        # a reader that stops early does not give back a connection with a body still on it
        server, port, stats = await _keep_alive_server([_OK + _chunked(b"data: 1\n\ndata: 2\n\n", [9]), done])
        async with server:
            events = stream_events(url.format(port), b"{}", {}, pool)
            assert await events.__anext__() == b"1"
            await events.aclose()
            assert [e async for e in stream_events(url.format(port), b"{}", {}, pool)] == [b"1"]
        assert stats == {"connections": 2, "requests": 2}
        # the server dropped an idle kept-alive connection: the request is retried on a new one
        server, port, stats = await _keep_alive_server([done, done], close_after=1)
        async with server:
            for _ in range(2):
                assert [e async for e in stream_events(url.format(port), b"{}", {}, pool)] == [b"1"]
                await asyncio.sleep(0.05)  # the server's close reaches the idle connection
        assert stats == {"connections": 2, "requests": 2}
        # the server closes a kept-alive connection just as the next request goes out on it (it
        # reads the request, answers nothing): retried once on a new connection
        conns = []

        async def handle(reader, writer):
            conns.append(writer)
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                    await reader.readexactly(2)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                if len(conns) == 1 and getattr(writer, "answered", False):
                    break  # connection 1, second request: dropped
                writer.answered = True
                writer.write(done)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            for _ in range(2):
                assert [e async for e in stream_events(url.format(port), b"{}", {}, pool)] == [b"1"]
        assert len(conns) == 2
        pool.close()

    asyncio.run(run())


def test_split_url_takes_http_only():
    assert split_url("http://h:81/v1/completions?x=1") == ("h", 81, "/v1/completions?x=1")
    assert split_url("http://h") == ("h", 80, "/")
    for bad in ("https://h/x", "h:80/x", "http:///x"):
        with pytest.raises(ValueError, match="http://"):
            split_url(bad)
