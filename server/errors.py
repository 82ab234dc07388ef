"""The server's domain errors.

Domain code raises these and never ``web.HTTP*``; ``http_errors`` is the one
place that maps them to HTTP statuses and the JSON error shape.

    TelemetryError
    ├── RequestError ............. the client sent something we will not take (4xx)
    │   ├── ReportError .......... invalid report body; ``details`` lists every problem (400)
    │   ├── QueryError ........... invalid query parameters of a read route (400)
    │   ├── UnauthorizedError .... statistics need a bearer token that was not sent (401)
    │   ├── ForbiddenError ....... wrong token, or statistics are not enabled (403)
    │   ├── NotFoundError ........ no such release or product (404)
    │   ├── SlowRequestError ..... the body did not arrive within the read timeout (408)
    │   ├── UnsupportedMediaTypeError ........................................... (415)
    │   └── RateLimitedError ..... this client address sent too much (429 with Retry-After)
    │   └── BodyTooLargeError ................................................... (413)
    ├── UnavailableError ......... try again later (503 with Retry-After)
    │   ├── OverloadedError ...... the ingest queue is full
    │   ├── ShuttingDownError .... the server is draining before exit
    │   └── StorageUnavailableError  the database cannot serve now (locked, full, read-only, away)
    ├── BackupError .............. a backup cannot be written where asked (CLI)
    ├── CatalogError ............. a release, policy or advisory could not be added or parsed
    ├── SyncError ................ the release list upstream could not be read or used
    ├── SchemaError .............. the database file cannot be opened or is not one this
    │                              version can use
    ├── TlsError ................. the TLS certificate or key cannot be used (serve)
    └── UsageError ............... a bad flag, env var or setting (CLI exit status 2)
"""

from __future__ import annotations

from collections.abc import Sequence


class TelemetryError(Exception):
    """Base class of every error the server raises on purpose."""


class RequestError(TelemetryError):
    """The request cannot be accepted as sent; ``details`` name each problem."""

    def __init__(self, message: str, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.details = list(details)


class ReportError(RequestError):
    """The report body is malformed or a field is invalid."""


class QueryError(RequestError):
    """A read route's query parameters are invalid; ``details`` name each one."""


class UnauthorizedError(RequestError):
    """A closed route was asked without credentials (``Authorization: Bearer <token>``)."""


class ForbiddenError(RequestError):
    """The credentials are wrong, or the route is closed and no token is configured."""


class NotFoundError(RequestError):
    """The requested release or product is not in the catalog."""


class SlowRequestError(RequestError):
    """The client did not send its whole body within the read timeout."""


class UnsupportedMediaTypeError(RequestError):
    """The request body is not ``application/json``."""


class BodyTooLargeError(RequestError):
    """The request body is larger than the configured cap."""


class RateLimitedError(RequestError):
    """The client's address exceeded the rate limit; it may retry after ``retry_after``."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnavailableError(TelemetryError):
    """The server cannot take the request now; the client may retry after ``retry_after``."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class OverloadedError(UnavailableError):
    """The ingest queue is full."""


class ShuttingDownError(UnavailableError):
    """The server is draining its queue before it exits."""


class StorageUnavailableError(UnavailableError):
    """The database cannot serve the request now: locked, read-only, away (down, cut off,
    failing over), disk full, an I/O error."""


class BackupError(TelemetryError):
    """A backup cannot be written: its destination exists, is the database, or fails."""


class CatalogError(TelemetryError):
    """A release could not be parsed, added or imported."""


class SyncError(TelemetryError):
    """A release sync failed; ``retry_after`` is set when the upstream asked us to wait."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SchemaError(TelemetryError):
    """The database cannot be opened (a directory, a missing folder, no permission), is not
    an opa-telemetry database, or has a schema version this version cannot use."""


class TlsError(TelemetryError):
    """The TLS certificate or key given to ``serve`` cannot be read or do not match."""


class UsageError(TelemetryError):
    """A flag, env var or setting has a value the command cannot use."""


def describe(exc: BaseException) -> str:
    """One line for an error: an OSError names its file and says what went wrong in words."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror.lower()}"
    return str(exc)
