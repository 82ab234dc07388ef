"""One POST with a timeout -> a parsed answer. The only client module that imports aiohttp.

It is imported lazily, in a worker thread, the first time a report goes out, so that importing
``opa_telemetry`` and calling :meth:`Reporter.start` never pay for aiohttp's import and TLS
context set-up on the host app's path.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp

from .answer import LatestRelease, parse_answer
from .errors import AnswerError, RequestTimeoutError, ServiceError, TransportError
from .payload import Payload

MAX_ANSWER_BYTES = 64 * 1024
MAX_RETRY_AFTER = 24 * 3600.0
MAX_REDIRECTS = 3


def new_session() -> aiohttp.ClientSession:
    """A session that honours ``HTTP(S)_PROXY``/``NO_PROXY``, as OPA's client does."""
    return aiohttp.ClientSession(trust_env=True)


async def post_report(
    session: aiohttp.ClientSession, url: str, payload: Payload, timeout: float
) -> LatestRelease:
    """Send one report and return the parsed answer; no retries.

    ``timeout`` bounds the whole exchange (connect, send, read). Raises
    :class:`RequestTimeoutError`, :class:`TransportError`, :class:`ServiceError` or
    :class:`AnswerError`; reads at most ``MAX_ANSWER_BYTES`` of any answer.
    """
    headers = {"User-Agent": payload.user_agent, "Content-Type": "application/json"}
    try:
        async with (
            asyncio.timeout(timeout),
            session.post(
                url, data=payload.body, headers=headers, max_redirects=MAX_REDIRECTS
            ) as response,
        ):
            body = await _read_capped(response.content)
            status, retry_after = response.status, response.headers.get("Retry-After")
    except TimeoutError:
        raise RequestTimeoutError(f"no answer from {url} within {timeout:g}s") from None
    except aiohttp.ClientError as exc:
        raise TransportError(f"{type(exc).__name__}: {exc}") from None
    if status != 200:
        raise ServiceError(status, _error_message(body), _retry_after_seconds(retry_after))
    if body is None:
        raise AnswerError(f"answer is larger than {MAX_ANSWER_BYTES} bytes")
    return parse_answer(body)


async def _read_capped(stream: aiohttp.StreamReader) -> bytes | None:
    """Read the whole body, or ``None`` as soon as it exceeds the cap (memory stays bounded)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await stream.read(16 * 1024):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _error_message(body: bytes | None) -> str:
    try:
        message = json.loads(body or b"").get("error", "")
    except (ValueError, AttributeError, RecursionError):
        return ""
    return message[:200] if isinstance(message, str) else ""


def _retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds, clamped to a day so no header can silence us forever."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    if seconds is None or seconds != seconds or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER)
