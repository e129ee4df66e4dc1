"""Per-request context as plain ASGI middleware (it sees streamed responses to their last byte):
an id for every request, its metrics, and a JSON 500 for anything unexpected, trace only in the log."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from server.errors import error_body
from server.metrics import Metrics

log = logging.getLogger("aimlqa.server")
_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _incoming_id(scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            rid = value.decode("latin-1")
            return rid if _ID.match(rid) else None
    return None


class RequestContext:
    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = _incoming_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status, started, t0 = 500, False, time.perf_counter()

        async def tagged_send(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, tagged_send)
        except Exception as exc:  # a bug, not a user error: the log gets the trace, the client one line
            log.error("request %s failed", rid, exc_info=exc)
            if not started:
                status = 500
                body = json.dumps(error_body(500, f"internal error; quote request id {rid} when reporting it", "internal_error", rid)).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"x-request-id", rid.encode())]
                await send({"type": "http.response.start", "status": 500, "headers": headers})
                await send({"type": "http.response.body", "body": body})
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(route, scope["method"], status, time.perf_counter() - t0)
