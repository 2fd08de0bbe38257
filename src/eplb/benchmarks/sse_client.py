"""A lean HTTP/1.1 client for one streamed (server-sent events) POST, on asyncio streams.

A load generator must read chunks faster than the server writes them. httpx streaming (httpcore,
h11 and anyio layers) cost the load generator ~340 us of CPU per chunk, so one client process
could not read much more than 3,000 tokens/s, below what one GPU serves; this reader costs about
a quarter of that, start-up included (bench/results/front.json). Plain ``http://`` only (a benchmark talks to a
server near it); keep-alive connections from a ``ConnectionPool``, or one connection per request.
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


class _Body:
    """A response body's chunks; ``complete`` once its framing says it ended (the connection
    can then carry another request)."""

    def __init__(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
        self.reader, self.headers = reader, headers
        self.complete = False

    async def chunks(self) -> AsyncIterator[bytes]:
        reader, headers = self.reader, self.headers
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readline()).split(b";", 1)[0], 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass  # trailer fields, up to the blank line that ends the message
                    self.complete = True
                    return
                data = await reader.readexactly(size + 2)  # the chunk and its CRLF
                yield data[:-2]
        elif "content-length" in headers:
            yield await reader.readexactly(int(headers["content-length"]))
            self.complete = True
        else:
            while data := await reader.read(65536):
                yield data


class ConnectionPool:
    """Keep-alive connections, as a load generator built on aiohttp (vLLM's) keeps them: a
    request takes an idle connection to its server or opens one; a response read to its end, on
    a connection the server keeps open, gives it back; anything else closes it."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}

    async def acquire(self, host: str, port: int, *, fresh: bool = False
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """(reader, writer, reused): an idle connection unless ``fresh`` or none is left."""
        idle = self._idle.get((host, port), [])
        while idle and not fresh:
            reader, writer = idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        reader, writer = await asyncio.open_connection(host, port)
        return reader, writer, False

    def release(self, host: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._idle.setdefault((host, port), []).append((reader, writer))

    def close(self) -> None:
        for conns in self._idle.values():
            for _, writer in conns:
                writer.close()
        self._idle.clear()


async def stream_events(url: str, body: bytes, headers: dict[str, str],
                        pool: ConnectionPool | None = None) -> AsyncIterator[bytes]:
    """POST ``body`` (JSON) to ``url``; yields the payload of every ``data:`` line of the
    event stream as it arrives. HTTPStatusError for a status other than 200. Without ``pool``,
    one connection, closed after the response; with it, keep-alive connections (a reused one
    that the server closed meanwhile is retried once on a new connection)."""
    host, port, path = split_url(url)
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Accept: text/event-stream"]
    if pool is None:
        head.append("Connection: close")
    head += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    for retry in (False, True):
        if pool is None:
            reader, writer = await asyncio.open_connection(host, port)
            reused = False
        else:
            reader, writer, reused = await pool.acquire(host, port, fresh=retry)
        try:
            writer.write(request)
            status, resp_headers = await _read_headers(reader)
            break
        except (ConnectionError, asyncio.IncompleteReadError):
            writer.close()
            if not reused:
                raise
    resp = _Body(reader, resp_headers)
    try:
        if status != 200:
            text = b"".join([c async for c in resp.chunks()])
            raise HTTPStatusError(status, text.decode(errors="replace"))
        pending = b""
        async for chunk in resp.chunks():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.startswith(b"data:"):
                    yield line[5:].strip()
        if pending.startswith(b"data:"):
            yield pending[5:].strip()
    finally:
        if pool is not None and resp.complete and resp_headers.get("connection", "").lower() != "close":
            pool.release(host, port, reader, writer)
        else:
            writer.close()
