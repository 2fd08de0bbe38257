"""The ASGI layer in front of every route: body-size limit, API key, request metrics, and a JSON
500 for anything unexpected (never a plain-text traceback page).

The body is read here, up to the limit, before any route sees it: a declared ``Content-Length``
over the limit answers 413 before a byte of the body is read, and a chunked body answers 413 as
soon as it passes the limit, so a huge body costs neither time nor memory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from eplb.server.errors import error_body
from eplb.server.metrics import ServerMetrics

logger = logging.getLogger("eplb.server")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# metric label of a request: its route, or "other" (so clients cannot grow /metrics)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models")


def endpoint_label(path: str) -> str:
    return path if path in ENDPOINTS else "other"


def check_authorization(values: list[str], api_key: str) -> str | None:
    """None if ``values`` (every Authorization header) holds exactly ``Bearer <api_key>`` (the
    scheme in any case, RFC 9110); else why not. Compared in constant time."""
    if len(values) != 1:
        return ("missing API key (send 'Authorization: Bearer KEY')" if not values
                else "send exactly one Authorization header")
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        return "invalid API key (send 'Authorization: Bearer KEY')"
    # equal-length digests: the comparison time says nothing about the key
    given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
    if not hmac.compare_digest(given, hashlib.sha256(api_key.encode()).digest()):
        return "invalid API key (send 'Authorization: Bearer KEY')"
    return None


class FrontDoor:
    def __init__(self, app: Any, *, metrics: ServerMetrics, max_body_bytes: int,
                 api_key: str | None) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        status = [0]

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_counted, path)
        except Exception:
            logger.exception("unexpected error in %s %s", scope.get("method"), path)
            if status[0] == 0:  # nothing sent yet: the client still gets the OpenAI shape
                await _json(send_counted, 500, error_body("internal server error",
                                                          type="server_error", code="500"))
        finally:
            if path.startswith("/v1/"):
                # no answer at all: the client went away while sending its body
                self.metrics.requests.labels(endpoint_label(path), str(status[0] or 499)).inc()

    async def _handle(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        headers = [(k.lower(), v) for k, v in scope.get("headers", [])]
        if path.startswith("/v1/") and self.api_key is not None:
            values = [v.decode("latin-1") for k, v in headers if k == b"authorization"]
            why = check_authorization(values, self.api_key)
            if why is not None:
                await _json(send, 401, error_body(why, code="invalid_api_key"))
                return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = [v for k, v in headers if k == b"content-length"]
        try:
            too_big = any(int(v) > limit for v in declared)
        except ValueError:
            too_big = False  # the server rejects a malformed Content-Length before we run
        if too_big:
            await _too_large(send, limit)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await _too_large(send, limit)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:  # the body once, then the real channel (disconnects)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    # Connection: close, so the server need not read (and discard) the rest of the body
    await _json(send, 413, error_body(
        f"request body is larger than {limit} bytes (--max-request-bytes)", code="413"),
        close=True)


async def _json(send: Send, status: int, body: dict[str, Any], close: bool = False) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
