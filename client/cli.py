"""``opa-telemetry``: ``check`` prints what ``opa version --check`` prints; ``report`` sends one
report, or with ``--dry-run`` prints exactly what would be sent and sends nothing.

Standard output holds only the answer, byte for byte what OPA prints for it. Every failure is
one line on standard error, ``error: <reason>``, with exit status 2 for a usage error (a bad
flag, product name or service URL) and 1 for a failure at run time (no answer, an error from
the service). OPA itself prints ``Error: <reason>`` on standard output and exits 1; here a
script that reads the answer never reads an error instead.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from .answer import LatestRelease
from .config import SERVICE_URL_ENV, do_not_track, service_base_url, version_url
from .errors import TelemetryError, TransportError
from .payload import check_product_name
from .reporter import Reporter, check_latest
from .transport import Target

DEFAULT_PRODUCT = "Open Policy Agent"


class UsageError(Exception):
    """An argument or setting the command cannot use (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (``error: --timeout: ...``) and exit 2."""

    def error(self, message: str) -> NoReturn:
        message = message.removeprefix("argument ")
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``opa-telemetry`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        code = _check(args) if args.command == "check" else _report(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except UsageError as exc:
        return _fail(str(exc), 2)
    except TelemetryError as exc:
        return _fail(str(exc), 1)
    except BrokenPipeError:  # ``opa-telemetry check | head -1``: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    return code


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="opa-telemetry",
        description="Ask an opa-telemetry (or OPA-compatible) service for the latest release.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = Parser(add_help=False)
    common.add_argument(
        "--url",
        help=f"service base URL (default: ${SERVICE_URL_ENV}, else {service_base_url(None, {})})",
    )
    common.add_argument(
        "--product",
        type=_product_name,
        default=DEFAULT_PRODUCT,
        help=f"product name (default: {DEFAULT_PRODUCT})",
    )
    common.add_argument(
        "--version",
        dest="product_version",
        type=_version_text,
        default="0.0.0",
        metavar="VERSION",
        help="version to report (default 0.0.0, which is older than any release)",
    )
    common.add_argument("--timeout", type=_seconds, default=5.0, help="seconds (default 5)")
    commands.add_parser("check", parents=[common], help="print the latest release")
    report = commands.add_parser("report", parents=[common], help="send one report")
    report.add_argument("--dry-run", action="store_true", help="print it, send nothing")
    return parser


def _product_name(text: str) -> str:
    try:
        return check_product_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _version_text(text: str) -> str:
    if not text or "\r" in text or "\n" in text:  # it goes into the User-Agent header
        raise argparse.ArgumentTypeError(f"expected a version on one line, not {text!r}")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):  # NaN too
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text!r}")
    return value


def _service_url(args: argparse.Namespace) -> str:
    """The base URL from ``--url`` or the environment; a :class:`UsageError` when it is not
    one the client can send to."""
    base = service_base_url(args.url)
    try:
        Target.parse(version_url(base))
    except TransportError as exc:
        raise UsageError(f"{'--url' if args.url else f'${SERVICE_URL_ENV}'}: {exc}") from None
    return base


def _print_latest(latest: LatestRelease) -> None:
    if latest.complete:
        # As OPA prints it: the tag with a leading "v" (only a lower-case one) trimmed.
        print(f"Latest Upstream Version: {(latest.latest_release or '').removeprefix('v')}")
        print(f"Download: {latest.download}")
        print(f"Release Notes: {latest.release_notes}")
        _print_advisories(latest)
    else:
        print()  # OPA prints its empty banner as an empty line
        print("The service knows no release of this product.", file=sys.stderr)


def _print_advisories(latest: LatestRelease) -> None:
    """After OPA's three lines (unchanged), what the service says about this version."""
    support = latest.support
    if support is not None and support.status != "supported":
        detail = support.reason or (f"below {support.min_version}" if support.min_version else "")
        notice = f" ({support.notice})" if support.notice else ""
        print(f"Support: {support.status}{f': {detail}' if detail else ''}{notice}")
    for a in latest.advisories:
        fixed = f", fixed in {a.fixed}" if a.fixed else ""
        print(f"Advisory: {a.id} ({a.severity or 'severity unknown'}{fixed}) {a.summary}"
              f"{f' {a.url}' if a.url else ''}")  # fmt: skip


def _check(args: argparse.Namespace) -> int:
    url = _service_url(args)
    latest = asyncio.run(
        check_latest(args.product, args.product_version, url=url, timeout=args.timeout)
    )
    _print_latest(latest)
    return 0


def _report(args: argparse.Namespace) -> int:
    reporter = Reporter(args.product, args.product_version, url=_service_url(args))
    if args.dry_run:
        payload = reporter.payload()
        print(f"POST {reporter.url}")
        print(f"User-Agent: {payload.user_agent}")
        print("Content-Type: application/json")
        print()
        sys.stdout.write(payload.body.decode())
        if do_not_track():
            print("(DO_NOT_TRACK is set: a reporter would send nothing)", file=sys.stderr)
        return 0
    if do_not_track():
        print("DO_NOT_TRACK is set: nothing sent", file=sys.stderr)
        return 0
    return _check(args)


def loadtest_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``opa-telemetry-loadtest`` (needs the ``loadtest`` extra)."""
    try:
        from .loadtest import main as run_loadtest
    except ImportError as exc:
        print(
            f"error: the load tester needs the 'loadtest' extra: "
            f"pip install 'opa-telemetry[loadtest]' ({exc})",
            file=sys.stderr,
        )
        return 2
    return run_loadtest(argv)
