"""The OpenAPI document: true to the URL map, served open, and fuzzed live by schemathesis."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from opa_telemetry_server import __version__
from opa_telemetry_server.web.app import create_app
from opa_telemetry_server.web.openapi import documented_operations, openapi_document, openapi_path
from opa_telemetry_server.web.routes import ROUTES

from .conftest import AiohttpClient, make_settings, serve_argv, serving

# Checks every answer against the document. Left out: whether the document's input schemas
# draw the exact line between accepted and refused input, which JSON Schema cannot: versions
# are SemVer *or* PEP 440, and a schema-valid body can still exceed --max-body-bytes.
SCHEMATHESIS_CHECKS = "all"
SCHEMATHESIS_EXCLUDED = "positive_data_acceptance,negative_data_rejection"


def resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def test_every_route_is_documented_and_nothing_else() -> None:
    routes = {(method, openapi_path(path)) for method, path, _ in ROUTES}
    assert documented_operations(openapi_document()) == routes


def test_each_documented_operation_names_its_handler() -> None:
    paths = openapi_document()["paths"]
    for method, path, handler in ROUTES:
        assert paths[openapi_path(path)][method.lower()]["operationId"] == handler.__name__


def test_path_parameters_are_the_path_template_variables() -> None:
    document = openapi_document()
    for path, item in document["paths"].items():
        for operation in item.values():
            parameters = [resolve(document, p) for p in operation.get("parameters", [])]
            in_path = {p["name"] for p in parameters if p["in"] == "path"}
            assert in_path == set(re.findall(r"\{(\w+)\}", path)), path
            assert all(p["required"] for p in parameters if p["in"] == "path")


def test_aiohttp_variables_become_openapi_variables() -> None:
    assert openapi_path(r"/r/{owner}/{id:\d{1,18}}/a") == "/r/{owner}/{id}/a"


async def test_document_is_served_open_under_the_prefix(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await aiohttp_client(create_app(make_settings(tmp_path, prefix="/custom")))
    response = await client.get("/custom/openapi.json")
    assert response.status == 200 and response.content_type == "application/json"
    document = await response.json()
    assert document["openapi"] == "3.1.0" and document["info"]["version"] == __version__
    assert document["servers"] == [{"url": "/custom"}]
    assert "/v1/version" in document["paths"]
    assert (await client.get("/openapi.json")).status == 404  # only under the prefix


async def test_document_without_a_prefix_names_the_root(client: TestClient[Any, Any]) -> None:
    response = await client.get("/openapi.json")
    assert (await response.json())["servers"] == [{"url": "/"}]


async def test_unknown_path_with_an_encoded_newline_answers_json_404(
    client: TestClient[Any, Any],
) -> None:
    # Found by schemathesis: the catch-all's "." did not match a newline, so aiohttp answered
    # a plain-text 404 outside the one error shape.
    for path in ("/x%0Ay", "/repos/a/b/releases/1234567890123456789012/assets%0A"):
        response = await client.get(path)
        assert response.status == 404 and response.content_type == "application/json"
        assert await response.json() == {"error": "Not Found", "details": []}


def test_schemathesis_finds_no_server_error_and_every_answer_matches_the_document(
    tmp_path: Path,
) -> None:
    schemathesis = Path(sys.executable).with_name("schemathesis")
    with serving(serve_argv(tmp_path / "fuzzed.db", "--prefix", "/fuzz")) as (url, _):
        done = subprocess.run(
            [str(schemathesis), "run", f"{url}/openapi.json",
             "--checks", SCHEMATHESIS_CHECKS, "--exclude-checks", SCHEMATHESIS_EXCLUDED,
             "--max-examples", "25", "--seed", "1", "--workers", "1",
             "--generation-database", "none", "--request-timeout", "10", "--no-color"],
            capture_output=True, text=True, timeout=100, cwd=tmp_path,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    operations = len(ROUTES) - 1  # every operation but the document's own
    assert f"{operations} selected / {operations} total" in done.stdout
