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
HEAVY = {"cryptography", "click", "asyncio", "uvloop", "sqlalchemy", "starlette", "uvicorn"}


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
    "homeport.wire",
    "homeport.wire.names",
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


# -- the module graph: no cycles, who may touch the store, pure layers do no I/O ------------

#: Modules outside ``homeport.store`` allowed to import the database layer
#: (``homeport.store.db``): none. The server reaches the database only through
#: ``homeport.store.registry`` (the one writer, behind the coordinator core).
STORE_IMPORTERS: frozenset[str] = frozenset()
#: Modules the pure layers may not import: sockets, polling, processes, file trees.
PURE_FORBIDDEN_IMPORTS = frozenset(
    {"socket", "select", "selectors", "subprocess", "shutil", "tempfile", "glob"}
)
#: ``os.*`` calls that touch the file system.
OS_FILE_CALLS = frozenset(
    {
        "open", "write", "read", "replace", "rename", "chmod", "fchmod", "chown", "mkdir",
        "makedirs", "remove", "unlink", "rmdir", "fdopen", "link", "symlink", "truncate",
        "listdir", "scandir", "stat", "lstat",
    }
)  # fmt: skip
#: Methods that read or write files whatever their receiver (``Path``, ``SSLContext``).
FILE_METHODS = frozenset(
    {
        "write_text", "write_bytes", "read_text", "read_bytes", "open", "mkdir", "chmod",
        "touch", "unlink", "rmdir", "rename", "replace", "symlink_to", "iterdir", "glob",
        # ssl: loading credentials or trust anchors reads files
        "load_cert_chain", "load_verify_locations", "load_dh_params", "load_default_certs",
        "set_default_verify_paths",
    }
)  # fmt: skip
#: Known I/O calls still in a pure module, with the reason they go away. Keep it empty.
PURE_IO_TRANSITIONAL: dict[str, frozenset[str]] = {}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported_modules(module: str, tree: ast.AST, known: set[str], *, package: bool) -> set[str]:
    """Every homeport module ``module`` imports, at module level or inside functions.

    ``from homeport.x import y`` counts as an import of ``homeport.x.y`` when that is a
    module, else of ``homeport.x``; relative imports are resolved.
    """
    out: set[str] = set()
    base = module.split(".") if package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names] + [target]
            subs = [n for n in names[:-1] if n in known]
            names = subs if len(subs) == len(names) - 1 else [*subs, target]
        else:
            continue
        for name in names:
            found = name
            while found and found not in known:
                found = found.rpartition(".")[0]
            if found and found != module and found.startswith("homeport"):
                out.add(found)
    return out


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """``{module: (source, is_package)}`` → ``{module: imported homeport modules}``."""
    known = set(sources)
    return {
        mod: imported_modules(mod, ast.parse(src), known, package=pkg)
        for mod, (src, pkg) in sources.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in sorted(graph):
        if root in state:
            continue
        path = [root]
        state[root] = 1
        stack = [iter(sorted(graph.get(root, ())))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def store_violations(graph: dict[str, set[str]], allowed: frozenset[str]) -> list[str]:
    """``a imports b`` for every import of the database layer from outside the store package
    and the allow-list (``homeport.store.registry`` is the way in for everyone else)."""
    return sorted(
        f"{mod} imports {dep}"
        for mod, deps in graph.items()
        if mod not in allowed and not mod.startswith("homeport.store")
        for dep in deps
        if dep in ("homeport.store", "homeport.store.db")
    )


def pure_io_violations(
    module: str, tree: ast.AST, exempt: frozenset[str] = frozenset()
) -> list[str]:
    """File or socket I/O in a pure module: forbidden imports and file-touching calls."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PURE_FORBIDDEN_IMPORTS:
                    found.append(f"{module}:{node.lineno} imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            top = node.module.split(".")[0]
            if top in PURE_FORBIDDEN_IMPORTS or (
                top == "os" and any(a.name in OS_FILE_CALLS for a in node.names)
            ):
                found.append(f"{module}:{node.lineno} imports from {node.module}")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "open":
                found.append(f"{module}:{node.lineno} calls open()")
            elif isinstance(func, ast.Attribute):
                recv = func.value
                if isinstance(recv, ast.Name) and recv.id == "os":
                    if func.attr in OS_FILE_CALLS:
                        found.append(f"{module}:{node.lineno} calls os.{func.attr}()")
                elif func.attr in FILE_METHODS and func.attr not in exempt:
                    found.append(f"{module}:{node.lineno} calls .{func.attr}()")
    return found


def _sources() -> dict[str, tuple[str, bool]]:
    return {module_name(p): (p.read_text(), _is_package(p)) for p in FILES}


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph(_sources()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_only_the_allow_list_imports_the_store() -> None:
    assert store_violations(import_graph(_sources()), STORE_IMPORTERS) == []


@pytest.mark.parametrize(
    "path",
    [p for p in FILES if _package(p) in PURE],
    ids=lambda p: str(p.relative_to(SRC)),
)
def test_pure_layers_do_no_file_or_socket_io(path: Path) -> None:
    module = module_name(path)
    exempt = PURE_IO_TRANSITIONAL.get(module, frozenset())
    assert pure_io_violations(module, ast.parse(path.read_text()), exempt) == []


# -- each checker fails on a planted violation -------------------------------------------------


def test_cycle_check_finds_a_planted_cycle() -> None:
    sources = {
        "homeport.a": ("from homeport.b import thing\n", False),
        "homeport.b": ("def f():\n    from homeport import c\n", False),  # function level
        "homeport.c": ("import homeport.a\n", False),
        "homeport.d": ("import homeport.a\n", False),
    }
    assert find_cycle(import_graph(sources)) == [
        "homeport.a",
        "homeport.b",
        "homeport.c",
        "homeport.a",
    ]
    sources["homeport.c"] = ("import json\n", False)  # break the cycle: none is left
    assert find_cycle(import_graph(sources)) is None


def test_cycle_check_resolves_relative_and_submodule_imports() -> None:
    sources = {
        "homeport.pkg": ("from . import mod\n", True),
        "homeport.pkg.mod": ("from homeport.pkg import other\n", False),
        "homeport.pkg.other": ("from .. import pkg\n", False),
    }
    graph = import_graph(sources)
    assert graph["homeport.pkg"] == {"homeport.pkg.mod"}
    assert graph["homeport.pkg.mod"] == {"homeport.pkg.other"}
    assert find_cycle(graph) == [
        "homeport.pkg",
        "homeport.pkg.mod",
        "homeport.pkg.other",
        "homeport.pkg",
    ]


def test_the_real_app_admin_cycle_would_be_caught() -> None:
    """What main had: admin imported app (inside a function) while app imported admin."""
    sources = {
        "homeport.server.app": ("from homeport.server.admin import AdminOps\n", False),
        "homeport.server.admin": (
            "def admin_request():\n    from homeport.server.app import open_offline_state\n",
            False,
        ),
    }
    cycle = find_cycle(import_graph(sources))
    assert cycle is not None and set(cycle) == {"homeport.server.app", "homeport.server.admin"}


def test_store_check_finds_a_planted_importer() -> None:
    sources = {
        "homeport.store": ("", True),
        "homeport.store.db": ("", False),
        "homeport.store.registry": ("from homeport.store import db\n", False),
        "homeport.client.sneaky": ("def f():\n    from homeport.store.db import Store\n", False),
        "homeport.server.state": ("import homeport.store.db\n", False),
    }
    graph = import_graph(sources)
    assert store_violations(graph, frozenset({"homeport.server.state"})) == [
        "homeport.client.sneaky imports homeport.store.db"
    ]
    assert store_violations(graph, frozenset()) == [
        "homeport.client.sneaky imports homeport.store.db",
        "homeport.server.state imports homeport.store.db",
    ]


@pytest.mark.parametrize(
    "planted",
    [
        "import socket\n",
        "import subprocess\n",
        "from selectors import DefaultSelector\n",
        "import select\n",
        "from os import replace\n",
        "def f(p):\n    return open(p).read()\n",
        "import os\ndef f(p, d):\n    fd = os.open(p, 0)\n    os.write(fd, d)\n",
        "import os\ndef f(a, b):\n    os.replace(a, b)\n",
        "import os\ndef f(p):\n    os.chmod(p, 0o600)\n",
        "import os\ndef f(p):\n    os.makedirs(p)\n",
        "def f(path):\n    path.write_text('x')\n",
        "def f(path):\n    return path.read_bytes()\n",
        "def f(path):\n    path.mkdir()\n",
        "def f(ctx, c, k):\n    ctx.load_cert_chain(c, k)\n",
        "def f(ctx, ca):\n    ctx.load_verify_locations(cafile=ca)\n",
    ],
)
def test_pure_io_check_finds_a_planted_violation(planted: str) -> None:
    assert pure_io_violations("homeport.wire.planted", ast.parse(planted)) != []


def test_pure_io_check_accepts_pure_code() -> None:
    pure = (
        "import os, hashlib, binascii\n"
        "def f(b):\n    return hashlib.sha256(b + os.urandom(4)).hexdigest(), binascii.hexlify(b)\n"
    )
    assert pure_io_violations("homeport.wire.fine", ast.parse(pure)) == []


def test_pure_io_check_on_a_planted_file(tmp_path: Path) -> None:
    """The same check over a module file, as the suite runs it on src/."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from pathlib import Path\n\ndef save(p: Path) -> None:\n    p.write_bytes(b'')\n"
    )
    assert pure_io_violations("homeport.crypto.bad", ast.parse(bad.read_text())) == [
        "homeport.crypto.bad:4 calls .write_bytes()"
    ]
