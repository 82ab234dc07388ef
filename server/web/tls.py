"""HTTPS for ``serve``: the server's TLS context from the ``tls_cert`` and ``tls_key`` settings."""

from __future__ import annotations

import ssl
from functools import partial
from pathlib import Path

from opa_telemetry_server.errors import TlsError
from opa_telemetry_server.settings import Settings


def server_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context to serve HTTPS with, or ``None`` to serve plain HTTP (no certificate).

    Python's defaults for a server (TLS 1.2 or newer, its cipher list). Reads the two files:
    call it before serving, never per request. Raises :class:`TlsError`, naming the file and
    the problem, when the certificate or the key cannot be read, is not PEM, is encrypted, or
    the key does not belong to the certificate.
    """
    if not settings.tls_cert:
        return None
    for what, path, marker in (
        ("certificate", settings.tls_cert, b"-----BEGIN CERTIFICATE-----"),
        ("key", settings.tls_key, b"PRIVATE KEY-----"),
    ):
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise TlsError(f"TLS {what} {path}: {(exc.strerror or str(exc)).lower()}") from None
        if marker not in pem:
            raise TlsError(f"TLS {what} {path}: not a PEM {what} (no {marker.decode()!r} line)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(
            settings.tls_cert, settings.tls_key, password=partial(_no_password, settings.tls_key)
        )
    except ssl.SSLError as exc:
        problem = (
            "the key does not belong to the certificate"
            if exc.reason == "KEY_VALUES_MISMATCH"
            else (exc.reason or str(exc)).lower().replace("_", " ")
        )
        raise TlsError(
            f"TLS certificate {settings.tls_cert} and key {settings.tls_key}: {problem}"
        ) from None
    return context


def _no_password(key: str) -> bytes:
    # Called only for an encrypted key: a server started by a process manager has nobody to
    # type the passphrase (OpenSSL would otherwise prompt on the terminal).
    raise TlsError(
        f"TLS key {key} is encrypted: give an unencrypted key, readable by the server only"
    )
