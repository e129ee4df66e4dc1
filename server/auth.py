"""Optional API keys (`AIMLQA_API_KEYS`): a bearer token on every endpoint except health and the page."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from server.errors import ApiError

bearer = HTTPBearer(auto_error=False, description="An API key, when the server sets AIMLQA_API_KEYS")


def check_key(request: Request) -> None:
    keys = request.app.state.config.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip().encode()
    # compare with every key, in constant time, so timing does not reveal a prefix
    if scheme.lower() != "bearer" or not sum(hmac.compare_digest(given, k.encode()) for k in keys):
        message = "invalid API key" if token else "an API key is needed: send `Authorization: Bearer <key>`"
        raise ApiError(401, message, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


async def require_key(request: Request, _=Depends(bearer)) -> None:
    """The dependency form; `bearer` puts the scheme into the OpenAPI schema."""
    check_key(request)
