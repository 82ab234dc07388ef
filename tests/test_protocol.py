"""User-Agent and body parsing: every form real OPA and our client send, every bad input."""

from __future__ import annotations

import json

import pytest

from opa_telemetry_server.domain.protocol import ClientInfo, parse_report, parse_user_agent
from opa_telemetry_server.errors import ReportError

from .conftest import INSTANCE_ID, report_body

OPA = ClientInfo("opa", "linux", "amd64")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Open Policy Agent/1.5.1 (linux, amd64)", ClientInfo("opa", "linux", "amd64")),
        ("Open-Policy-Agent/1.18.0 (linux, amd64)", ClientInfo("opa", "linux", "amd64")),
        (
            "Enterprise OPA/1.2.0 Open Policy Agent/1.5.1 (linux, amd64)",
            ClientInfo("opa", "linux", "amd64"),
        ),
        ('"Open Policy Agent/v0.12.3 (darwin, amd64)"', ClientInfo("opa", "darwin", "amd64")),
        ("Open Policy Agent/1.5.1 (windows, arm64)", ClientInfo("opa", "windows", "arm64")),
        ("MyApp/1.2.3 (linux, amd64)", ClientInfo("myapp", "linux", "amd64")),
        ("My Cool App/2.0.0rc1 (darwin, arm64)", ClientInfo("my-cool-app", "darwin", "arm64")),
        ("Open Policy Agent/1.5.1", ClientInfo("opa")),
        ("curl/8.4.0", ClientInfo("curl")),
        ("", ClientInfo("opa")),
        (None, ClientInfo("opa")),
        ("Mozilla/5.0 (X11; Linux x86_64)", ClientInfo("mozilla")),
        ("(linux, amd64)", ClientInfo("opa", "linux", "amd64")),
        ("x" * 600, ClientInfo("opa")),
    ],
)
def test_parse_user_agent_reads_every_form(header: str | None, expected: ClientInfo) -> None:
    assert parse_user_agent(header) == expected


def parse(body: object, client: ClientInfo = OPA) -> object:
    return parse_report(json.dumps(body).encode(), client, json.loads)


def test_parse_report_accepts_what_opa_sends() -> None:
    report = parse_report(
        b'{"heap_usage_bytes":"2106336","id":"a72dc36a-72db-458d-9208-9be4189e4ab7",'
        b'"version":"1.6.0"}\n',
        OPA,
        json.loads,
    )
    assert report.instance_id == INSTANCE_ID
    assert str(report.version) == "1.6.0"
    assert report.heap_usage_bytes == 2106336
    assert (report.product, report.os, report.arch) == ("opa", "linux", "amd64")
    assert report.min_compatible_version is None


def test_parse_report_accepts_variants_and_ignores_unknown_keys() -> None:
    report = parse(
        report_body(
            version="v0.12.3",
            heap_usage_bytes=42,
            id=INSTANCE_ID.upper(),
            min_compatible_version="0.50.0",
            bundles={"b": {}},
        )
    )
    assert str(report.version) == "0.12.3"  # type: ignore[attr-defined]
    assert report.heap_usage_bytes == 42  # type: ignore[attr-defined]
    assert report.instance_id == INSTANCE_ID  # type: ignore[attr-defined]
    assert report.min_compatible_version == "0.50.0"  # type: ignore[attr-defined]
    assert not hasattr(report, "bundles")


def test_parse_report_takes_empty_min_compatible_version_and_missing_heap() -> None:
    report = parse(report_body(min_compatible_version="", heap_usage_bytes=None))
    assert report.min_compatible_version is None  # type: ignore[attr-defined]
    assert report.heap_usage_bytes is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (report_body(id=None), "id: required"),
        (report_body(id="not-a-uuid"), "id: not a UUID"),
        (report_body(id="a72dc36a72db458d92089be4189e4ab7"), "id: not a UUID"),
        (report_body(id=7), "id: not a UUID"),
        (report_body(version=None), "version: required"),
        (report_body(version="latest"), "version: not a version"),
        (report_body(version=151), "version: must be a string"),
        (report_body(heap_usage_bytes="-1"), "heap_usage_bytes"),
        (report_body(heap_usage_bytes=True), "heap_usage_bytes"),
        (report_body(heap_usage_bytes=1.5), "heap_usage_bytes"),
        (report_body(heap_usage_bytes="9" * 30), "heap_usage_bytes"),
        (report_body(heap_usage_bytes="١٢٣"), "heap_usage_bytes"),
        (report_body(min_compatible_version="soon"), "min_compatible_version"),
        (report_body(min_compatible_version=[]), "min_compatible_version"),
    ],
)
def test_parse_report_names_the_invalid_field(body: object, field: str) -> None:
    with pytest.raises(ReportError) as caught:
        parse(body)
    assert any(detail.startswith(field) for detail in caught.value.details), caught.value.details


def test_parse_report_collects_every_problem_at_once() -> None:
    with pytest.raises(ReportError) as caught:
        parse({"id": "x", "heap_usage_bytes": "y"})
    assert len(caught.value.details) == 3


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"[]", b'"text"', b"null", b"\xff\xfe", b"[" * 5000 + b"]" * 5000]
)
def test_parse_report_rejects_non_objects_and_bad_json(raw: bytes) -> None:
    with pytest.raises(ReportError):
        parse_report(raw, OPA, json.loads)
