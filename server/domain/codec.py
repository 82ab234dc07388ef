"""JSON encoding for the hot path: orjson when installed and wanted, else the standard library.

Both paths produce compact JSON and raise ``ValueError`` (or ``RecursionError`` for the stdlib
on absurd nesting) on bad input, which ``protocol.parse_report`` turns into a 400.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class JsonCodec:
    name: str
    loads: Callable[[bytes], Any]
    dumps: Callable[[Any], bytes]


def _std_dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


STDLIB = JsonCodec("json", json.loads, _std_dumps)


def json_codec(fast: bool) -> JsonCodec:
    """orjson's codec when ``fast`` and orjson imports, else the standard library's."""
    if fast:
        try:
            import orjson
        except ImportError:
            return STDLIB
        return JsonCodec("orjson", orjson.loads, orjson.dumps)
    return STDLIB
