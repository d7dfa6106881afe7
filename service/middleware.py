"""The one ASGI middleware of the service: request id, body-size limit, metrics, last-resort 500.

Pure ASGI (not BaseHTTPMiddleware) so streamed bodies pass through untouched and cheaply:
- A `Content-Length` above the limit is answered 413 before the app runs; a body streamed without
  one (chunked) is counted as it is read and cut off with 413 the moment it passes the limit.
- Every response carries `X-Request-ID` (the client's, if it sent a sane one).
- Requests are counted and timed per route template (never per raw path: bounded cardinality).
- An exception that escapes the app becomes the generic 500 body; its text goes to the log only.
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.exceptions import HTTPException

from sidrec.service.errors import error_body, internal_error_body
from sidrec.service.metrics import ServiceMetrics

log = logging.getLogger("sidrec.service")
_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class ServiceMiddleware:
    def __init__(self, app, max_body_bytes: int, metrics: ServiceMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = rid if _RID.match(rid) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        state = {"status": 500, "started": False}

        async def send_wrapped(message) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                await self._send_error(send_wrapped, 413, "payload_too_large",
                                       f"request body exceeds the limit of {self.max_body_bytes} bytes", rid)
            else:
                await self.app(scope, self._limited(receive), send_wrapped)
        except Exception:
            log.exception("unhandled error on %s %s (request id %s)", scope.get("method"), scope.get("path"), rid)
            if not state["started"]:
                await self._send_json(send_wrapped, 500, internal_error_body(rid))
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, scope.get("method", ""), str(state["status"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    def _limited(self, receive):
        seen = 0
        limit = self.max_body_bytes

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Raised inside FastAPI's body read, which re-raises HTTPException as is.
                    raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
            return message

        return receive_limited

    async def _send_error(self, send, status: int, code: str, message: str, rid: str) -> None:
        await self._send_json(send, status, error_body(code, message, {"request_id": rid}))

    @staticmethod
    async def _send_json(send, status: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})
