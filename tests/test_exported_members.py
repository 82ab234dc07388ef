"""The client's public API is pinned: a change here is a deliberate, documented change."""

from __future__ import annotations

import opa_telemetry


def test_public_api_is_exactly_what_is_documented() -> None:
    assert sorted(opa_telemetry.__all__) == [
        "AnswerError",
        "LatestRelease",
        "Payload",
        "Reporter",
        "RequestTimeoutError",
        "Schedule",
        "ServiceError",
        "TelemetryError",
        "TransportError",
        "__version__",
        "check_latest",
    ]
    for name in opa_telemetry.__all__:
        assert hasattr(opa_telemetry, name), name


def test_errors_form_the_documented_tree() -> None:
    base = opa_telemetry.TelemetryError
    assert issubclass(opa_telemetry.RequestTimeoutError, opa_telemetry.TransportError)
    for error in (
        opa_telemetry.TransportError,
        opa_telemetry.ServiceError,
        opa_telemetry.AnswerError,
    ):
        assert issubclass(error, base)
