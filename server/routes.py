"""The whole URL map on one screen. Every path sits under the optional mount prefix."""

from __future__ import annotations

from aiohttp import web

from . import handlers


def setup_routes(app: web.Application, prefix: str = "") -> None:
    add = app.router
    add.add_post(f"{prefix}/v1/version", handlers.post_version)
    add.add_get(f"{prefix}/repos/{{owner}}/{{repo}}/releases/latest", handlers.get_latest_release)
    add.add_get(
        f"{prefix}/repos/{{owner}}/{{repo}}/releases/{{release_id:\\d{{1,18}}}}/assets",
        handlers.get_release_assets,
    )
    add.add_get(f"{prefix}/healthz", handlers.get_health)
    add.add_get(f"{prefix}/readyz", handlers.get_readiness)
