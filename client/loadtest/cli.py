"""``opa-telemetry-loadtest``: arguments in, a summary and an exit status out.

Exit status: 0 when at most ``--max-failure-ratio`` of the requests failed (an error or a
non-2xx answer) and at least one succeeded; 1 when the load failed that test or the ``--json``
file cannot be written (checked before the run); 2 for a bad argument or a refused target.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, TextIO

from .runner import LoadConfig, run_processes
from .target import LoadTestError, check_loopback, parse_target

MAX_DURATION = 3600.0
DEFAULT_MAX_FAILURE_RATIO = 0.01
RATE_LIMIT_HINT = (
    "most answers were 429 (rate limited): all of the load comes from one address, so start "
    'the server with --rate-limit 0 (in this repository: make run ARGS="--rate-limit 0")'
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opa-telemetry-loadtest",
        description="Load-test an OPA-compatible telemetry server with simulated reporters.",
        epilog="Exit status: 0 when at most --max-failure-ratio of the requests failed and at "
        "least one succeeded, 1 when not (or when the --json file cannot be written), 2 for a "
        "bad argument.",
    )
    parser.add_argument("url", help="server base URL, e.g. http://127.0.0.1:9181")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="closed loop: connections, each sending as soon as answered (64)",
    )
    mode.add_argument("--rate", type=float, help="open loop: requests per second, on a schedule")
    parser.add_argument(
        "--connections", type=int, default=256, help="open loop: most connections in flight (256)"
    )
    parser.add_argument(
        "--new-connection",
        action="store_true",
        help="one request per TCP connection, as a real fleet reports (default: keep-alive)",
    )
    parser.add_argument("--duration", type=float, help="seconds to run (default 10)")
    parser.add_argument("--requests", type=int, help="stop after this many requests")
    parser.add_argument(
        "--instances", type=int, help="distinct simulated instances (default: 4 per connection)"
    )
    parser.add_argument(
        "--check-ratio",
        type=float,
        default=0.0,
        help="fraction of requests that are OPA >= 1.7 release checks (0)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="load-generating processes; their histograms are merged (1)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request (5)")
    parser.add_argument("--seed", type=int, help="random seed, for a repeatable fleet")
    parser.add_argument(
        "--max-failure-ratio",
        type=float,
        default=DEFAULT_MAX_FAILURE_RATIO,
        metavar="F",
        help="exit 1 when more than this fraction of requests fail (errors and non-2xx answers)"
        f" ({DEFAULT_MAX_FAILURE_RATIO:g})",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="also write the result as JSON; '-' writes only the JSON to stdout (the summary "
        "then goes to stderr)",
    )
    parser.add_argument(
        "--allow-remote", action="store_true", help="allow a target outside the loopback range"
    )
    parser.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop")
    return parser


def config_from_args(args: argparse.Namespace, live: bool) -> LoadConfig:
    """A validated :class:`LoadConfig`; raises LoadTestError for out-of-range values."""
    duration = args.duration if args.duration is not None else (
        None if args.requests is not None else 10.0)  # fmt: skip
    problems = []
    if duration is not None and not 0 < duration <= MAX_DURATION:
        problems.append(f"--duration must be in (0, {MAX_DURATION:g}]")
    if args.requests is not None and args.requests < 1:
        problems.append("--requests must be at least 1")
    if args.rate is not None and args.rate <= 0:
        problems.append("--rate must be positive")
    if args.instances is not None and not 1 <= args.instances <= 1_000_000:
        problems.append("--instances must be between 1 and 1,000,000")
    if args.concurrency < 1 or args.connections < 1 or args.processes < 1:
        problems.append("--concurrency, --connections and --processes must be at least 1")
    if not 0 <= args.check_ratio <= 1:
        problems.append("--check-ratio must be between 0 and 1")
    if not 0 <= args.max_failure_ratio <= 1:
        problems.append("--max-failure-ratio must be between 0 and 1")
    if args.timeout <= 0:
        problems.append("--timeout must be positive")
    if problems:
        raise LoadTestError("; ".join(problems))
    target = parse_target(args.url)
    if not args.allow_remote:
        check_loopback(target.host)
    return LoadConfig(
        target=target,
        concurrency=args.connections if args.rate else args.concurrency,
        rate=args.rate,
        duration=duration,
        requests=args.requests,
        instances=args.instances,
        check_ratio=args.check_ratio,
        timeout=args.timeout,
        seed=args.seed,
        new_connection=args.new_connection,
        live=live,
    )


def verdict(summary: dict[str, Any], max_failure_ratio: float) -> str | None:
    """Why the run failed (``None`` when it passed): nothing succeeded, or too much failed."""
    if not summary["succeeded"]:
        return "no request succeeded"
    if summary["failure_ratio"] > max_failure_ratio:
        return (
            f"{summary['failure_ratio']:.2%} of requests failed (errors and non-2xx answers),"
            f" more than --max-failure-ratio {max_failure_ratio:g}"
        )
    return None


def mostly_rate_limited(summary: dict[str, Any]) -> bool:
    rate_limited = int(summary["statuses"].get("429", 0))
    return rate_limited * 2 > int(summary["completed"])


def format_summary(summary: dict[str, Any], config: LoadConfig, processes: int,
                   max_failure_ratio: float = DEFAULT_MAX_FAILURE_RATIO) -> str:  # fmt: skip
    mode = (f"open loop at {config.rate:g} req/s over up to {config.concurrency} connections"
            if config.rate else f"closed loop, {config.concurrency} connections")  # fmt: skip
    if config.new_connection:
        mode += ", a new connection per request"
    lat = summary["latency_ms"]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    statuses = "  ".join(f"{k}: {v:,}" for k, v in summary["statuses"].items()) or "none"
    errors = "  ".join(f"{k}: {v:,}" for k, v in summary["errors"].items()) or "none"
    failed = verdict(summary, max_failure_ratio)
    lines = [
        f"target      {config.target.url}  ({mode}, {processes} process(es))",
        f"duration    {summary['duration_s']:.2f} s",
        f"requests    {summary['completed']:,} answered of {summary['requests']:,} sent"
        f"  ({summary['throughput_rps']:,.1f} req/s)",
        f"latency ms  p50 {cell(lat['p50'])}  p90 {cell(lat['p90'])}  p99 {cell(lat['p99'])}"
        f"  p99.9 {cell(lat['p99.9'])}  max {cell(lat['max'])}",
        f"statuses    {statuses}",
        f"errors      {errors}",
        f"stored      {summary['reports_acknowledged']:,} reports acknowledged with 200"
        " (the server must have stored each)",
        f"result      FAILED: {failed}" if failed else
        f"result      ok: {summary['failure_ratio']:.2%} failed"
        f" (at most {max_failure_ratio:.2%} allowed)",
    ]  # fmt: skip
    if mostly_rate_limited(summary):
        lines.append(f"hint        {RATE_LIMIT_HINT}")
    return "\n".join(lines)


def open_json(path: str | None) -> TextIO | None:
    """The stream ``--json`` writes to, opened now so that an unwritable path fails before
    the run; an existing file keeps its content until the result replaces it."""
    if path is None:
        return None
    if path == "-":
        return sys.stdout
    try:
        return open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise LoadTestError(f"cannot write --json {path}: {exc.strerror or exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``opa-telemetry-loadtest``; returns the exit status (see above)."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args, live=sys.stderr.isatty())
    except LoadTestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        json_out = open_json(args.json)
    except LoadTestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        result = run_processes(config, args.processes, use_uvloop=not args.no_uvloop)
        summary = result.summary()
        human = sys.stderr if json_out is sys.stdout else sys.stdout
        print(format_summary(summary, config, args.processes, args.max_failure_ratio), file=human)
        failed = verdict(summary, args.max_failure_ratio)
        if json_out is not None:
            document = {
                "config": {**asdict(config), "target": config.target.url,
                           "processes": args.processes,
                           "max_failure_ratio": args.max_failure_ratio},
                **summary,
                "passed": failed is None,
            }  # fmt: skip
            if json_out is not sys.stdout:
                json_out.seek(0)
                json_out.truncate()
            json_out.write(json.dumps(document, indent=1) + "\n")
            json_out.flush()
    finally:
        if json_out is not None and json_out is not sys.stdout:
            json_out.close()
    return 1 if failed else 0
