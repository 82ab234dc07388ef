"""The one place where exceptions become HTTP answers, all in one JSON shape.

Every error body is ``{"error": "<message>", "details": ["<problem>", ...]}``. Domain errors map
to 4xx/503 by type; aiohttp's own HTTP errors (413 from reading a body) are reshaped; anything
else is a bug: it is logged with its traceback (never with the client's address) and answered 500.

``routes`` wraps every handler, including the catch-all 404 and 405 handlers, with
:func:`json_errors`; the one hot handler (``POST /v1/version``) calls :func:`error_answer`
from its own ``try`` instead. A wrapper rather than an aiohttp middleware, and no wrapper at
all on the hot path: every call layer per request shows in ``bench/cpu.py``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import wraps

from aiohttp import hdrs, web

from .errors import (
    BodyTooLargeError,
    ForbiddenError,
    NotFoundError,
    QueryError,
    RateLimitedError,
    ReportError,
    RequestError,
    SlowRequestError,
    UnauthorizedError,
    UnavailableError,
    UnsupportedMediaTypeError,
)

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATUS_BY_ERROR: Mapping[type[RequestError], int] = {
    ReportError: 400,
    QueryError: 400,
    UnauthorizedError: 401,
    ForbiddenError: 403,
    NotFoundError: 404,
    SlowRequestError: 408,
    BodyTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
}
# Headers of aiohttp's own errors worth keeping (405 must say which methods are allowed).
_KEPT_HEADERS = (hdrs.ALLOW,)
ACCESS_LOG_FORMAT = '"%r" %s %b %Tfs "%{User-Agent}i"'  # no %a: addresses are never logged


class AddressRedactingFilter(logging.Filter):
    """Drops the client address from aiohttp's "Error handling request from %s" records.

    aiohttp logs malformed requests with the peer's address; we keep the event, not the address.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and " from %s" in record.msg:
            record.msg = record.msg.replace(" from %s", "")
            record.args = ()
        return True


def install_address_redaction() -> None:
    """Attach the filter to aiohttp's server logger, once per process."""
    server_logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, AddressRedactingFilter) for f in server_logger.filters):
        server_logger.addFilter(AddressRedactingFilter())


def json_error(
    status: int,
    message: str,
    details: Sequence[str] = (),
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = json.dumps({"error": message, "details": list(details)}).encode()
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def error_answer(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The JSON answer for an exception a handler raised; re-raises what is not an error
    (an ``HTTPException`` below 400, such as a redirect)."""
    if isinstance(exc, RateLimitedError):
        return json_error(429, exc.message, headers={hdrs.RETRY_AFTER: str(exc.retry_after)})
    if isinstance(exc, UnauthorizedError):
        return json_error(
            401, exc.message, exc.details, headers={hdrs.WWW_AUTHENTICATE: 'Bearer realm="stats"'}
        )
    if isinstance(exc, RequestError):
        return json_error(STATUS_BY_ERROR.get(type(exc), 400), exc.message, exc.details)
    if isinstance(exc, UnavailableError):
        return json_error(503, exc.message, headers={hdrs.RETRY_AFTER: str(exc.retry_after)})
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        kept = {str(name): exc.headers[name] for name in _KEPT_HEADERS if name in exc.headers}
        return json_error(exc.status, exc.reason, headers=kept)
    logger.error("unhandled error answering %s %s", request.method, request.path, exc_info=exc)
    return json_error(500, "internal error")


def json_errors(handler: Handler) -> Handler:
    """Wrap ``handler`` so that every exception it raises becomes a JSON error answer.

    (``CancelledError`` is not an ``Exception``: a cancelled request stays cancelled.)
    """

    @wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:  # noqa: BLE001 (error_answer logs the unexpected ones)
            return error_answer(request, exc)

    return wrapped


def method_not_allowed(allowed: Sequence[str]) -> Handler:
    """A handler answering 405 with ``Allow`` for a path served only for ``allowed`` methods."""
    allow = ", ".join(allowed)

    async def handler(request: web.Request) -> web.StreamResponse:
        return json_error(405, "Method Not Allowed", headers={hdrs.ALLOW: allow})

    return handler


async def not_found(request: web.Request) -> web.StreamResponse:
    """The catch-all route's handler: no such path."""
    return json_error(404, "Not Found")
