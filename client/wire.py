"""Pure HTTP/1.1 for one request and its answer: the request's bytes, the answer's head, how
its body is framed, and its content coding. No I/O: :mod:`.transport` reads and feeds it.

The client sends one request per connection with ``Connection: close`` (a report goes out
hourly; there is no connection worth keeping), so the answer is framed by ``Content-Length``,
by chunks, or by the server closing the connection, and nothing more is needed.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from .errors import AnswerError, TransportError

MAX_ANSWER_BYTES = 64 * 1024  # of a body, before and after decompression
MAX_HEAD_BYTES = 16 * 1024  # status line and headers
MAX_HEADERS = 64
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


# Plain classes, not NamedTuples or dataclasses: each of those costs 0.2-1 ms to build at
# import, and importing the client must stay cheap.
class Head:
    """An answer's status line and headers; names are lower case, repeats joined by ``, ``."""

    __slots__ = ("headers", "status")

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = headers


class Framing:
    """How the body that follows a head ends: ``length`` bytes (``kind`` ``"length"``), chunks
    (``"chunked"``), the connection's end (``"close"``), or there is none (``"none"``)."""

    __slots__ = ("kind", "length")

    def __init__(self, kind: str, length: int = 0) -> None:
        self.kind = kind
        self.length = length


def request_bytes(
    method: str, target: str, host: str, headers: Sequence[tuple[str, str]], body: bytes
) -> bytes:
    """The request, head and body, as sent. ``target`` is the path (or the absolute URL for a
    proxy, or ``host:port`` for ``CONNECT``); header values must not contain line breaks."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in headers:
        if "\r" in value or "\n" in value:
            raise ValueError(f"line break in the {name} header")
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parse_head(data: bytes) -> Head:
    """Parse a status line and headers ending in a blank line; raises :class:`TransportError`
    for anything that is not an HTTP/1.x answer head."""
    lines = data.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise TransportError(f"not an HTTP/1.1 answer: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    fields = [line for line in lines[1:] if line]
    if len(fields) > MAX_HEADERS:
        raise TransportError(f"answer has more than {MAX_HEADERS} headers")
    for line in fields:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise TransportError(f"malformed header in the answer: {line[:80]!r}")
        key, value = name.lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return Head(int(code), headers)


def body_framing(head: Head, method: str) -> Framing:
    """How the body after ``head`` is delimited (RFC 9112 section 6.3); raises
    :class:`TransportError` for a ``Content-Length`` that cannot be trusted."""
    if method == "HEAD" or head.status < 200 or head.status in (204, 304):
        return Framing("none")
    coding = head.headers.get("transfer-encoding")
    if coding is not None:
        chunked = coding.rsplit(",", 1)[-1].strip().lower() == "chunked"
        return Framing("chunked" if chunked else "close")
    length = head.headers.get("content-length")
    if length is None:
        return Framing("close")
    values = {value.strip() for value in length.split(",")}
    if len(values) != 1 or not (value := values.pop()).isdigit():
        raise TransportError(f"answer has an invalid Content-Length: {length[:40]!r}")
    return Framing("length", int(value))


def chunk_size(line: bytes) -> int:
    """The size on a chunk's first line (hex, extensions after ``;`` ignored)."""
    text = line.split(b";", 1)[0].strip()
    try:
        if not text or len(text) > 16:
            raise ValueError
        return int(text, 16)
    except ValueError:
        raise TransportError(f"malformed chunk size in the answer: {line[:40]!r}") from None


def decode_content(body: bytes | None, coding: str) -> bytes:
    """The body with its ``Content-Encoding`` (gzip, deflate or none) undone, at most
    :data:`MAX_ANSWER_BYTES` after decompression; ``None`` is a body that was already over the
    cap. Raises :class:`AnswerError` for an answer too large, an unknown coding or a corrupt
    one."""
    if body is None:
        raise AnswerError(f"answer is larger than {MAX_ANSWER_BYTES} bytes")
    coding = coding.strip().lower()
    if coding in ("", "identity"):
        return body
    wbits = {"gzip": 31, "x-gzip": 31, "deflate": 15}.get(coding)
    if wbits is None:
        raise AnswerError(f"answer has an unsupported Content-Encoding: {coding[:40]!r}")
    try:
        try:
            return _inflate(body, wbits)
        except zlib.error:
            if coding != "deflate":
                raise
            return _inflate(body, -15)  # raw deflate, as some servers send it
    except zlib.error as exc:
        raise AnswerError(f"answer's {coding} body is corrupt: {exc}") from None


def _inflate(body: bytes, wbits: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    data = inflater.decompress(body, MAX_ANSWER_BYTES + 1)
    if len(data) > MAX_ANSWER_BYTES:  # a compression bomb stops here, memory stays bounded
        raise AnswerError(f"answer is larger than {MAX_ANSWER_BYTES} bytes")
    if not inflater.eof:
        raise zlib.error("truncated")
    return data
