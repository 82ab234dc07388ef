"""Every server knob in one frozen dataclass: its default, its env var and one line of help.

The CLI builds its ``serve`` flags from these fields (flag ``--max-body-bytes`` for field
``max_body_bytes``, env var ``OPA_TELEMETRY_SERVER_MAX_BODY_BYTES``), so the two can never
drift apart. Nothing here reads the environment: only the ``cli`` package does.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from opa_telemetry_server.domain.protocol import product_slug

ENV_PREFIX = "OPA_TELEMETRY_SERVER_"
DEFAULT_DB = "opa-telemetry.db"
DEFAULT_PORT = 9181  # not OPA's 8181: operators run both on one host
DEFAULT_REPOS = "open-policy-agent/opa=opa"
MAX_WORKERS = 8  # SQLite attaches at most 10 databases; statistics read them all at once


def _knob(default: Any, help: str, *, secret: bool = False, **extra: Any) -> Any:
    # A secret is left out of the dataclass's repr, so that logging settings never shows it.
    return field(default=default, repr=not secret, metadata={"help": help, **extra})


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = _knob("127.0.0.1", "address to listen on")
    port: int = _knob(DEFAULT_PORT, "TCP port to listen on (0 picks a free one)")
    db: str = _knob(
        DEFAULT_DB,
        "SQLite database file (created if missing), or a PostgreSQL URL"
        " postgresql://user:password@host:5432/dbname",
        secret=True,  # a PostgreSQL URL may carry its password
    )
    db_connect_wait: float = _knob(
        60.0,
        "seconds serve keeps retrying a PostgreSQL database it cannot reach at start"
        " (0: give up at once)",
    )
    db_pool_size: int = _knob(
        4,
        "PostgreSQL only: most connections of each of a server process's pools (reports and"
        " catalog, statistics reads; see the README for the total per node); at least 2",
    )
    prefix: str = _knob("", "mount path prefix, e.g. /custom serves /custom/v1/version")
    log_level: str = _knob("info", "log level: debug, info, warning, error")
    access_log: bool = _knob(True, "log one line per request (never the client address)")
    synchronous: str = _knob(
        "full",
        "SQLite synchronous mode: full survives power loss, normal survives process crashes",
    )
    wal_checkpoint_pages: int = _knob(
        10000,
        "WAL pages between automatic checkpoints (4 KiB each): more copies hot pages less often",
    )
    busy_timeout: float = _knob(5.0, "seconds a write waits for a locked database before a 503")
    max_body_bytes: int = _knob(8192, "largest accepted request body, in bytes")
    read_timeout: float = _knob(
        10.0, "seconds a client has to send a whole request; idle connections close after it"
    )
    queue_size: int = _knob(10000, "reports waiting for a commit before answering 503")
    batch_size: int = _knob(1024, "most reports committed in one transaction")
    retry_after: int = _knob(1, "seconds a client is told to wait when the server is busy")
    catalog_refresh: float = _knob(5.0, "seconds between checks for release catalog changes")
    shutdown_timeout: float = _knob(10.0, "seconds to finish in-flight requests on SIGTERM")
    seed_catalog: bool = _knob(
        True, "import the bundled OPA releases and advisories on the first start"
    )
    extra_keys: str = _knob(
        "", "report body keys to store besides OPA's, comma-separated (e.g. bundles,license)"
    )
    extra_max_bytes: int = _knob(1024, "largest stored JSON of one report's allow-listed keys")
    retention_days: int = _knob(
        90, "UTC days of raw per-instance rows to keep; older ones are rolled up (0: forever)"
    )
    purge_interval: float = _knob(3600.0, "seconds between retention runs in the server")
    rate_limit: float = _knob(
        50.0, "reports and checks per second per client address (0: no limit)"
    )
    rate_burst: int = _knob(200, "requests a client address may send at once before the limit")
    trusted_proxy_header: str = _knob(
        "", "behind a reverse proxy: the header it sets with the client address (X-Forwarded-For)"
    )
    repos: str = _knob(
        DEFAULT_REPOS,
        "owner/repo=product pairs, comma-separated, for GET /repos/{owner}/{repo}/releases/latest",
    )
    sync_interval: float = _knob(
        0.0, "seconds between release syncs from GitHub in the server (0: off; one process syncs)"
    )
    sync_product: str = _knob("opa", "product whose releases are synced")
    sync_repo: str = _knob("open-policy-agent/opa", "GitHub owner/repo the releases come from")
    sync_api_url: str = _knob(
        "https://api.github.com", "GitHub REST API base (or another opa-telemetry server)"
    )
    sync_include_prereleases: bool = _knob(False, "sync pre-releases too (never offered)")
    sync_prune: bool = _knob(False, "remove the product's releases that upstream no longer lists")
    sync_token: str = _knob(
        "", "GitHub token for the sync (else $GITHUB_TOKEN); never logged or stored", secret=True
    )
    fast: bool = _knob(True, "use uvloop and orjson when installed")
    workers: int = _knob(
        1, "server processes sharing the port; each commits to its own database shard"
    )
    # Never in a repr or a log line: the one secret among the settings.
    admin_token: str = field(
        default="",
        repr=False,
        metadata={
            "help": "bearer token that opens the stats API, dashboard and /metrics"
            " (Authorization: Bearer <token>)"
        },
    )
    public_stats: bool = _knob(
        False, "serve statistics and /metrics to anyone, small groups folded into 'other'"
    )
    min_group_size: int = _knob(
        5, "in public statistics, groups with fewer average daily instances show as 'other'"
    )
    stats_interval: float = _knob(
        60.0, "seconds between updates of the statistics aggregates from new reports"
    )
    tls_cert: str = _knob(
        "", "PEM certificate chain: serve HTTPS directly (needs --tls-key; unset: plain HTTP)"
    )
    tls_key: str = _knob(
        "", "PEM private key of --tls-cert, unencrypted, readable by the server only"
    )

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append("port must be 0-65535")
        if self.prefix and (not self.prefix.startswith("/") or self.prefix.endswith("/")):
            problems.append("prefix must start with '/' and not end with '/' (e.g. /custom)")
        if self.synchronous.lower() not in ("off", "normal", "full", "extra"):
            problems.append("synchronous must be off, normal, full or extra")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            problems.append("log_level must be debug, info, warning or error")
        if self.retention_days < 0 or self.purge_interval <= 0 or self.extra_max_bytes < 2:
            problems.append("retention_days >= 0, purge_interval > 0, extra_max_bytes >= 2")
        if self.rate_limit < 0 or self.rate_burst < 1:
            problems.append("rate_limit must be >= 0 and rate_burst >= 1")
        if self.min_group_size < 1 or self.stats_interval <= 0:
            problems.append("min_group_size must be at least 1 and stats_interval positive")
        if self.admin_token and (len(self.admin_token) < 16 or not self.admin_token.isprintable()):
            problems.append("admin_token must be at least 16 printable characters")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key go together: give both or neither")
        if not 1 <= self.workers <= MAX_WORKERS:
            problems.append(f"workers must be 1-{MAX_WORKERS}")
        for name in (
            "max_body_bytes",
            "queue_size",
            "batch_size",
            "retry_after",
            "wal_checkpoint_pages",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.db_pool_size < 2:
            # Sync and retention each hold a connection for their advisory lock and write
            # through another: with one, they would wait for themselves forever.
            problems.append("db_pool_size must be at least 2")
        if self.db_connect_wait < 0:
            problems.append("db_connect_wait must be >= 0")
        for name in ("catalog_refresh", "shutdown_timeout", "busy_timeout", "read_timeout"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.sync_interval < 0:
            problems.append("sync_interval must be >= 0")
        if self.sync_repo.count("/") != 1 or not all(self.sync_repo.split("/")):
            problems.append("sync_repo must be owner/repo")
        if not self.sync_api_url.startswith(("http://", "https://")):
            problems.append("sync_api_url must be an http(s) URL")
        elif self.sync_token and not _token_safe(self.sync_api_url):
            problems.append(
                "sync_token is never sent in clear: give an https:// sync_api_url"
                " (plain http:// only to this host)"
            )
        if not product_slug(self.sync_product):
            problems.append("sync_product must name a product")
        try:
            self.repo_products()
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))

    def extra_key_set(self) -> frozenset[str]:
        """``extra_keys`` as a set of names."""
        return frozenset(k.strip() for k in self.extra_keys.split(",") if k.strip())

    def repo_products(self) -> dict[str, str]:
        """``repos`` as a mapping of lowercase ``owner/repo`` to product."""
        mapping = {}
        for pair in filter(None, (p.strip() for p in self.repos.split(","))):
            repo, sep, product = pair.partition("=")
            if not sep or repo.count("/") != 1 or not product.strip():
                raise ValueError(f"repos entry {pair!r} is not owner/repo=product")
            mapping[repo.strip().lower()] = product_slug(product)
        return mapping


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def knobs() -> list[tuple[str, Any, str]]:
    """(field name, default, help) for every setting, in declaration order."""
    return [(f.name, f.default, f.metadata["help"]) for f in fields(Settings)]


def _token_safe(url: str) -> bool:
    """Whether a token may travel to ``url``: over TLS, or over plain HTTP to this host."""
    return urlsplit(url).scheme == "https" or is_loopback_url(url)


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` names this host (``localhost`` or a loopback address)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
