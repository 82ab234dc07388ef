"""The server's packages depend downward only: cli -> web -> services -> storage -> domain.

A module may import its own package, any lower layer, ``errors`` and ``settings`` (read by
every layer), never a higher one: the pure middle stays free of I/O and the storage package
knows nothing of HTTP. Read from each module's source with ``ast``, lazy imports included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[1] / "server"
PACKAGE = "opa_telemetry_server"
# Each layer, and the layers below it that it may import.
ALLOWED = {
    "cli": {"cli", "web", "services", "storage", "domain"},
    "web": {"web", "services", "storage", "domain"},
    "services": {"services", "storage", "domain"},
    "storage": {"storage", "domain"},
    "domain": {"domain"},
    "settings": {"domain"},
    "errors": set(),
}
SHARED = {"", "__version__", "errors", "settings", "data", "static"}  # the root, common modules


def layer_of(module: str) -> str:
    """``opa_telemetry_server.web.app`` -> ``web``; the package itself -> ``''``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def modules() -> list[Path]:
    return sorted(p for p in SERVER.rglob("*.py") if p.name != "__main__.py")


def imported(path: Path) -> list[tuple[int, str]]:
    """The first-party modules ``path`` imports, with their line numbers."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            names = [node.module or ""]
            if node.module == PACKAGE:  # ``from opa_telemetry_server import web`` names a layer
                names = [f"{PACKAGE}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] == PACKAGE]
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(SERVER)))
def test_a_module_imports_only_its_layer_and_those_below(path: Path) -> None:
    relative = path.relative_to(SERVER).with_suffix("")
    own = relative.parts[0] if len(relative.parts) > 1 else relative.name
    # The package root holds __version__ and the entry point's lazy import of cli; a new
    # module at the root has no place here until it is given one.
    allowed = set(ALLOWED) if own == "__init__" else ALLOWED[own]
    wrong = [
        f"{path.relative_to(SERVER)}:{line} imports {name}"
        for line, name in imported(path)
        if layer_of(name) not in allowed | SHARED
    ]
    assert not wrong, wrong


def test_every_layer_is_checked() -> None:
    folders = {p.name for p in SERVER.iterdir() if (p / "__init__.py").exists()}
    assert folders == {"cli", "web", "services", "storage", "domain"}
