"""opa-telemetry server: an OPA-compatible version-check and anonymous telemetry service.

Its dependencies come with the ``server`` extra (``pip install 'opa-telemetry[server]'``); the
client package installs without them. :func:`main` is the ``opa-telemetry-server`` command: it
says so in one line when they are missing, rather than with a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

# The distribution's one version. opa_telemetry (the client) states it too, and a test pins
# that the two and the installed metadata agree; neither package imports the other.
__version__ = "0.1.0"

__all__ = ["__version__", "main"]

_SERVER_DEPENDENCIES = ("aiohttp", "aiosqlite", "packaging", "prometheus_client")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``opa-telemetry-server``; returns the exit status."""
    try:
        from opa_telemetry_server.cli import main as cli_main
    except ModuleNotFoundError as exc:
        if exc.name not in _SERVER_DEPENDENCIES:
            raise
        print(
            f"error: the server needs the 'server' extra ({exc.name} is not installed): "
            "pip install 'opa-telemetry[server]'",
            file=sys.stderr,
        )
        return 1
    return cli_main(argv)
