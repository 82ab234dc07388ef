"""``opa-telemetry``: ``check`` prints what ``opa version --check`` prints; ``report`` sends one
report, or with ``--dry-run`` prints exactly what would be sent and sends nothing."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from . import __version__
from .answer import LatestRelease
from .config import SERVICE_URL_ENV, do_not_track, service_base_url
from .errors import TelemetryError
from .reporter import Reporter, check_latest

DEFAULT_PRODUCT = "Open Policy Agent"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``opa-telemetry`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.timeout <= 0:
        print("Error: --timeout must be positive", file=sys.stderr)
        return 2
    if args.command == "check":
        return _check(args)
    return _report(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opa-telemetry",
        description="Ask an opa-telemetry (or OPA-compatible) service for the latest release.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        help=f"service base URL (default: ${SERVICE_URL_ENV}, else {service_base_url(None, {})})",
    )
    common.add_argument(
        "--product", default=DEFAULT_PRODUCT, help=f"product name (default: {DEFAULT_PRODUCT})"
    )
    common.add_argument(
        "--version",
        dest="product_version",
        default="0.0.0",
        metavar="VERSION",
        help="version to report (default 0.0.0, which is older than any release)",
    )
    common.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    commands.add_parser("check", parents=[common], help="print the latest release")
    report = commands.add_parser("report", parents=[common], help="send one report")
    report.add_argument("--dry-run", action="store_true", help="print it, send nothing")
    return parser


def _print_latest(latest: LatestRelease) -> None:
    if latest.complete:
        print(f"Latest Upstream Version: {latest.version}")
        print(f"Download: {latest.download}")
        print(f"Release Notes: {latest.release_notes}")
        _print_advisories(latest)
    else:
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
    try:
        latest = asyncio.run(
            check_latest(args.product, args.product_version, url=args.url, timeout=args.timeout)
        )
    except (TelemetryError, ValueError) as exc:
        print(f"Error: {exc}")
        return 1
    _print_latest(latest)
    return 0


def _report(args: argparse.Namespace) -> int:
    try:
        reporter = Reporter(args.product, args.product_version, url=args.url)
    except ValueError as exc:
        print(f"Error: {exc}")
        return 1
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
