"""Errors raised by :func:`opa_telemetry.check_latest` (the background reporter raises none).

TelemetryError ............. base of everything below
├── TransportError ......... no complete answer: refused, reset, DNS, TLS, redirect loop
│   └── RequestTimeoutError  no answer within the timeout
├── ServiceError ........... the service answered with a status other than 200
└── AnswerError ............ a 200 whose body is not the expected JSON (or too large)
"""

from __future__ import annotations


class TelemetryError(Exception):
    """Base class of the client's errors."""


class TransportError(TelemetryError):
    """The request did not get a complete answer."""


class RequestTimeoutError(TransportError):
    """No complete answer arrived within the timeout."""


class ServiceError(TelemetryError):
    """The service answered with a non-200 status.

    ``status`` is the HTTP status; ``retry_after`` the seconds from a ``Retry-After`` header
    when it sent one; ``message`` the service's own error message, if it gave one.
    """

    def __init__(self, status: int, message: str = "", retry_after: float | None = None) -> None:
        text = f"service answered HTTP {status}" + (f": {message}" if message else "")
        super().__init__(text)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class AnswerError(TelemetryError):
    """The service answered 200 but not with a ``{"latest": {...}}`` JSON object."""
