"""The client reads the answer's advisories and support, warns once, and ``check`` prints them."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from opa_telemetry import Reporter
from opa_telemetry.answer import Advisory, Support, parse_answer
from opa_telemetry.cli import main as client_main

from .conftest import FakeService
from .test_client import FAST

LATEST = {
    "download": "https://openpolicyagent.org/downloads/v1.20.2/opa_linux_amd64",
    "release_notes": "https://github.com/open-policy-agent/opa/releases/tag/v1.20.2",
    "latest_release": "v1.20.2",
    "opa_up_to_date": False,
}
SUMMARY = "Rego injection in the data API"
URL = "https://github.com/open-policy-agent/opa/security/advisories/GHSA-6m8w-jc87-6cr7"
HIGH: dict[str, Any] = {
    "id": "GHSA-6m8w-jc87-6cr7",
    "aliases": ["CVE-2025-46569"],
    "severity": "HIGH",
    "summary": SUMMARY,
    "url": URL,
    "fixed": "1.4.0",
}
UNRATED = {**HIGH, "id": "CVE-2025-22870", "aliases": [], "severity": None, "fixed": "1.4.1"}


def answer(**extra: Any) -> dict[str, Any]:
    return {"latest": LATEST, **extra}


def test_answer_parses_advisories_and_support_and_tolerates_their_absence() -> None:
    parsed = parse_answer(
        json.dumps(
            answer(
                advisories=[HIGH, UNRATED, {"no": "id"}, "junk"],
                support={"status": "unsupported", "min_version": "1.0.0"},
            )
        ).encode()
    )
    assert parsed.advisories == (
        Advisory("GHSA-6m8w-jc87-6cr7", ("CVE-2025-46569",), "HIGH", SUMMARY, URL, "1.4.0"),
        Advisory("CVE-2025-22870", (), None, SUMMARY, URL, "1.4.1"),
    )  # fmt: skip
    assert parsed.advisories[0].serious and not parsed.advisories[1].serious
    assert parsed.support == Support("unsupported", "1.0.0")
    plain = parse_answer(json.dumps(answer()).encode())
    assert plain.advisories == () and plain.support is None
    odd = parse_answer(json.dumps(answer(advisories={"x": 1}, support="yes")).encode())
    assert odd.advisories == () and odd.support is None


async def test_reporter_warns_once_per_process_for_a_serious_advisory(
    fake_service: FakeService, caplog: pytest.LogCaptureFixture
) -> None:
    fake_service.answer = answer(advisories=[HIGH, UNRATED], support={"status": "supported"})
    caplog.set_level(logging.DEBUG, logger="opa_telemetry")
    async with Reporter("MyWarnedApp", "1.3.0", url=fake_service.url, schedule=FAST):
        await fake_service.wait_for_requests(3)
    advisories = [r for r in caplog.records if "security advisory" in r.getMessage()]
    assert [(r.levelno, r.advisory) for r in advisories] == [  # type: ignore[attr-defined]
        (logging.WARNING, "GHSA-6m8w-jc87-6cr7"),
        (logging.INFO, "CVE-2025-22870"),
    ]
    assert "fixed in 1.4.0" in advisories[0].getMessage()


async def test_check_prints_opas_three_lines_then_the_advisories(
    fake_service: FakeService, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_service.answer = answer(
        advisories=[HIGH],
        support={"status": "yanked", "reason": "bad build"},
    )
    code = await asyncio.to_thread(client_main, ["check", "--url", fake_service.url])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[:3] == [
        "Latest Upstream Version: 1.20.2",
        f"Download: {LATEST['download']}",
        f"Release Notes: {LATEST['release_notes']}",
    ]
    assert out[3:] == [
        "Support: yanked: bad build",
        f"Advisory: GHSA-6m8w-jc87-6cr7 (HIGH, fixed in 1.4.0) {HIGH['summary']} {HIGH['url']}",
    ]
