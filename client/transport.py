"""One POST with a timeout -> a parsed answer, with the standard library only.

The exchange itself (resolve, connect, TLS, send, read, redirects) is plain blocking socket
code run in a thread of its own (:func:`.offloop.run_off_loop`); the host's event loop only
awaits its outcome, so not even the TLS handshake (~1.5 ms of CPU) runs on it. No HTTP
library: one request per connection, and :mod:`.wire` parses the answer. aiohttp's import
costs ~0.2 s and h11's ~10 ms (measured, see ``bench/client.py``), each holding the GIL long
enough to stall a host's loop wherever it runs; everything used here is imported by
``asyncio`` already, but ``json`` and ``zlib``.

What it does, as OPA's Go client does: ``http://`` and ``https://`` (certificates verified
against the system's roots or ``SSL_CERT_FILE``/``SSL_CERT_DIR``); proxies from the
environment (:mod:`.proxies`; an ``https://`` URL through a ``CONNECT`` tunnel; an
``https://`` proxy is spoken to over TLS, verified as a target is, so an ``https://`` URL
through it is TLS inside TLS, :class:`TunnelledTls`); at most
:data:`MAX_REDIRECTS` redirects (301/302/303 become a GET, 307/308 repeat the POST); gzip
answers; ``Retry-After``. Answers are read up to 64 KiB. One deadline bounds the whole
exchange, in the thread (every socket operation) and on the loop (the await).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urljoin, urlsplit

from .answer import LatestRelease, parse_answer
from .errors import AnswerError, RequestTimeoutError, ServiceError, TransportError
from .offloop import run_off_loop, tls_context
from .payload import Payload
from .proxies import DEFAULT_PORTS, proxy_for
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
MAX_INTERIM_ANSWERS = 8  # 1xx answers skipped before the real one
MAX_TRAILERS = 32

# (head, body); the body is None when longer than MAX_ANSWER_BYTES.
Answer = tuple[Head, bytes | None]
T = TypeVar("T")

if TYPE_CHECKING:
    from typing import TypeAlias

    # What a request is written to and its answer read from: a socket, the TLS socket over
    # it, or TLS inside an https proxy's TLS.
    Stream: TypeAlias = "socket.socket | TunnelledTls"


async def post_report(
    url: str, payload: Payload, timeout: float, environ: Mapping[str, str] | None = None
) -> LatestRelease:
    """Send one report and return the parsed answer; no retries.

    ``timeout`` bounds the whole exchange (resolve, connect, TLS, send, read, redirects).
    Raises :class:`RequestTimeoutError`, :class:`TransportError`, :class:`ServiceError` or
    :class:`AnswerError`; reads at most 64 KiB of any answer.
    """
    exchange = Exchange(url, payload, timeout, os.environ if environ is None else environ)
    try:
        async with asyncio.timeout(timeout):
            head, raw = await run_off_loop(exchange.run)
    except TimeoutError:
        raise RequestTimeoutError(f"no answer from {url} within {timeout:g}s") from None
    finally:
        exchange.abort()  # cancelled or timed out: the thread's socket is shut, it ends now
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


class Target:
    """Where one request goes; ``path`` includes the query, if any."""

    __slots__ = ("host", "path", "port", "scheme")

    def __init__(self, scheme: str, host: str, port: int, path: str) -> None:
        self.scheme, self.host, self.port, self.path = scheme, host, port, path

    @classmethod
    def parse(cls, url: str) -> Target:
        try:
            parts = urlsplit(url)
            scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
        except ValueError:
            raise TransportError(f"invalid URL {url[:200]!r}") from None
        if scheme not in DEFAULT_PORTS or not host:
            raise TransportError(f"not an http:// or https:// URL: {url[:200]!r}")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(scheme, host, port or DEFAULT_PORTS[scheme], path)

    @property
    def authority(self) -> str:
        """``host`` or ``host:port`` (the port only when not the scheme's default)."""
        return self.host_port.removesuffix(f":{DEFAULT_PORTS[self.scheme]}")

    @property
    def host_port(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class Exchange:
    """One report's request, redirects included, as blocking code for a thread of its own.

    :meth:`run` does the work; :meth:`abort` may be called from any thread, at any time: it
    shuts the current socket (so a blocked read returns at once) and stops what follows.
    """

    def __init__(
        self, url: str, payload: Payload, timeout: float, environ: Mapping[str, str]
    ) -> None:
        self.url = url
        self.payload = payload
        self.timeout = timeout
        self.environ = environ
        self.deadline = 0.0
        self._aborted = False
        self._socket: socket.socket | None = None

    def run(self) -> Answer:
        self.deadline = time.monotonic() + self.timeout
        url, method, body = self.url, "POST", self.payload.body
        headers = [
            ("User-Agent", self.payload.user_agent),
            ("Content-Type", "application/json"),
            ("Accept-Encoding", "gzip"),
            ("Connection", "close"),
        ]
        for _ in range(MAX_REDIRECTS + 1):
            answer = self._send(Target.parse(url), method, body, headers)
            head = answer[0]
            location = head.headers.get("location")
            if head.status not in REDIRECT_STATUSES or not location:
                return answer
            url = urljoin(url, location)
            if head.status in (301, 302, 303):  # as Go and browsers do: the body is dropped
                method, body = "GET", b""
                headers = [(name, value) for name, value in headers if name != "Content-Type"]
        raise TransportError(f"more than {MAX_REDIRECTS} redirects, the last to {url[:200]}")

    def abort(self) -> None:
        self._aborted = True
        sock = self._socket
        if sock is not None:
            # The plain socket's shutdown, also for an SSLSocket: no TLS state is touched.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def _send(
        self, target: Target, method: str, body: bytes, headers: list[tuple[str, str]]
    ) -> Answer:
        proxy = proxy_for(target.scheme, target.host, target.port, self.environ)
        request_target, extra = target.path, []
        if proxy is None:
            sock = self._connect(target.host, target.port, "")
        else:
            sock = self._connect(proxy.host, proxy.port, "proxy ")
        stream: Stream = sock
        try:
            if proxy is not None and proxy.scheme == "https":  # TLS to the proxy itself
                stream = sock = self._start_tls(sock, proxy.host, proxy.host_port, "proxy ")
            if proxy is not None and target.scheme == "https":
                self._tunnel(sock, target, proxy.host_port, proxy.authorization)
            elif proxy is not None:  # an HTTP request to a proxy names the absolute URL
                request_target = f"http://{target.authority}{target.path}"
                if proxy.authorization:
                    extra.append(("Proxy-Authorization", proxy.authorization))
            if target.scheme == "https" and isinstance(sock, ssl.SSLSocket):  # https proxy
                stream = self._start_inner_tls(sock, target)
            elif target.scheme == "https":
                stream = self._start_tls(sock, target.host, target.host_port, "")
            request = request_bytes(method, request_target, target.authority, headers + extra, body)
            try:
                self._settimeout(stream)
                stream.sendall(request)
                return _read_answer(Reader(stream, self), method)
            except (OSError, EOFError) as exc:
                self._check_time(exc)
                raise TransportError(
                    f"no complete answer from {target.authority}: {_reason(exc)}"
                ) from None
        finally:
            self._socket = None
            stream.close()

    def _connect(self, host: str, port: int, what: str) -> socket.socket:
        if self._aborted:
            raise TransportError("cancelled")
        try:
            addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise TransportError(f"cannot resolve {what}{host}: {_reason(exc)}") from None
        except UnicodeError:  # IDNA refuses it: an empty label, or one over 63 characters
            raise TransportError(f"cannot resolve {what}{host[:100]}: not a host name") from None
        error: OSError | None = None
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            self._socket = sock
            try:
                if self._aborted:
                    raise TransportError("cancelled")
                self._settimeout(sock)
                sock.connect(address)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                sock.close()
                self._check_time(exc)
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        reason = _reason(error) if error else "no address"
        raise TransportError(f"cannot connect to {what}{host}:{port}: {reason}")

    def _tunnel(self, sock: socket.socket, target: Target, proxy: str, auth: str) -> None:
        """``CONNECT`` through the proxy: what follows goes to the target."""
        headers = [("Proxy-Authorization", auth)] if auth else []
        try:
            sock.sendall(request_bytes("CONNECT", target.host_port, target.host_port, headers, b""))
            head = parse_head(Reader(sock, self).read_until(b"\r\n\r\n"))
        except (OSError, EOFError) as exc:
            self._check_time(exc)
            raise TransportError(f"no answer from proxy {proxy}: {_reason(exc)}") from None
        if not 200 <= head.status < 300:
            hint = ""
            if head.status == 407:  # Proxy Authentication Required
                hint = (
                    " (it refused the credentials in the proxy URL)" if auth else
                    " (it wants credentials: give them in the proxy URL, http://user:password@host:port)"
                )  # fmt: skip
            raise TransportError(
                f"proxy {proxy} refused the tunnel to {target.host_port}: HTTP {head.status}{hint}"
            )

    def _start_tls(
        self, sock: socket.socket, host: str, host_port: str, what: str
    ) -> ssl.SSLSocket:
        """TLS to ``host`` (the target, or an https proxy) over ``sock``, its certificate
        verified."""
        try:
            context = tls_context(self.environ, self.deadline - time.monotonic())
            self._settimeout(sock)
            tls = context.wrap_socket(sock, server_hostname=host)
        except OSError as exc:
            raise self._tls_failure(exc, f"{what}{host_port}") from None
        self._socket = tls
        return tls

    def _start_inner_tls(self, outer: ssl.SSLSocket, target: Target) -> TunnelledTls:
        """TLS to the target inside the https proxy's TLS session ``outer``, after CONNECT."""
        try:
            context = tls_context(self.environ, self.deadline - time.monotonic())
            inner = TunnelledTls(outer, context, target.host, self._settimeout)
            inner.do_handshake()
        except OSError as exc:
            raise self._tls_failure(exc, target.host_port) from None
        return inner  # self._socket stays the outer socket: abort() shuts that

    def _tls_failure(self, exc: OSError, peer: str) -> TransportError:
        self._check_time(exc)
        return TransportError(f"cannot connect to {peer}: {_reason(exc)}")

    def _settimeout(self, sock: Stream) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0 or self._aborted:
            raise TimeoutError("deadline passed")
        sock.settimeout(remaining)

    def _check_time(self, exc: BaseException) -> None:
        """A socket timeout is the deadline: let it surface as one (RequestTimeoutError)."""
        if isinstance(exc, TimeoutError):
            raise TimeoutError("deadline passed") from None


class TunnelledTls:
    """A TLS session inside another one: to the target, through an ``https://`` proxy's
    ``CONNECT`` tunnel. ``wrap_socket`` cannot wrap a TLS socket, so the inner session is an
    :class:`ssl.SSLObject` on memory buffers, whose records this class carries over the outer
    (proxy's) TLS socket. Blocking, with a socket's ``sendall``/``recv``; ``arm`` sets the
    outer socket's timeout to what is left of the exchange's deadline before each use."""

    def __init__(
        self,
        outer: ssl.SSLSocket,
        context: ssl.SSLContext,
        hostname: str,
        arm: Callable[[socket.socket], None],
    ) -> None:
        self.outer = outer
        self.arm = arm
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=hostname)

    def do_handshake(self) -> None:
        self._run(self.tls.do_handshake)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._run(self.tls.write, view) :]

    def recv(self, size: int) -> bytes:
        try:
            return self._run(self.tls.read, size)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""  # the end, with or without close_notify, as an SSLSocket reads it

    def settimeout(self, value: float | None) -> None:
        self.outer.settimeout(value)

    def close(self) -> None:
        self.outer.close()

    def _run(self, operation: Callable[..., T], *args: object) -> T:
        """``operation`` on the inner session, feeding it the outer socket's bytes until it
        has what it needs, and sending what it wrote."""
        while True:
            try:
                result = operation(*args)
            except ssl.SSLWantReadError:
                self._flush()
                self.arm(self.outer)
                if data := self.outer.recv(65536):
                    self.incoming.write(data)
                else:
                    self.incoming.write_eof()
                continue
            self._flush()
            return result

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.arm(self.outer)
            self.outer.sendall(self.outgoing.read())


class Reader:
    """Buffered reads from a blocking socket, each bounded by the exchange's deadline."""

    def __init__(self, sock: Stream, exchange: Exchange) -> None:
        self.sock = sock
        self.exchange = exchange
        self.buffer = bytearray()
        self.eof = False

    def _fill(self) -> None:
        self.exchange._settimeout(self.sock)
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
        self.buffer += data

    def read_until(self, separator: bytes, limit: int = MAX_HEAD_BYTES) -> bytes:
        """Up to and including ``separator``; raises EOFError at the end of the stream and
        TransportError past ``limit`` bytes."""
        start = 0
        while (found := self.buffer.find(separator, start)) < 0:
            if len(self.buffer) > limit:
                raise TransportError("answer headers are too large")
            start = max(0, len(self.buffer) - len(separator) + 1)
            if self.eof:
                raise EOFError("the connection closed before the answer was complete")
            self._fill()
        end = found + len(separator)
        if end > limit:
            raise TransportError("answer headers are too large")
        data = bytes(self.buffer[:end])
        del self.buffer[:end]
        return data

    def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if self.eof:
                raise EOFError("the connection closed before the answer was complete")
            self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def read_to_end(self, limit: int) -> bytes | None:
        """Everything until the connection closes, or None once past ``limit`` bytes."""
        while not self.eof:
            if len(self.buffer) > limit:
                return None
            self._fill()
        return None if len(self.buffer) > limit else bytes(self.buffer)


def _read_answer(reader: Reader, method: str) -> Answer:
    for _ in range(MAX_INTERIM_ANSWERS):
        head = parse_head(reader.read_until(b"\r\n\r\n"))
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
        return (head, reader.read_exactly(framing.length))
    if framing.kind == "chunked":
        return (head, _read_chunks(reader))
    return (head, reader.read_to_end(MAX_ANSWER_BYTES))


def _read_chunks(reader: Reader) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while length := chunk_size(reader.read_until(b"\n", 1024)):
        size += length
        if size > MAX_ANSWER_BYTES:
            return None
        chunk = reader.read_exactly(length + 2)
        if chunk[-2:] != b"\r\n":
            raise TransportError("malformed chunk in the answer")
        chunks.append(chunk[:-2])
    for _ in range(MAX_TRAILERS):
        if not reader.read_until(b"\n", 8192).strip():
            return b"".join(chunks)
    raise TransportError("too many trailers in the answer")


def _reason(exc: BaseException) -> str:
    """An error in plain words: ``connection refused``, not ``ConnectionRefusedError(...)``."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}".lower()
    if isinstance(exc, EOFError):
        return str(exc)
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
