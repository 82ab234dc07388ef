"""Where the client sends reports and whether it may: the two environment conventions it honours.

``OPA_TELEMETRY_SERVICE_URL`` names the base URL (as for OPA itself) and ``DO_NOT_TRACK``
(https://consoledonottrack.com) turns reporting off with any value but empty, ``0`` or ``false``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

SERVICE_URL_ENV = "OPA_TELEMETRY_SERVICE_URL"
DO_NOT_TRACK_ENV = "DO_NOT_TRACK"
DEFAULT_SERVICE_URL = "http://127.0.0.1:9181"


def service_base_url(url: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The base URL: ``url`` if given, else ``$OPA_TELEMETRY_SERVICE_URL``, else the default."""
    env = os.environ if environ is None else environ
    return url or env.get(SERVICE_URL_ENV) or DEFAULT_SERVICE_URL


def version_url(base_url: str) -> str:
    """OPA's rule: trim trailing ``/`` and append ``/v1/version``; a path prefix is kept."""
    return base_url.rstrip("/") + "/v1/version"


def do_not_track(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``DO_NOT_TRACK`` asks for no telemetry."""
    env = os.environ if environ is None else environ
    return env.get(DO_NOT_TRACK_ENV, "").strip().lower() not in ("", "0", "false")
