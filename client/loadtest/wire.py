"""A minimal HTTP/1.1 client: one connection, one request in flight, answers read by length.

Spoken by a small :class:`asyncio.Protocol` rather than a general-purpose client, so that one
process can outrun the server it measures.
"""

from __future__ import annotations

import asyncio
from typing import cast

from .target import Target

MAX_HEAD_BYTES = 65536


class BadAnswerError(Exception):
    """The server's answer is not valid HTTP, or not the answer a report expects."""


class HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 connection with at most one request in flight."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc or ConnectionResetError("connection closed"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiter is None or self._waiter.done():
            return
        try:
            answer = self._parse()
        except BadAnswerError as exc:
            self._waiter.set_exception(exc)
            return
        if answer is not None:
            self._waiter.set_result(answer)

    def _parse(self) -> tuple[int, bytes] | None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                raise BadAnswerError("header too long")
            return None
        head = bytes(self._buffer[:end]).split(b"\r\n")
        status_line = head[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
            raise BadAnswerError("not an HTTP/1.x status line")
        try:
            status = int(status_line[1])
        except ValueError:
            raise BadAnswerError("status is not a number") from None
        length = None
        for line in head[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise BadAnswerError("Content-Length is not a number") from None
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                return self._parse_chunked(status, end + 4)
        if length is None:
            raise BadAnswerError("answer without Content-Length")
        if len(self._buffer) < end + 4 + length:
            return None
        body = bytes(self._buffer[end + 4 : end + 4 + length])
        del self._buffer[: end + 4 + length]
        return status, body

    def _parse_chunked(self, status: int, start: int) -> tuple[int, bytes] | None:
        position, body = start, bytearray()
        while True:
            line_end = self._buffer.find(b"\r\n", position)
            if line_end < 0:
                return None
            try:
                size = int(bytes(self._buffer[position:line_end]).split(b";")[0], 16)
            except ValueError:
                raise BadAnswerError("bad chunk size") from None
            if len(self._buffer) < line_end + 2 + size + 2:
                return None
            body += self._buffer[line_end + 2 : line_end + 2 + size]
            position = line_end + 2 + size + 2
            if size == 0:
                del self._buffer[:position]
                return status, bytes(body)

    async def request(self, data: bytes) -> tuple[int, bytes]:
        """Send one request and wait for its complete answer: (status, body)."""
        if self._transport is None or self.closed:
            raise ConnectionResetError("connection closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(data)
        return await self._waiter

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._transport is not None:
            self._transport.close()


async def connect(target: Target) -> HttpConnection:
    """Open one TCP connection to ``target``; raises ``OSError`` (refused, unreachable...)."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(HttpConnection, target.host, target.port)
    return protocol
