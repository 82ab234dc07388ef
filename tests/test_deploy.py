"""The deployment files and the licence say what the code does."""

from __future__ import annotations

import re
import shlex
from configparser import ConfigParser

from opa_telemetry_server.cli import build_parser
from opa_telemetry_server.cli.arguments import settings_from_args
from opa_telemetry_server.settings import env_name, knobs

from .conftest import REPO

DEPLOY = REPO / "deploy"


def test_every_setting_the_deploy_files_name_exists() -> None:
    known = {env_name(name) for name, _, _ in knobs()}
    for path in DEPLOY.iterdir():
        named = set(re.findall(r"OPA_TELEMETRY_SERVER_[A-Z_]+", path.read_text()))
        assert named <= known, f"{path.name}: not settings: {named - known}"


def test_the_units_commands_parse() -> None:
    parser = build_parser({})
    commands = {}
    for unit in DEPLOY.glob("*.service"):
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart="):
                argv = shlex.split(line.removeprefix("ExecStart="))
                assert argv[0] == "/opt/opa-telemetry/bin/opa-telemetry-server"
                args = parser.parse_args(argv[1:])
                settings_from_args(args)  # raises on a bad value
                commands[unit.name] = args.command
    assert commands == {"opa-telemetry.service": "serve", "opa-telemetry-backup.service": "backup"}


def test_the_nginx_site_sets_the_header_the_readme_tells_the_server_to_trust() -> None:
    site = (DEPLOY / "nginx.conf").read_text()
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in site
    assert "--trusted-proxy-header X-Forwarded-For" in site
    assert "$remote_addr" not in site.split("log_format", 1)[1].split(";", 1)[0]


def test_the_licence_file_is_the_one_setup_cfg_names() -> None:
    config = ConfigParser()
    config.read(REPO / "setup.cfg")
    assert config["metadata"]["license"] == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 11000
