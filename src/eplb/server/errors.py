"""The OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``.

Every rejection is an ``APIError`` (HTTP 400 unless said otherwise) whose ``param`` names the field.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code if code is not None else str(status)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, param=self.param, type=self.type, code=self.code)


def error_body(message: str, *, param: str | None = None, type: str = "invalid_request_error",
               code: str | None = "400") -> dict[str, Any]:
    # a message may quote client text: keep it encodable (a lone surrogate would break the reply)
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def unavailable(message: str) -> APIError:
    return APIError(message, status=503, type="service_unavailable")


def param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """Pydantic error location -> OpenAI ``param`` (``("body", "messages", 0, "role")`` ->
    ``messages.0.role``); None for a body that is not JSON at all."""
    parts = [str(x) for x in loc if x != "body"]
    # union members and validators show up in the location (e.g. "list[int]",
    # "function-after[...]"); drop them
    parts = [p for p in parts if not ("[" in p or p in {"str", "int", "float", "bool"})]
    return ".".join(parts) or None
