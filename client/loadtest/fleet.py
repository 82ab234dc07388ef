"""The simulated fleet: what each OPA instance sends, as request bytes built once.

Each simulated reporter is a distinct instance (its own UUID, a version drawn from a realistic
mix of OPA's releases and ``-dev`` builds, a platform, one of OPA's User-Agent forms), and its
body is built with the client's own :mod:`opa_telemetry.payload`, so the load cannot drift
from the wire format.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence

from opa_telemetry.payload import build_body, user_agent

from .target import Target

PLATFORMS = (  # (os, arch, weight): a fleet that is mostly linux/amd64 servers
    ("linux", "amd64", 70), ("linux", "arm64", 12), ("darwin", "arm64", 8),
    ("darwin", "amd64", 5), ("windows", "amd64", 5),
)  # fmt: skip
CHECK_PATH = "/repos/open-policy-agent/opa/releases/latest"
# The OPA releases a simulated fleet runs, newest first. The fleet's own list: the load tester
# never reads the server package's files (a test checks each is a release the server knows).
OPA_VERSIONS = (
    "1.20.2", "1.20.1", "1.20.0", "1.19.1", "1.19.0", "1.18.2", "1.18.1", "1.18.0", "1.17.1",
    "1.17.0", "1.16.2", "1.16.1", "1.16.0", "1.15.2", "1.15.1", "1.15.0", "1.14.1", "1.14.0",
    "1.13.2", "1.13.1", "1.13.0", "1.12.3", "1.12.2", "1.12.1", "1.12.0", "1.11.1", "1.11.0",
    "1.10.1", "1.10.0", "1.9.0", "1.8.0", "1.7.1", "1.7.0", "1.6.0", "1.5.1", "1.5.0", "1.4.2",
    "1.4.1", "1.4.0", "1.3.0", "1.2.0", "1.1.0", "1.0.1", "1.0.0", "0.70.0", "0.69.0", "0.68.0",
    "0.67.1", "0.67.0", "0.66.0", "0.65.0", "0.64.1", "0.64.0", "0.63.0", "0.62.1", "0.62.0",
    "0.61.0", "0.60.0", "0.59.0", "0.58.0", "0.57.1", "0.57.0", "0.56.0", "0.55.0", "0.54.0",
    "0.53.1", "0.53.0", "0.52.0", "0.51.0", "0.50.2", "0.50.1", "0.50.0", "0.49.2", "0.49.1",
    "0.49.0", "0.48.0", "0.47.4", "0.47.3", "0.47.2", "0.47.1", "0.47.0", "0.46.3", "0.46.2",
    "0.46.1", "0.46.0", "0.45.0", "0.44.0", "0.43.1", "0.43.0", "0.42.2", "0.42.1", "0.42.0",
    "0.41.0", "0.40.0", "0.39.0", "0.38.1", "0.38.0", "0.37.2", "0.37.1", "0.37.0", "0.36.1",
    "0.36.0", "0.35.0", "0.34.2", "0.34.1", "0.34.0", "0.33.1", "0.33.0", "0.32.1", "0.32.0",
    "0.31.0", "0.30.2", "0.30.1", "0.30.0", "0.29.4", "0.29.3", "0.29.2", "0.29.1", "0.29.0",
    "0.28.0", "0.27.1", "0.27.0", "0.26.0", "0.25.2", "0.25.1", "0.25.0", "0.24.0", "0.23.2",
    "0.23.1", "0.23.0", "0.22.0", "0.21.1", "0.21.0", "0.20.5", "0.20.4", "0.20.3", "0.20.2",
    "0.20.1", "0.20.0",
)  # fmt: skip


def version_mix(versions: Sequence[str], rng: random.Random, count: int) -> list[str]:
    """``count`` versions as a fleet runs them: mostly recent releases (weight falls with age),
    a long tail of old ones, and about 3% ``-dev`` builds of the next minor version."""
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(versions))]
    major, minor, _ = (int(part) for part in versions[0].split("-")[0].split("."))
    dev = f"{major}.{minor + 1}.0-dev"
    return [dev if rng.random() < 0.03 else rng.choices(versions, weights)[0] for _ in range(count)]


def opa_user_agent(version: str, os_name: str, arch: str, rng: random.Random) -> str:
    """One of OPA's real User-Agent forms, as the given version would send it."""
    roll = rng.random()
    if roll < 0.03:
        return f"Enterprise OPA/1.2.0 {user_agent('Open Policy Agent', version, os_name, arch)}"
    if roll < 0.04:
        return f'"Open Policy Agent/v{version} ({os_name}, {arch})"'
    major, minor = (int(part) for part in version.split(".")[:2])
    product = "Open-Policy-Agent" if (major, minor) >= (1, 18) else "Open Policy Agent"
    return user_agent(product, version, os_name, arch)


def _close_header(close: bool) -> str:
    # A fleet's real cost: each report on a fresh connection that the server closes after it.
    return "Connection: close\r\n" if close else ""


def build_requests(
    target: Target, count: int, seed: int | None, close: bool = False
) -> list[bytes]:
    """Request bytes for ``count`` distinct simulated instances; with ``close`` each asks the
    server to close the connection after answering."""
    rng = random.Random(seed)  # noqa: S311 - a simulated fleet, not secrets
    host = f"Host: {target.host}:{target.port}\r\n{_close_header(close)}".encode()
    requests = []
    for version in version_mix(OPA_VERSIONS, rng, count):
        os_name, arch, _ = rng.choices(PLATFORMS, [w for *_, w in PLATFORMS])[0]
        instance = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        body = build_body(instance, version, rng.randrange(2_000_000, 200_000_000))
        head = (
            f"POST {target.prefix}/v1/version HTTP/1.1\r\n"
            f"User-Agent: {opa_user_agent(version, os_name, arch, rng)}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        ).encode()
        requests.append(head + host + b"\r\n" + body)
    return requests


def check_request(target: Target, close: bool = False) -> bytes:
    """OPA >= 1.7's anonymous GitHub-style release check."""
    return (
        f"GET {target.prefix}{CHECK_PATH} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
        f"User-Agent: OPA-Version-Checker\r\n{_close_header(close)}\r\n"
    ).encode()
