"""The one place where exceptions become HTTP answers, all in one JSON shape.

Every error body is ``{"error": "<message>", "details": ["<problem>", ...]}``. Domain errors map
to 4xx/503 by type; aiohttp's own HTTP errors (413 from reading a body) are reshaped; a body the
client garbled or abandoned is a 400; anything else is a bug: it is logged with its traceback
(never with the client's address) and answered 500.

Logs a client can trigger at will are bounded: requests refused as malformed (by aiohttp's
parser or here) are counted and the count logged at most once a minute (:class:`ServerLog`,
:class:`BadRequestCount`); the access log never prints the client's address.

``routes`` wraps every handler, including the catch-all 404 and 405 handlers, with
:func:`json_errors`; the one hot handler (``POST /v1/version``) calls :func:`error_answer`
from its own ``try`` instead. A wrapper rather than an aiohttp middleware, and no wrapper at
all on the hot path: every call layer per request shows in ``bench/cpu.py``.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import wraps
from time import monotonic
from typing import Any

from aiohttp import hdrs, web, web_log
from aiohttp.http_exceptions import HttpProcessingError

from opa_telemetry_server.errors import (
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


# A client can send malformed requests as fast as it can connect: they are counted, and the count
# logged at most this often.
BAD_REQUEST_LOG_INTERVAL = 60.0
# The method aiohttp gives the placeholder request it answers 400 when it cannot parse one.
_UNPARSED_METHOD = "UNKNOWN"


class BadRequestCount:
    """Counts requests refused as malformed; logs the count at INFO at most once per interval.

    The first one is logged at once; later ones are added up and logged with the first that
    arrives after ``interval`` seconds. Never a traceback, never the client's address: a line
    per request (aiohttp's default) would let any client fill the log.
    """

    def __init__(
        self, interval: float = BAD_REQUEST_LOG_INTERVAL, clock: Callable[[], float] = monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._kinds: Counter[str] = Counter()
        self._since = self._next_log_at = -math.inf
        self.total = 0

    def add(self, kind: str) -> None:
        """Count one refused request of ``kind`` (e.g. ``LineTooLong``); maybe log the count."""
        now = self._clock()
        self.total += 1
        self._kinds[kind] += 1
        if now < self._next_log_at:
            return
        count = sum(self._kinds.values())
        kinds = ", ".join(f"{name} {n}" for name, n in self._kinds.most_common())
        window = "" if self._since == -math.inf else f" in the last {now - self._since:.0f}s"
        logger.info(
            "refused %d malformed request%s%s (%s); logged at most every %.0fs",
            count, "" if count == 1 else "s", window, kinds, self.interval,
        )  # fmt: skip
        self._kinds.clear()
        self._since, self._next_log_at = now, now + self.interval


# One count per process: every server in it refuses into the same log.
bad_requests = BadRequestCount()


class ServerLog(logging.LoggerAdapter[logging.Logger]):
    """What aiohttp's connection handler logs (the ``logger`` runner option), sorted.

    aiohttp logs every request it cannot parse (a request line or header over the limit, bad
    framing, TLS sent to the HTTP port) with its traceback and the client's address, at ERROR:
    those are the client's errors, so they are only counted (:class:`BadRequestCount`). What
    is left (a bug) keeps its level and traceback, and loses the address.
    """

    def __init__(self, count: BadRequestCount | None = None) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self.count = count or bad_requests

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            self.count.add(type(exc).__name__)
            return
        if isinstance(msg, str) and " from %s" in msg:  # "Error handling request from %s"
            msg, args = msg.replace(" from %s", ""), ()
        super().log(level, msg, *args, **kwargs)


class AccessLogger(web_log.AccessLogger):
    """aiohttp's access log in :data:`ACCESS_LOG_FORMAT`, without the requests aiohttp could
    not parse: :class:`ServerLog` counts those, a line each would let a client fill the log."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.method == _UNPARSED_METHOD and response.status == 400:
            return
        super().log(request, response, time)


def logging_options(access_log: bool) -> dict[str, Any]:
    """The aiohttp runner options for its server and access logs (see ``app.runner_options``)."""
    return {
        "logger": ServerLog(),
        "access_log": logging.getLogger("aiohttp.access") if access_log else None,
        "access_log_class": AccessLogger,
        "access_log_format": ACCESS_LOG_FORMAT,
    }


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
    if isinstance(exc, HttpProcessingError):  # the body's framing, refused by aiohttp's parser
        bad_requests.add(type(exc).__name__)
        return json_error(400, "malformed request", [exc.message])
    if isinstance(exc, ConnectionError):  # the client left before its body arrived
        bad_requests.add("ClosedMidRequest")
        return json_error(400, "connection closed before the request was complete")
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
