"""Pure: which proxy, if any, a request goes through: ``HTTP_PROXY``, ``HTTPS_PROXY`` and
``NO_PROXY`` read as OPA reads them (Go's ``net/http.ProxyFromEnvironment``):

- ``https://`` requests use ``HTTPS_PROXY``, ``http://`` requests ``HTTP_PROXY``; the upper-case
  name wins over the lower-case one. In a CGI process (``REQUEST_METHOD`` set) an
  ``HTTP_PROXY`` is refused, since a client can set it through a ``Proxy:`` header.
- ``localhost`` and loopback addresses never go through a proxy.
- ``NO_PROXY`` is a comma-separated list: ``*`` (no proxy at all); IP addresses or CIDR ranges;
  host names, which match themselves and their subdomains (``example.com`` matches
  ``api.example.com``); names with a leading ``.`` or ``*.`` (subdomains only); any entry but a
  range may end in ``:port``. Case and spaces are ignored; entries that parse as nothing are.
- A proxy is ``http://`` (the default without a scheme; port 80 by default) or ``https://``
  (port 443 by default): the client speaks TLS to the proxy itself, verified with the same CA
  settings as a target, then sends its request or its ``CONNECT`` inside that session, as Go
  does. ``user:password@`` becomes ``Proxy-Authorization: Basic``. A ``socks5://`` (or any
  other) proxy is refused with a message.
"""

from __future__ import annotations

import binascii
import ipaddress
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

from .errors import TransportError

DEFAULT_PORTS = {"http": 80, "https": 443}


class Proxy:
    """Where to connect instead of the target; ``authorization`` is a header value or ``""``."""

    __slots__ = ("authorization", "host", "port", "scheme")

    def __init__(self, scheme: str, host: str, port: int, authorization: str = "") -> None:
        self.scheme, self.host, self.port = scheme, host, port
        self.authorization = authorization

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Proxy):
            return NotImplemented
        mine = (self.scheme, self.host, self.port, self.authorization)
        return mine == (other.scheme, other.host, other.port, other.authorization)

    def __hash__(self) -> int:
        return hash((self.scheme, self.host, self.port, self.authorization))

    @property
    def host_port(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        auth = ", authorization=..." if self.authorization else ""
        return f"Proxy({self.scheme}://{self.host}:{self.port}{auth})"


def proxy_for(scheme: str, host: str, port: int, environ: Mapping[str, str]) -> Proxy | None:
    """The proxy for a request to ``scheme://host:port``, or ``None`` to connect directly.

    Raises :class:`TransportError` when the proxy setting cannot be used.
    """
    if scheme == "https":
        setting = _first(environ, "HTTPS_PROXY", "https_proxy")
    else:
        setting = _first(environ, "HTTP_PROXY", "http_proxy")
        if setting and environ.get("REQUEST_METHOD"):
            raise TransportError("refusing to use HTTP_PROXY in a CGI process (REQUEST_METHOD)")
    if not setting or not uses_proxy(host, port, _first(environ, "NO_PROXY", "no_proxy")):
        return None
    return parse_proxy(setting)


def uses_proxy(host: str, port: int, no_proxy: str) -> bool:
    """False when ``host:port`` is loopback or matched by a ``NO_PROXY`` value."""
    host = host.strip().lower().strip("[]")
    ip = _ip(host)
    if host == "localhost" or (ip is not None and ip.is_loopback):
        return False
    for entry in (part.strip().lower() for part in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return False
        if "/" in entry:
            try:
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                continue
            if ip is not None and ip.version == network.version and ip in network:
                return False
            continue
        name, entry_port = _split_port(entry)
        if entry_port and entry_port != str(port):
            continue
        if (entry_ip := _ip(name)) is not None:
            if ip is not None and ip == entry_ip:
                return False
            continue
        if name.startswith("*."):
            name = name[1:]
        if name.startswith("."):  # subdomains only
            if host.endswith(name):
                return False
        elif name and (host == name or host.endswith("." + name)):
            return False
    return True


def parse_proxy(setting: str) -> Proxy:
    """A proxy setting (``http://user:pw@proxy:3128``, or just ``proxy:3128``) as a
    :class:`Proxy`; raises :class:`TransportError` for one that cannot be used."""
    text = setting.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        raise TransportError(f"invalid proxy address {setting[:100]!r}") from None
    if scheme not in DEFAULT_PORTS:
        raise TransportError(
            f"unsupported proxy scheme {scheme!r} (http:// and https:// proxies are)"
        )
    if not host:
        raise TransportError(f"invalid proxy address {setting[:100]!r}")
    authorization = ""
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        token = binascii.b2a_base64(credentials.encode(), newline=False).decode()
        authorization = f"Basic {token}"
    return Proxy(scheme, host, port or DEFAULT_PORTS[scheme], authorization)


def _first(environ: Mapping[str, str], *names: str) -> str:
    for name in names:
        if value := environ.get(name, ""):
            return value
    return ""


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _split_port(entry: str) -> tuple[str, str]:
    """``host:port``, ``[v6]:port``, ``v6`` or ``host`` -> (host, port or "")."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, port
    return entry, ""
