"""The OpenAPI 3.1 description of every route: ``openapi.json`` beside this module is the one
source; this module serves it with the mount prefix and server version filled in.

A test keeps it true: every route in ``routes.ROUTES`` is described and nothing else is, and a
fuzzer (schemathesis) checks live answers against it.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from importlib import resources
from typing import Any

from opa_telemetry_server import __version__

DOCUMENT = "openapi.json"
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
# aiohttp's "{name:regex}" path variables are OpenAPI's "{name}".
_VARIABLE = re.compile(r"\{(\w+):[^{}]*(?:\{[^{}]*\}[^{}]*)*\}")


@functools.cache
def _bundled() -> dict[str, Any]:
    text = resources.files(__package__).joinpath(DOCUMENT).read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def openapi_document(prefix: str = "") -> dict[str, Any]:
    """The document as served under ``prefix`` (a fresh copy the caller may change)."""
    document = copy.deepcopy(_bundled())
    document["info"]["version"] = __version__
    document["servers"] = [{"url": prefix or "/"}]
    return document


@functools.cache
def openapi_json(prefix: str = "") -> bytes:
    """:func:`openapi_document` encoded once per prefix."""
    return json.dumps(openapi_document(prefix), separators=(",", ":")).encode()


def openapi_path(route_path: str) -> str:
    """An aiohttp route path in OpenAPI's form: ``/r/{id:\\d+}/a`` -> ``/r/{id}/a``."""
    return _VARIABLE.sub(r"{\1}", route_path)


def documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    """Every ``(METHOD, path)`` the document describes."""
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
