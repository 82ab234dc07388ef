"""Where the load goes: the target URL, and the refusal to load anything but loopback."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit


class LoadTestError(Exception):
    """The load test cannot run as asked (bad argument, bad target, refused remote address)."""


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    prefix: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.prefix}"


def parse_target(url: str) -> Target:
    """Split a base URL (``http://127.0.0.1:9181/prefix``); only plain HTTP is supported.

    Raises :class:`LoadTestError` for anything else.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise LoadTestError(f"target must be an http:// URL, not {url!r}")
    return Target(parts.hostname, parts.port or 80, parts.path.rstrip("/"))


def check_loopback(host: str) -> None:
    """Raise :class:`LoadTestError` unless every address ``host`` resolves to is loopback."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise LoadTestError(f"cannot resolve {host!r}: {exc}") from None
    addresses = {str(info[4][0]) for info in infos}
    remote = sorted(a for a in addresses if not ipaddress.ip_address(a).is_loopback)
    if remote:
        raise LoadTestError(
            f"{host} resolves to non-loopback {', '.join(remote)}; "
            "pass --allow-remote to load-test a server you run elsewhere"
        )
