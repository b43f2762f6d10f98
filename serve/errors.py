"""Errors in OpenAI's wire format: ``{"error": {"message", "type", "param", "code"}}``.

A client error (4xx) says what the request did wrong. A server fault is a 500 whose message
carries only the request id; the traceback goes to the server's log under that id, so paths and
exception texts never reach the client.
"""

from __future__ import annotations

import logging
import uuid
from contextvars import ContextVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("nugget2d.serve")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    507: "insufficient_storage",
}

#: The id of the request being served (set by :class:`~.middleware.RequestIds` for each request).
REQUEST_ID: ContextVar[str] = ContextVar("nugget2d_request_id", default="-")


class APIError(Exception):
    """A request that cannot be served, with the HTTP status and OpenAI error fields to send."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body OpenAI clients parse."""
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        """This error as an HTTP response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ServerFault(Exception):
    """A fault of the server to answer as :func:`server_fault`'s 500, raised (``from`` its cause)
    where the request id is not known, as in the model worker's thread."""

    def __init__(self, what: str, code: str = "internal_error") -> None:
        super().__init__(what)
        self.what, self.code = what, code


def new_request_id() -> str:
    """A fresh id for one request, as ``X-Request-ID`` and 500 bodies show it."""
    return f"req-{uuid.uuid4().hex[:24]}"


def server_fault(err: BaseException, what: str = "internal server error", code: str = "internal_error") -> APIError:
    """Log ``err`` with its traceback under the current request id; the 500 to send instead,
    which names only ``what`` happened and that id."""
    request_id = REQUEST_ID.get()
    log.error("request %s failed: %s", request_id, what, exc_info=(type(err), err, err.__traceback__))
    return APIError(500, f"{what} (request id {request_id}; the server's log has the details)", code=code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object for ``status``."""
    return {
        "error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
    }


def install_handlers(app: FastAPI) -> None:
    """Make every expected error an OpenAI error body with the right status."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        if any(problem.get("type") == "json_invalid" for problem in problems):
            return JSONResponse(error_body(400, "the request body is not valid JSON", code="invalid_json"), 400)
        first = problems[0] if problems else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        details = "; ".join(
            f"{'.'.join(str(p) for p in problem.get('loc', ()) if p != 'body') or 'body'}: {problem.get('msg')}"
            for problem in problems[:5]
        )
        return JSONResponse(error_body(422, f"invalid request: {details}", param=param, code="invalid_value"), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(err.status_code, str(err.detail)), err.status_code)

    # anything else reaches RequestIds (middleware), which logs it and answers server_fault's 500
