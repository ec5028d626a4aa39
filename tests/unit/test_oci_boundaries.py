"""Module boundaries of ``orchardist.oci``: HTTP and raw sockets stay in the client and transfer
(registries) and peers (the other Macs)."""

from __future__ import annotations

import ast
from pathlib import Path

import orchardist.oci

NETWORK_MODULES = {"aiohttp", "socket", "ssl", "http", "urllib", "httpx", "requests"}
PURE = {"urllib.parse"}  # string parsing only: comparing origins needs no network
ALLOWED = {"client.py", "transfer.py", "peers.py"}  # registries; other Macs of the fleet
HERE = Path(orchardist.oci.__file__).parent


def _network_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in NETWORK_MODULES and n not in PURE)
    return found


def test_only_client_and_transfer_import_network_modules() -> None:
    offenders = {
        p.name: sorted(found)
        for p in sorted(HERE.glob("*.py"))
        if p.name not in ALLOWED and (found := _network_imports(p))
    }
    assert offenders == {}


def test_the_check_sees_the_imports_that_are_allowed() -> None:
    """The allowed modules do import aiohttp: the scan above is looking at real imports."""
    assert "aiohttp" in _network_imports(HERE / "client.py")
    assert {"aiohttp", "socket"} <= _network_imports(HERE / "transfer.py")


def test_split_modules_stay_small() -> None:
    """The store's parts stay readable: none past the house cap."""
    sizes = {p.name: len(p.read_text().splitlines()) for p in HERE.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 500} == {}
