"""ASGI middleware: a cap on request bodies (413 before the app sees them), the keys, request ids
(and the 500 of an unexpected fault), request counting."""

from __future__ import annotations

import hmac
import json

from .errors import REQUEST_ID, error_body, new_request_id, server_fault
from .metrics import Metrics

#: Open without a key: a bare liveness answer (the details need a key, see :class:`RequireKey`).
OPEN_PATHS = frozenset({"/health"})


class BodyLimit:
    """Reads each HTTP body up to ``max_bytes`` before the app runs; a larger one gets 413."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(send, size)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send, size: int) -> None:
        message = f"the request body ({size} bytes or more) exceeds the server's limit of {self.max_bytes} bytes"
        await _send_error(send, 413, message, "request_too_large", close=True)


async def _send_error(
    send, status: int, message: str, code: str, close: bool = False, headers: dict[str, str] | None = None
) -> None:
    payload = json.dumps(error_body(status, message, code=code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class RequestIds:
    """Gives each request an id (``X-Request-ID`` on the response, :data:`REQUEST_ID` while it is
    served) and answers any exception the app did not handle with :func:`server_fault`'s 500."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        REQUEST_ID.set(request_id)
        started = False

        async def tagged(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        except Exception as err:
            fault = server_fault(err)
            if started:  # the status is sent already: all that is left is to cut the response short
                raise
            await _send_error(tagged, 500, fault.message, fault.code or "internal_error")


class CountRequests:
    """Counts every HTTP request in ``nugget2d_requests_total`` by route and status."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()


class RequireKey:
    """Answers 401 to a request without ``Authorization: Bearer <key>`` for its path.

    :data:`OPEN_PATHS` need no key; ``/metrics`` takes ``metrics_key`` or ``api_key``; every
    other path takes ``api_key``. A path whose keys are all None is open. Passing requests carry
    ``scope["state"]["operator"]``: whether they may read operational details (as ``/metrics`` does).
    """

    def __init__(self, app, api_key: str | None, metrics_key: str | None = None) -> None:
        self.app = app
        self.api_keys = [key.encode() for key in (api_key,) if key is not None]
        self.metrics_keys = [key.encode() for key in (metrics_key, api_key) if key is not None]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        token = token.strip() if scheme.lower() == b"bearer" else None
        path = scope["path"]
        accepted = self.metrics_keys if path == "/metrics" else self.api_keys
        if path in OPEN_PATHS or _matches(token, accepted):
            scope.setdefault("state", {})["operator"] = _matches(token, self.metrics_keys)
            await self.app(scope, receive, send)
            return
        message = "invalid or missing API key (send the header 'Authorization: Bearer KEY')"
        await _send_error(send, 401, message, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _matches(token: bytes | None, keys: list[bytes]) -> bool:
    """True when no key is required, or ``token`` is one of ``keys`` (compared in constant time)."""
    if not keys:
        return True
    return token is not None and any(hmac.compare_digest(token, key) for key in keys)
