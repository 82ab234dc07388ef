"""Who may read fleet statistics and metrics: the operator's token, or anyone in public mode.

The stats API, the dashboard's data and ``/metrics`` are closed by default. ``--admin-token``
opens them to requests carrying ``Authorization: Bearer <token>`` (compared in constant time;
the token is never logged or echoed). ``--public-stats`` opens the aggregates to anyone, with
groups smaller than ``--min-group-size`` folded into ``other``. The report routes never check.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Mapping

from opa_telemetry_server.errors import ForbiddenError, UnauthorizedError
from opa_telemetry_server.settings import Settings, env_name

HOW_TO_ENABLE = (
    f"start the server with --admin-token TOKEN (env {env_name('admin_token')}) and send"
    f" 'Authorization: Bearer TOKEN', or with --public-stats (env {env_name('public_stats')})"
)


class View(enum.Enum):
    """What a permitted reader sees."""

    FULL = "full"  # the operator (a valid token): every group
    PUBLIC = "public"  # anyone, in public mode: small groups folded into "other"


def authorize(headers: Mapping[str, str], settings: Settings) -> View:
    """The view the request's credentials allow; raises :class:`UnauthorizedError` (no or
    malformed credentials where a token is required) or :class:`ForbiddenError` (a wrong
    token, or statistics not enabled at all)."""
    header = headers.get("Authorization")
    token = settings.admin_token
    if header is None:
        if settings.public_stats:
            return View.PUBLIC
        if token:
            raise UnauthorizedError(
                "statistics need the operator's token",
                ["send the header 'Authorization: Bearer <token>' (the server's --admin-token)"],
            )
        raise ForbiddenError("statistics are not enabled on this server", [HOW_TO_ENABLE])
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise UnauthorizedError(
            "malformed Authorization header", ["expected 'Authorization: Bearer <token>'"]
        )
    if not token:
        if settings.public_stats:
            return View.PUBLIC
        raise ForbiddenError(
            "statistics are not enabled on this server (no admin token is set)", [HOW_TO_ENABLE]
        )
    # Constant time: how much of a guess matches must not show in the answer's timing.
    if hmac.compare_digest(_bytes(given.strip()), _bytes(token)):
        return View.FULL
    raise ForbiddenError("wrong token", ["the bearer token is not the server's --admin-token"])


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")
