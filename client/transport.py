"""One POST with a timeout -> a parsed answer, over asyncio streams and the standard library.

No HTTP library: the client sends one request per connection and :mod:`.wire` parses the
answer. aiohttp's import costs ~0.2 s and h11's ~10 ms (measured, see ``bench/client.py``),
each holding the GIL long enough to stall a host's event loop wherever it runs; everything
this module needs is imported by ``asyncio`` already. Host names are resolved and the TLS
context built in a thread of their own (:mod:`.offloop`).

What it does, as OPA's Go client does: ``http://`` and ``https://`` (certificates verified
against the system's roots or ``SSL_CERT_FILE``/``SSL_CERT_DIR``); proxies from the
environment (:mod:`.proxies`; an ``https://`` URL through a ``CONNECT`` tunnel); at most
:data:`MAX_REDIRECTS` redirects (301/302/303 become a GET, 307/308 repeat the POST); gzip
answers; ``Retry-After``. Answers are read up to 64 KiB, and one timeout bounds the whole
exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
from collections.abc import Mapping
from urllib.parse import urljoin, urlsplit

from .answer import LatestRelease, parse_answer
from .errors import AnswerError, RequestTimeoutError, ServiceError, TransportError
from .offloop import resolve, tls_context
from .payload import Payload
from .proxies import DEFAULT_PORTS, Proxy, proxy_for
from .wire import (
    MAX_ANSWER_BYTES,
    MAX_HEAD_BYTES,
    REDIRECT_STATUSES,
    Head,
    body_framing,
    chunk_size,
    decode_content,
    parse_head,
    request_bytes,
)

MAX_RETRY_AFTER = 24 * 3600.0
MAX_REDIRECTS = 3
CLOSE_TIMEOUT = 1.0  # for the TLS goodbye after a complete answer
MAX_INTERIM_ANSWERS = 8  # 1xx answers skipped before the real one
MAX_TRAILERS = 32


# (head, body); the body is None when longer than MAX_ANSWER_BYTES.
Answer = tuple[Head, bytes | None]


class Target:
    """Where one request goes; ``path`` includes the query, if any."""

    __slots__ = ("host", "path", "port", "scheme")

    def __init__(self, scheme: str, host: str, port: int, path: str) -> None:
        self.scheme, self.host, self.port, self.path = scheme, host, port, path

    @property
    def authority(self) -> str:
        """``host`` or ``host:port`` (the port only when not the scheme's default)."""
        return self.host_port.removesuffix(f":{DEFAULT_PORTS[self.scheme]}")

    @property
    def host_port(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


async def post_report(
    url: str, payload: Payload, timeout: float, environ: Mapping[str, str] | None = None
) -> LatestRelease:
    """Send one report and return the parsed answer; no retries.

    ``timeout`` bounds the whole exchange (resolve, connect, TLS, send, read, redirects).
    Raises :class:`RequestTimeoutError`, :class:`TransportError`, :class:`ServiceError` or
    :class:`AnswerError`; reads at most 64 KiB of any answer.
    """
    env = os.environ if environ is None else environ
    headers = [
        ("User-Agent", payload.user_agent),
        ("Content-Type", "application/json"),
        ("Accept-Encoding", "gzip"),
        ("Connection", "close"),
    ]
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            answer, writer = await _follow(url, payload.body, headers, env)
    except TimeoutError:
        raise RequestTimeoutError(f"no answer from {url} within {timeout:g}s") from None
    await _close(writer)
    head, raw = answer
    status, retry_after = head.status, head.headers.get("retry-after")
    try:
        body = decode_content(raw, head.headers.get("content-encoding", ""))
    except AnswerError:
        if status == 200:
            raise
        body = b""
    if status != 200:
        message, details = _error_fields(body)
        raise ServiceError(status, message, _retry_after_seconds(retry_after), details)
    return parse_answer(body)


async def _follow(
    url: str, body: bytes, headers: list[tuple[str, str]], env: Mapping[str, str]
) -> tuple[Answer, asyncio.StreamWriter]:
    """The answer to the request, after at most MAX_REDIRECTS redirects, with its still-open
    connection (closed here on any failure)."""
    method = "POST"
    for _ in range(MAX_REDIRECTS + 1):
        target = _parse_url(url)
        answer, writer = await _exchange(target, method, body, headers, env)
        head = answer[0]
        location = head.headers.get("location")
        if head.status not in REDIRECT_STATUSES or not location:
            return answer, writer
        await _close(writer)
        url = urljoin(url, location)
        if head.status in (301, 302, 303):  # as Go and browsers do: the body is dropped
            method, body = "GET", b""
            headers = [(name, value) for name, value in headers if name != "Content-Type"]
    raise TransportError(f"more than {MAX_REDIRECTS} redirects, the last to {url[:200]}")


def _parse_url(url: str) -> Target:
    try:
        parts = urlsplit(url)
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        raise TransportError(f"invalid URL {url[:200]!r}") from None
    if scheme not in DEFAULT_PORTS or not host:
        raise TransportError(f"not an http:// or https:// URL: {url[:200]!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(scheme, host, port or DEFAULT_PORTS[scheme], path)


async def _exchange(
    target: Target,
    method: str,
    body: bytes,
    headers: list[tuple[str, str]],
    env: Mapping[str, str],
) -> tuple[Answer, asyncio.StreamWriter]:
    proxy = proxy_for(target.scheme, target.host, target.port, env)
    request_target = target.path
    extra: list[tuple[str, str]] = []
    if proxy is None:
        reader, writer = await _connect(target.host, target.port, target.scheme, env)
    else:
        reader, writer = await _connect(proxy.host, proxy.port, proxy.scheme, env, "proxy ")
    try:
        if proxy is not None and target.scheme == "https":
            await _tunnel(reader, writer, proxy, target, env)
        elif proxy is not None:  # a plain-HTTP proxy takes the absolute URL
            request_target = f"http://{target.authority}{target.path}"
            if proxy.authorization:
                extra.append(("Proxy-Authorization", proxy.authorization))
        writer.write(request_bytes(method, request_target, target.authority, headers + extra, body))
        await writer.drain()
        answer = await _read_answer(reader, method)
    except BaseException as exc:
        _abort(writer)
        if isinstance(exc, OSError | asyncio.IncompleteReadError | asyncio.LimitOverrunError):
            reason = _reason(exc)
            raise TransportError(f"no complete answer from {target.authority}: {reason}") from None
        raise
    return answer, writer


async def _connect(
    host: str, port: int, scheme: str, env: Mapping[str, str], what: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    context = await tls_context(env) if scheme == "https" else None
    try:
        addresses = await resolve(host, port)
    except OSError as exc:
        raise TransportError(f"cannot resolve {what}{host}: {_reason(exc)}") from None
    error: OSError | None = None
    for address, address_port in addresses:
        try:
            return await asyncio.open_connection(
                address,
                address_port,
                ssl=context,
                server_hostname=host if context else None,
                limit=MAX_ANSWER_BYTES,
            )
        except OSError as exc:
            error = exc
    reason = _reason(error) if error else "no address"
    raise TransportError(f"cannot connect to {what}{host}:{port}: {reason}")


async def _tunnel(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    proxy: Proxy,
    target: Target,
    env: Mapping[str, str],
) -> None:
    """``CONNECT`` through the proxy, then TLS with the target over the tunnel."""
    authority = target.host_port
    headers = [("Proxy-Authorization", proxy.authorization)] if proxy.authorization else []
    writer.write(request_bytes("CONNECT", authority, authority, headers, b""))
    await writer.drain()
    head = parse_head(await reader.readuntil(b"\r\n\r\n"))
    if not 200 <= head.status < 300:
        raise TransportError(
            f"proxy {proxy.host}:{proxy.port} refused the tunnel to {authority}: HTTP {head.status}"
        )
    context = await tls_context(env)
    await writer.start_tls(context, server_hostname=target.host)


async def _read_answer(reader: asyncio.StreamReader, method: str) -> Answer:
    for _ in range(MAX_INTERIM_ANSWERS):
        head = await _read_head(reader)
        if not 100 <= head.status < 200:
            break
    else:
        raise TransportError("too many interim (1xx) answers")
    framing = body_framing(head, method)
    if framing.kind == "none":
        return (head, b"")
    if framing.kind == "length":
        if framing.length > MAX_ANSWER_BYTES:
            return (head, None)
        return (head, await reader.readexactly(framing.length))
    if framing.kind == "chunked":
        return (head, await _read_chunks(reader))
    data = bytearray()
    while chunk := await reader.read(16 * 1024):
        data += chunk
        if len(data) > MAX_ANSWER_BYTES:
            return (head, None)
    return (head, bytes(data))


async def _read_head(reader: asyncio.StreamReader) -> Head:
    try:
        data = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise TransportError("answer headers are too large") from None
    if len(data) > MAX_HEAD_BYTES:
        raise TransportError("answer headers are too large")
    return parse_head(data)


async def _read_chunks(reader: asyncio.StreamReader) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while length := chunk_size(await reader.readuntil(b"\n")):
        size += length
        if size > MAX_ANSWER_BYTES:
            return None
        chunk = await reader.readexactly(length + 2)
        if chunk[-2:] != b"\r\n":
            raise TransportError("malformed chunk in the answer")
        chunks.append(chunk[:-2])
    for _ in range(MAX_TRAILERS):
        if not (await reader.readuntil(b"\n")).strip():
            return b"".join(chunks)
    raise TransportError("too many trailers in the answer")


async def _close(writer: asyncio.StreamWriter | None) -> None:
    """Close a connection whose answer is complete, waiting briefly for TLS's goodbye."""
    if writer is None:
        return
    try:
        writer.close()
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except (OSError, TimeoutError, RuntimeError):
        _abort(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Drop a connection at once. With the loop already closed (a host that closed it with us
    mid-request) there is nothing to schedule on: the socket goes with its object."""
    with contextlib.suppress(RuntimeError):
        writer.transport.abort()


def _reason(exc: BaseException) -> str:
    """An error in plain words: ``connection refused``, not ``ConnectionRefusedError(...)``."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}".lower()
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the connection closed before the answer was complete"
    if isinstance(exc, asyncio.LimitOverrunError):
        return "answer headers are too large"
    if isinstance(exc, socket.gaierror):
        return str(exc.strerror or exc).lower()
    if isinstance(exc, OSError) and exc.errno:  # asyncio words some as "Connect call failed"
        return os.strerror(exc.errno).lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _error_fields(body: bytes) -> tuple[str, tuple[str, ...]]:
    """The service's ``{"error": ..., "details": [...]}``, bounded; empty when it is not that."""
    try:
        document = json.loads(body or b"{}")
    except (ValueError, RecursionError):
        return "", ()
    if not isinstance(document, dict):
        return "", ()
    message = document.get("error")
    details = document.get("details")
    items = details if isinstance(details, list) else []
    return (
        message[:200] if isinstance(message, str) else "",
        tuple(item[:200] for item in items[:20] if isinstance(item, str) and item),
    )


def _retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds, clamped to a day so no header can silence us forever."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    if seconds is None or seconds != seconds or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER)
