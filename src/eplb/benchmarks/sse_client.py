"""A lean HTTP/1.1 client for one streamed (server-sent events) POST, on asyncio streams.

A load generator must read chunks faster than the server writes them. httpx streaming (httpcore,
h11 and anyio layers) cost the load generator ~340 us of CPU per chunk, so one client process
could not read much more than 3,000 tokens/s, below what one GPU serves; this reader costs about
a quarter of that, start-up included (bench/results/front.json). Plain ``http://`` only (a benchmark talks to a
server near it); one connection per request, closed after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class HTTPStatusError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


def split_url(url: str) -> tuple[str, int, str]:
    """(host, port, path) of an ``http://`` URL; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"need an http://host[:port]/path URL, got {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, parts.port or 80, path


async def _read_headers(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    fields = status_line.split(None, 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/"):
        raise ConnectionError(f"not an HTTP response: {status_line[:80]!r}")
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return int(fields[1]), headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


async def _body_chunks(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";", 1)[0], 16)
            if size == 0:
                return
            data = await reader.readexactly(size + 2)  # the chunk and its CRLF
            yield data[:-2]
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(65536):
            yield data


async def stream_events(url: str, body: bytes, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """POST ``body`` (JSON) to ``url``; yields the payload of every ``data:`` line of the
    event stream as it arrives. HTTPStatusError for a status other than 200."""
    host, port, path = split_url(url)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
                f"Content-Length: {len(body)}", "Accept: text/event-stream", "Connection: close"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        status, resp_headers = await _read_headers(reader)
        if status != 200:
            text = b"".join([c async for c in _body_chunks(reader, resp_headers)])
            raise HTTPStatusError(status, text.decode(errors="replace"))
        pending = b""
        async for chunk in _body_chunks(reader, resp_headers):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.startswith(b"data:"):
                    yield line[5:].strip()
        if pending.startswith(b"data:"):
            yield pending[5:].strip()
    finally:
        writer.close()
