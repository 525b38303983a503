"""Layers point one way: pure code never imports I/O or the process packages.

A 40-line stand-in for import-linter, in the spirit of tailscale's deptest.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "homeport"

# lower number = lower layer; a module may import only from its layer or below
LAYERS = {
    "errors": 0,
    "wire": 0,
    "crypto": 0,
    "policy": 0,
    "proto": 1,
    "store": 2,
    "node": 2,
    "io": 3,
    "relay": 3,
    "server": 4,
    "agent": 4,
    "client": 4,
    "cli": 5,
    "__main__": 5,
    "ncfast": 5,
    "testing": 5,
}
PURE = {"errors", "wire", "crypto", "policy", "proto"}
IO_MODULES = {
    "asyncio",
    "socket",
    "selectors",
    "select",
    "time",
    "threading",
    "subprocess",
    "uvloop",
}
PROCESSES = {"server", "agent", "client"}
# the ssh hot path must stay import-light
HOT_PATH = [
    "ncfast.py",
    "client/nc.py",
    "io/pump.py",
    "io/dial.py",
    "crypto/tls.py",
    "node/state.py",
]
HEAVY = {"cryptography", "click", "asyncio", "uvloop", "sqlalchemy"}


def _package(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem != "__init__" else ""


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
    return out


FILES = sorted(p for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_layering(path: Path) -> None:
    pkg = _package(path)
    if pkg not in LAYERS:
        return
    for name, line in _imports(path):
        parts = name.split(".")
        if parts[0] == "homeport" and len(parts) > 1:
            target = parts[1]
            if target in LAYERS:
                assert LAYERS[target] <= LAYERS[pkg], f"{path.name}:{line} {pkg} -> {target}"
                if pkg in PROCESSES and target in PROCESSES:
                    assert target == pkg, f"{path.name}:{line}: process {pkg} imports {target}"
        if pkg in PURE:
            assert parts[0] not in IO_MODULES, f"{path.name}:{line}: pure {pkg} imports {name}"


@pytest.mark.parametrize("rel", HOT_PATH)
def test_hot_path_is_import_light(rel: str) -> None:
    path = SRC / rel
    if not path.exists():
        pytest.skip(f"{rel} not written yet")
    tree = ast.parse(path.read_text())
    # only top-level imports count; lazy imports inside functions are the point
    for node in tree.body:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in HEAVY, f"{rel} imports {name} at module level"


def test_nc_imports_no_heavy_module_at_run_time() -> None:
    """What ``homeport nc`` really loads, transitively, through the ProxyCommand launcher."""
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import homeport.client.nc; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(SRC.parent)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "homeport" in out
    assert not HEAVY & set(out), f"nc loads {sorted(HEAVY & set(out))}"


#: Everything nc's warm path (a local agent answers) may load beyond ``python -I -S`` and
#: ``os`` (frozen, which the launcher needs anyway).
FAST_PATH_ALLOWED = {
    "homeport",
    "homeport.client",
    "homeport.client.nc",
    "_socket",
    "_json",
    "_thread",
    "_signal",
}


def test_nc_fast_path_loads_only_builtins(tmp_path: Path) -> None:
    """With an agent answering, nc must not load ssl, json, dataclasses, pathlib, typing, …"""
    import subprocess
    import sys

    from tests.test_localapi import FakeAgent, echo

    show = "import sys, os; print(' '.join(sorted(sys.modules)))"
    base = subprocess.run(
        [sys.executable, "-I", "-S", "-c", show], capture_output=True, text=True, check=True
    ).stdout.split()
    out = tmp_path / "modules.json"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from homeport.client.nc import main\n"
        "rc = main(sys.argv[3:])\n"
        "open(sys.argv[2], 'w').write(' '.join([str(rc), *sorted(sys.modules)]))\n"
    )
    nc_args = ["--state", str(tmp_path), "labpc", "22"]
    agent = FakeAgent(
        tmp_path,
        {"ok": True, "peer": "labpc", "port": 22},
        echo,
        {"end": "clean", "ok": True, "reason": "closed"},
    )
    try:
        res = subprocess.run(
            [sys.executable, "-I", "-S", "-c", code, str(SRC.parent), str(out), *nc_args],
            input=b"ping",
            capture_output=True,
            timeout=30,
        )
    finally:
        agent.close()
    assert res.returncode == 0 and res.stdout == b"ping", res.stderr
    rc, *mods = out.read_text().split()
    assert rc == "0"
    extra = set(mods) - set(base)
    assert extra <= FAST_PATH_ALLOWED, f"the fast path loads {sorted(extra - FAST_PATH_ALLOWED)}"
