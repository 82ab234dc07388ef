"""Exactly what a report sends, and why none of it identifies anyone.

A report is a User-Agent and a JSON body, byte-compatible with what OPA sends:

- User-Agent ``<product>/<version> (<os>, <arch>)``, with Go's names for the platform
  (``linux``, ``darwin``, ``windows``; ``amd64``, ``arm64``) — what any HTTP client tells anyway.
- ``id``: a random UUIDv4 made when the :class:`~opa_telemetry.Reporter` is created and kept
  only in memory, so one process run is one instance and two runs cannot be linked.
- ``version``: the product's version.
- ``heap_usage_bytes``: the process's resident memory, as a decimal string (OPA sends Go's
  heap size here); omitted where the platform cannot tell.
- extra keys only from gatherers the app developer passes explicitly.

The body is compact JSON with sorted keys and a trailing newline, as Go's encoder writes it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

Gatherer = Callable[[], Any]
RESERVED_KEYS = frozenset({"id", "version", "heap_usage_bytes"})

_GO_OS = {"linux": "linux", "darwin": "darwin", "win32": "windows", "cygwin": "windows"}
_GO_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "i386": "386",
    "i686": "386",
    "x86": "386",
    "armv7l": "arm",
    "armv6l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


class Payload(NamedTuple):
    """One report as it goes on the wire."""

    user_agent: str
    body: bytes


def go_os(system: str | None = None) -> str:
    """Go's GOOS for this interpreter's platform (``sys.platform`` when not given)."""
    name = system or sys.platform
    return _GO_OS.get(name, "freebsd" if name.startswith("freebsd") else name)


def go_arch(machine: str | None = None) -> str:
    """Go's GOARCH for this machine (``os.uname().machine`` when not given)."""
    name = (machine or _machine() or "unknown").lower()
    return _GO_ARCH.get(name, name)


def _machine() -> str:
    # os.uname rather than platform.machine(): importing platform costs ~2 ms (see __init__).
    if hasattr(os, "uname"):
        return os.uname().machine
    import platform  # Windows only

    return platform.machine()


def new_instance_id() -> str:
    """A random UUIDv4 as text, from ``os.urandom`` (what ``uuid.uuid4`` does, without the
    ~2 ms import of ``uuid``, which also imports ``platform``)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def user_agent(
    product: str, version: str, os_name: str | None = None, arch: str | None = None
) -> str:
    """``<product>/<version> (<os>, <arch>)``, e.g. ``Open Policy Agent/1.6.0 (linux, amd64)``."""
    return f"{product}/{version} ({os_name or go_os()}, {arch or go_arch()})"


def check_product_name(product: str) -> str:
    """Return ``product`` if it can stand in a User-Agent token; raise ValueError otherwise."""
    if not product or not product[0].isalpha() or any(c in product for c in '/()\r\n"'):
        raise ValueError(f'product name {product!r} must start with a letter and contain no /()"')
    return product


def resident_memory_bytes() -> int | None:
    """The process's current resident memory in bytes, or ``None`` where unknown.

    Linux reads ``/proc/self/statm``; elsewhere the peak resident size from ``getrusage``.
    """
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def build_body(
    instance_id: str,
    version: str,
    heap_usage_bytes: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """The JSON body: compact, sorted keys, trailing newline; extra keys cannot override ours."""
    document: dict[str, Any] = {k: v for k, v in (extra or {}).items() if k not in RESERVED_KEYS}
    document["id"] = instance_id
    document["version"] = version
    if heap_usage_bytes is not None:
        document["heap_usage_bytes"] = str(heap_usage_bytes)
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def gather(gatherers: Mapping[str, Gatherer]) -> dict[str, Any]:
    """Call each gatherer; one that fails or returns non-JSON is left out (logged at DEBUG)."""
    values: dict[str, Any] = {}
    for key, gatherer in gatherers.items():
        try:
            value = gatherer()
            json.dumps(value)
        except Exception:
            logger.debug("gatherer %r failed; left out of the report", key, exc_info=True)
            continue
        values[key] = value
    return values


def build_payload(
    product: str,
    version: str,
    instance_id: str,
    *,
    gatherers: Mapping[str, Gatherer] | None = None,
    heap_usage_bytes: int | None = None,
    os_name: str | None = None,
    arch: str | None = None,
) -> Payload:
    """The User-Agent and body of one report (memory read now unless given)."""
    heap = resident_memory_bytes() if heap_usage_bytes is None else heap_usage_bytes
    body = build_body(instance_id, version, heap, gather(gatherers or {}))
    return Payload(user_agent(product, version, os_name, arch), body)
