"""``opa-telemetry-server``: serve, manage the release catalog, print statistics.

The only package that reads ``sys.argv`` or ``os.environ``: ``arguments`` turns them into
:class:`Settings` for every subcommand, ``catalog`` and ``fleet`` hold the commands that work on
the database, ``runner`` runs the server and its workers. Every failure is one line on stderr.
The web stack (aiohttp, the app) is imported only by the commands that need it, so that
``stats`` and ``releases`` start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Mapping, Sequence

from opa_telemetry_server import __version__
from opa_telemetry_server.cli import catalog, fleet
from opa_telemetry_server.cli.arguments import (
    Parser,
    add_settings_flags,
    settings_from_args,
    with_github_token,
)
from opa_telemetry_server.errors import TelemetryError, UsageError, describe

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``opa-telemetry-server`` console script; returns the exit status.

    Every failure is one line on stderr: exit 2 for a usage error (a bad flag or env var),
    1 for a runtime failure; ``--debug`` adds the traceback.
    """
    parser = build_parser(os.environ)
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
    except UsageError as exc:
        return _fail(args, f"{exc}", 2)
    except BrokenPipeError:
        # ``releases list | head``: the reader left; say nothing and let the pipe go quietly.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (TelemetryError, OSError) as exc:
        return _fail(args, describe(exc), 1)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, the traceback on --debug
        return _fail(args, f"unexpected {type(exc).__name__}: {exc} (--debug shows where)", 1)
    return result


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    if getattr(args, "debug", False):
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    return code


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The whole command line. ``environ`` supplies defaults through the settings' env vars;
    a bad value there is only reported by a subcommand that reads that setting."""
    parser = Parser(
        prog="opa-telemetry-server",
        description="OPA-compatible version-check and anonymous telemetry server.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of failures")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )

    serve = commands.add_parser("serve", help="run the HTTP server")
    add_settings_flags(serve, environ)
    serve.set_defaults(run=_run_serve)

    catalog.add_commands(commands, environ)
    fleet.add_commands(commands, environ)
    return parser


def _run_serve(args: argparse.Namespace) -> int:
    from opa_telemetry_server.cli.runner import run_server

    return run_server(with_github_token(settings_from_args(args), os.environ))
