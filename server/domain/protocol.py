"""Pure: the wire protocol of ``POST /v1/version``, as real OPA binaries speak it.

Parses the User-Agent into a :class:`ClientInfo` and the JSON body into a :class:`Report`, and
renders the ``latest`` answer. Nothing here touches HTTP or SQL, so it is tested without a loop.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from opa_telemetry_server.domain.versions import Version, VersionError, parse_version
from opa_telemetry_server.errors import ReportError

DEFAULT_PRODUCT = "opa"
MAX_USER_AGENT_LENGTH = 512
MAX_HEAP_USAGE_BYTES = 2**63 - 1
MAX_KEYS = 64  # OPA sends 3-4 keys; Enterprise OPA's gatherers add a handful

# The User-Agent product names OPA has used over the years; all of them are one product.
_OPA_NAMES = frozenset({"open policy agent", "open-policy-agent"})

# "<name>/<version>" tokens: names may contain spaces ("Open Policy Agent/1.5.1",
# "Enterprise OPA/1.2.0 Open Policy Agent/1.5.1"); versions have no spaces or slashes.
_PRODUCT_TOKEN = re.compile(r"([A-Za-z][A-Za-z0-9 ._-]*?)/(\S+?)(?=\s|$)")
# "(linux, amd64)" at the end: Go's GOOS and GOARCH.
_PLATFORM = re.compile(r"\(\s*([A-Za-z0-9_]{1,32})\s*,\s*([A-Za-z0-9_]{1,32})\s*\)\s*$")
_SLUG_JUNK = re.compile(r"[^a-z0-9._-]+")
# The canonical 8-4-4-4-12 hex form OPA sends (any UUID version; stored lowercase).
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """What the User-Agent tells: the product (a slug such as ``opa``) and its platform."""

    product: str
    os: str | None = None
    arch: str | None = None


class Report(NamedTuple):
    """One validated report: exactly what may be stored about one instance at one moment.

    A named tuple rather than a frozen dataclass: one is built per request, and a tuple is
    several times cheaper to build.
    """

    product: str
    instance_id: str
    version: Version
    os: str | None
    arch: str | None
    heap_usage_bytes: int | None
    min_compatible_version: str | None
    extra: str | None = None  # JSON of the allow-listed keys the report carried


def product_slug(name: str) -> str:
    """Turn a User-Agent product name into a product slug: ``My App`` -> ``my-app``.

    OPA's names (``Open Policy Agent``, ``Open-Policy-Agent``) all map to ``opa``. Returns ``""``
    when nothing usable is left.
    """
    lowered = name.strip().lower()
    if lowered in _OPA_NAMES:
        return DEFAULT_PRODUCT
    return _SLUG_JUNK.sub("-", lowered).strip("-._")[:64]


@functools.lru_cache(maxsize=1024)  # a fleet sends few distinct User-Agents
def parse_user_agent(header: str | None, default_product: str = DEFAULT_PRODUCT) -> ClientInfo:
    """Read product and platform from a User-Agent; never raises.

    The product is the last ``name/version`` token's name, so Enterprise OPA's
    ``Enterprise OPA/1.2.0 Open Policy Agent/1.5.1 (linux, amd64)`` is ``opa``. Surrounding
    quotes (the docs' sample) are ignored. A missing, oversized or unrecognised header gives
    ``default_product`` with an unknown platform: such reports are still accepted.
    """
    if not header or len(header) > MAX_USER_AGENT_LENGTH:
        return ClientInfo(default_product)
    text = header.strip().strip('"').strip()
    os_name = arch = None
    platform = _PLATFORM.search(text)
    if platform:
        os_name, arch = platform.group(1).lower(), platform.group(2).lower()
        text = text[: platform.start()].rstrip()
    tokens = _PRODUCT_TOKEN.findall(text)
    product = product_slug(tokens[-1][0]) if tokens else ""
    return ClientInfo(product or default_product, os_name, arch)


def parse_report(
    body: bytes,
    client: ClientInfo,
    loads: Callable[[bytes], Any],
    extra_keys: frozenset[str] = frozenset(),
    extra_max_bytes: int = 1024,
) -> Report:
    """Validate a ``POST /v1/version`` body into a :class:`Report`.

    Accepts ``version`` with or without ``v``, ``heap_usage_bytes`` as a decimal string or a
    JSON integer, an empty ``min_compatible_version`` and any unknown keys. Unknown keys are
    dropped unless named in ``extra_keys``; those are kept as one JSON object of at most
    ``extra_max_bytes`` (keys whose values do not fit are dropped, in name order). Raises
    :class:`ReportError` naming every invalid field at once.
    """
    try:
        document = loads(body)
    except RecursionError:
        raise ReportError("body is not valid JSON", ["nested too deeply"]) from None
    except (ValueError, UnicodeDecodeError) as exc:
        # orjson.JSONDecodeError and json.JSONDecodeError are both ValueErrors.
        raise ReportError("body is not valid JSON", [str(exc)[:200]]) from None
    if not isinstance(document, dict):
        raise ReportError("body must be a JSON object", [f"got {type(document).__name__}"])
    if len(document) > MAX_KEYS:
        raise ReportError("too many keys", [f"at most {MAX_KEYS} top-level keys"])

    problems: list[str] = []
    instance_id = _instance_id(document, problems)
    version = _version(document, "version", problems, required=True)
    heap = _heap_usage(document, problems)
    min_compatible = _version(document, "min_compatible_version", problems, required=False)
    if problems:
        raise ReportError("invalid report", problems)
    assert instance_id is not None and version is not None
    # Positional: a third cheaper than keywords, on the hot path (fields in declaration order).
    return Report(
        client.product,
        instance_id,
        version,
        client.os,
        client.arch,
        heap,
        min_compatible.text if min_compatible else None,
        _extra(document, extra_keys, extra_max_bytes) if extra_keys else None,
    )


def _extra(document: Mapping[str, Any], keys: frozenset[str], limit: int) -> str | None:
    kept: dict[str, Any] = {}
    size = 2  # the braces
    for key in sorted(keys & document.keys()):
        piece = json.dumps({key: document[key]}, separators=(",", ":"), sort_keys=True)
        cost = len(piece.encode()) - 2 + (1 if kept else 0)  # the entry and its comma
        if size + cost <= limit:
            kept[key] = document[key]
            size += cost
    return json.dumps(kept, separators=(",", ":"), sort_keys=True) if kept else None


def _instance_id(document: Mapping[str, Any], problems: list[str]) -> str | None:
    value = document.get("id")
    if value is None:
        problems.append("id: required")
        return None
    if not isinstance(value, str) or not _UUID.fullmatch(value):
        problems.append("id: not a UUID (expected like 'a72dc36a-72db-458d-9208-9be4189e4ab7')")
        return None
    return value.lower()


def _version(
    document: Mapping[str, Any], key: str, problems: list[str], *, required: bool
) -> Version | None:
    value = document.get(key)
    if value is None or (value == "" and not required):
        if required:
            problems.append(f"{key}: required")
        return None
    if not isinstance(value, str):
        problems.append(f"{key}: must be a string")
        return None
    try:
        return parse_version(value)
    except VersionError as exc:
        problems.append(f"{key}: not a version ({exc})")
        return None


def _heap_usage(document: Mapping[str, Any], problems: list[str]) -> int | None:
    value = document.get("heap_usage_bytes")
    if value is None:
        return None
    # OPA sends Go's MemStats.Alloc as a decimal string; a JSON integer is accepted too.
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        problems.append("heap_usage_bytes: must be a non-negative integer or decimal string")
        return None
    if not 0 <= number <= MAX_HEAP_USAGE_BYTES:
        problems.append("heap_usage_bytes: out of range")
        return None
    return number
