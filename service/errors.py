"""One error body for every failure: `{"error": {"code", "message", "details"}}`.

`APIError` is what handlers raise; `install_error_handlers` maps it, FastAPI's validation errors
(422), Starlette's HTTP errors (404, 405, 413, ...) and anything unexpected (500) onto that one
shape. A client never sees a stack trace or an exception's text: unexpected errors are logged
server-side with the request id, and the body carries only that id (`service.middleware`
turns an escaped exception into that 500).
This module holds no routes and no engine logic.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("sidrec.service")

_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
    415: "unsupported_media_type", 422: "invalid_request", 429: "queue_full",
    500: "internal_error", 503: "not_ready", 504: "timeout",
}


class APIError(Exception):
    """An error meant for the client: status, stable machine code, human message, details."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.headers = headers or {}


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def internal_error_body(request_id: str | None) -> dict[str, Any]:
    """The 500 body: no exception text, only the id under which the traceback was logged."""
    return error_body("internal_error", "internal server error; quote the request id when reporting it",
                      {"request_id": request_id})


def _clean_validation_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep loc/msg/type; drop `input` and `ctx` so a body is never echoed back at length."""
    out = []
    for e in errors[:50]:
        loc = [p for p in e.get("loc", ()) if p != "body"]
        out.append({"loc": loc, "msg": str(e.get("msg", ""))[:300], "type": e.get("type", "")})
    return out


def _summary(errors: list[dict[str, Any]]) -> str:
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _clean_validation_errors(list(exc.errors()))
        return error_response(422, "invalid_request", _summary(errors), errors)

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        if exc.status_code == 404:
            message = f"no route {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, None, getattr(exc, "headers", None))

    app.add_exception_handler(APIError, on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http)  # type: ignore[arg-type]
