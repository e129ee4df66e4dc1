"""One error shape for every failure: OpenAI's `{"error": {message, type, code}}` plus the request id.

Users get one clear message; a stack trace goes only to the log, under the same request id.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from aimlqa.settings import UserError, error_message

log = logging.getLogger("aimlqa.server")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         409: "conflict_error", 422: "invalid_request_error",
         503: "overloaded_error", 504: "timeout_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "") or "-"


def error_body(status: int, message: str, code: str | None, rid: str) -> dict:
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # it may quote the request's own bad text
    return {"error": {"message": message, "type": kind, "code": code, "request_id": rid}}


def error_response(request: Request, status: int, message: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, request_id(request)), status_code=status, headers=headers)


def body_model(request: Request):
    """The matched route's request-body model, so an unknown field can name the known ones."""
    field = getattr(request.scope.get("route"), "body_field", None)
    return getattr(getattr(field, "field_info", None), "annotation", None)


def describe_validation(errors, model=None) -> str:
    """Pydantic's error list as one line: `top_k: Input should be less than or equal to 20`."""
    parts = []
    for e in errors:
        path = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path")]
        msg = "the body is not valid JSON" if e.get("type") == "json_invalid" else e.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(error_message(e | {"msg": msg}, model, path))
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return error_response(request, exc.status, exc.message, exc.code, exc.headers)

    @app.exception_handler(UserError)
    async def _user(request: Request, exc: UserError):
        return error_response(request, 400, str(exc), "invalid_request")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(request, 422, describe_validation(exc.errors(), body_model(request)), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(request, exc.status_code, message.get(exc.status_code, str(exc.detail)), headers=getattr(exc, "headers", None))
