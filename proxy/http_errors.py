"""The one place an exception becomes an HTTP error response, for every surface: the
public port (the pipeline and its own routes: the consumer API, the Stripe webhook) and
the admin API.

    error_response(exc, request_id=None) -> web.Response
        HttpError    -> exc.status, {"error": {"type": exc.type, "message": str(exc), **exc.extra}}
                        plus exc.headers
        LookupError  -> 404, {"error": {"type": "not_found", "message": ...}}  (admin lookups)

The body is the documented error format (README "Errors", docs/api.md, openapi.yaml
``Error``); ``X-Request-Id`` is set when the public port has one for the request.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from multidict import istr

from proxy.errors import HttpError

_XRID = istr("X-Request-Id")


def error_response(exc: HttpError | LookupError, request_id: str | None = None) -> web.Response:
    if isinstance(exc, HttpError):
        status, type_, message = exc.status, exc.type, str(exc)
    else:
        status, type_ = 404, "not_found"
        message = str(exc.args[0]) if exc.args else "not found"
    err: dict[str, Any] = {"type": type_, "message": message}
    if isinstance(exc, HttpError) and exc.extra:
        err.update(exc.extra)
    resp = web.Response(status=status, body=orjson.dumps({"error": err}),
                        content_type="application/json")
    if request_id:
        resp.headers[_XRID] = request_id
    if isinstance(exc, HttpError) and exc.headers:
        resp.headers.update(exc.headers)
    return resp
