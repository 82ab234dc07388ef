"""The whole URL map on one screen. Every path sits under the optional mount prefix."""

from __future__ import annotations

from aiohttp import web

from opa_telemetry_server.web import handlers
from opa_telemetry_server.web.appkeys import REQUESTS
from opa_telemetry_server.web.http_errors import Handler, json_errors, method_not_allowed, not_found

# Each route is described in openapi.json (tests/test_openapi.py fails otherwise).
ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("POST", "/v1/version", handlers.post_version),
    ("GET", "/repos/{owner}/{repo}/releases", handlers.get_releases),
    ("GET", "/repos/{owner}/{repo}/releases/latest", handlers.get_latest_release),
    ("GET", "/repos/{owner}/{repo}/releases/{release_id:\\d{1,18}}/assets",
     handlers.get_release_assets),
    ("GET", "/healthz", handlers.get_health),
    ("GET", "/readyz", handlers.get_readiness),
    # The read side: closed unless --admin-token or --public-stats (see ``access``).
    ("GET", "/v1/stats", handlers.get_stats),
    ("GET", "/v1/products", handlers.get_products),
    ("GET", "/metrics", handlers.get_metrics),
    ("GET", "/openapi.json", handlers.get_openapi),
    ("GET", "/dashboard", handlers.get_dashboard),
    ("GET", "/dashboard/", handlers.get_dashboard_slash),
    ("GET", "/dashboard/assets/{name:[A-Za-z0-9._/-]{1,100}}", handlers.get_dashboard_asset),
)  # fmt: skip
UNMATCHED = "unmatched"  # the route label of requests no route matched


def setup_routes(app: web.Application, prefix: str = "") -> None:
    """Register every route, each wrapped by ``json_errors`` unless it answers its own errors,
    then 405 and 404 catch-alls so that even unknown paths and methods are answered in the
    JSON error shape."""
    router = app.router
    for method, path, handler in ROUTES:
        if handler not in handlers.SELF_ANSWERING_ERRORS:  # those count their own answers
            handler = counted(path, json_errors(handler))
        if method == "GET":
            router.add_get(prefix + path, handler)  # also answers HEAD
        else:
            router.add_route(method, prefix + path, handler)
    for method, path, _ in ROUTES:
        allowed = ["GET", "HEAD"] if method == "GET" else [method]
        refuse = counted(path, json_errors(method_not_allowed(allowed)))
        router.add_route("*", prefix + path, refuse)
    # [\s\S], not ".": a path may hold an encoded newline (%0A), and "." stops at it.
    router.add_route("*", "/{tail:[\\s\\S]*}", counted(UNMATCHED, json_errors(not_found)))


def counted(route: str, handler: Handler) -> Handler:
    """Wrap ``handler`` so that each answer bumps the app's (route, status) tally."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        request.app[REQUESTS][(route, response.status)] += 1
        return response

    return wrapped
