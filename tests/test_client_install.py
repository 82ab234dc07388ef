"""The client as a user gets it: installed alone into a fresh virtual environment, one version
for the distribution, and the README's embedding example run as written."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import opa_telemetry
import opa_telemetry_server

from .conftest import REPO, FakeService

DISTRIBUTION_FILES = ("setup.cfg", "pyproject.toml", "README.md", "client", "server")


def test_client_server_and_distribution_share_one_version() -> None:
    assert opa_telemetry.__version__ == opa_telemetry_server.__version__
    assert importlib.metadata.version("opa-telemetry") == opa_telemetry.__version__


def test_the_client_installs_without_any_dependency() -> None:
    requirements = importlib.metadata.requires("opa-telemetry") or []
    assert [r for r in requirements if "extra ==" not in r] == []


@pytest.fixture(scope="module")
def client_only_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment holding only this distribution, installed from a wheel
    built here from a copy of the sources, with ``pip --no-index``: no registry is asked, so a
    dependency that crept into ``install_requires`` fails the install."""
    root = tmp_path_factory.mktemp("client-only")
    source = root / "source"
    source.mkdir()
    for name in DISTRIBUTION_FILES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)],
        check=True,
        env=env,
        timeout=300,
        capture_output=True,
    )
    [wheel] = (root / "dist").glob("opa_telemetry-*.whl")
    venv = root / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    subprocess.run(
        [*pip, "--python", str(venv / "bin" / "python"), "install", "--no-index", str(wheel)],
        check=True,
        env=env,
        timeout=300,
        capture_output=True,
    )
    return venv


@pytest.mark.skipif(sys.platform == "win32", reason="the venv layout below is POSIX's")
def test_client_only_install_has_nothing_of_the_servers_dependencies(
    client_only_venv: Path,
) -> None:
    python = str(client_only_venv / "bin" / "python")
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "list", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert [p["name"] for p in json.loads(listed.stdout)] == ["opa-telemetry"]
    server = subprocess.run(
        [str(client_only_venv / "bin" / "opa-telemetry-server"), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert server.returncode == 1
    missing = "|".join(opa_telemetry_server._SERVER_DEPENDENCIES)
    assert re.fullmatch(
        rf"error: the server needs the 'server' extra \(({missing}) is not installed\): "
        r"pip install 'opa-telemetry\[server\]'\n",
        server.stderr,
    ), server.stderr


def test_the_wheel_holds_every_file_of_both_packages(client_only_venv: Path) -> None:
    """Every module, sub-package and data file (the dashboard, the OpenAPI document, the
    bundled catalog) is installed: a package missing from ``setup.cfg`` fails here."""
    [site] = client_only_venv.glob("lib/python*/site-packages")
    for folder, package in (("client", "opa_telemetry"), ("server", "opa_telemetry_server")):
        wanted = {
            p.relative_to(REPO / folder).as_posix()
            for p in (REPO / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }
        installed = {
            p.relative_to(site / package).as_posix()
            for p in (site / package).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }
        assert wanted - installed == set(), package


@pytest.mark.skipif(sys.platform == "win32", reason="the venv layout below is POSIX's")
async def test_client_only_install_reports_to_a_local_server(
    client_only_venv: Path, fake_service: FakeService
) -> None:
    process = await asyncio.create_subprocess_exec(
        str(client_only_venv / "bin" / "opa-telemetry"),
        "report",
        "--url",
        fake_service.url,
        "--product",
        "MyApp",
        "--version",
        "1.0.0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "")},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert (process.returncode, stderr) == (0, b"")
    assert stdout.decode().splitlines()[0] == "Latest Upstream Version: 1.20.2"
    [(headers, body, path)] = fake_service.requests
    assert path == "/v1/version" and headers["User-Agent"].startswith("MyApp/1.0.0 (")
    assert json.loads(body)["version"] == "1.0.0"


def readme_python_blocks(section: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.DOTALL)


async def test_readme_plain_asyncio_example_really_reports(
    fake_service: FakeService, tmp_path: Path
) -> None:
    [program] = [b for b in readme_python_blocks("Embedding the client") if "asyncio.run" in b]
    script = tmp_path / "example.py"
    script.write_text(program)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "error",
        str(script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "OPA_TELEMETRY_SERVICE_URL": fake_service.url},
    )
    try:
        await fake_service.wait_for_requests(1, timeout=60)
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)  # on_latest printed it
        process.send_signal(signal.SIGTERM)  # the example's way to stop the app
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert (process.returncode, stderr) == (0, b"")
    assert line.decode() == (
        "MyApp 1.20.2 is out: https://github.com/open-policy-agent/opa/releases/tag/v1.20.2\n"
    )
    assert json.loads(fake_service.requests[0][1])["version"] == "1.2.3"
