"""Errors raised by :func:`opa_telemetry.check_latest` (the background reporter raises none).

TelemetryError ............. base of everything below
├── TransportError ......... no complete answer: refused, reset, DNS, TLS, proxy, redirect loop
│   └── RequestTimeoutError  no answer within the timeout
├── ServiceError ........... the service answered with a status other than 200
└── AnswerError ............ a 200 whose body is not the expected JSON (or too large)

Messages are plain words a person can act on (``cannot connect to 127.0.0.1:1: connection
refused``), never a library's class names.
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
    when it sent one; ``message`` and ``details`` the service's own error message and list of
    problems (``{"error": ..., "details": [...]}``), if it gave them. ``str()`` shows all of
    it on one line.
    """

    def __init__(
        self,
        status: int,
        message: str = "",
        retry_after: float | None = None,
        details: tuple[str, ...] = (),
    ) -> None:
        text = f"service answered HTTP {status}" + (f": {message}" if message else "")
        if details:
            text += f" ({'; '.join(details)})"
        super().__init__(text)
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.details = details


class AnswerError(TelemetryError):
    """The service answered 200 but not with a ``{"latest": {...}}`` JSON object."""
