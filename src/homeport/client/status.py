"""``homeport status``: the network map as a table (or JSON), seen from this node."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from homeport.proto.node import SHIELDS_UP_FILE
from homeport.wire.control import NetMap, NodeInfo

COLUMNS = ("NAME", "ONLINE", "LAST SEEN", "SERVICES", "PATH")
SHIELDS_UP_LINE = "shields up: this node accepts no incoming streams (homeport up --shields-up)"


def shields_up(state_dir: Path) -> bool:
    """Whether this node's last ``homeport up`` ran with ``--shields-up`` (its mark file)."""
    return (state_dir / SHIELDS_UP_FILE).exists()


def ago(seconds: float) -> str:
    """Human form of an age: ``now``, ``45s ago``, ``3m ago``, ``5h ago``, ``2d ago``."""
    s = max(0, int(seconds))
    if s < 5:
        return "now"
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m ago"
    if s < 86400:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


def last_seen_text(node: NodeInfo, now: float) -> str:
    if node.online:
        return "now"
    if node.last_seen <= 0:
        return "never"
    return ago(now - node.last_seen)


def services_text(node: NodeInfo) -> str:
    return (
        ",".join(s.name if s.name == str(s.port) else f"{s.name}/{s.port}" for s in node.services)
        or "-"
    )


def rows(netmap: NetMap, now: float | None = None) -> list[tuple[str, ...]]:
    """One row per node, this node first, then by name."""
    now = time.time() if now is None else now
    nodes = sorted(netmap.nodes, key=lambda n: (n.node_id != netmap.self_id, n.name))
    out: list[tuple[str, ...]] = []
    for n in nodes:
        name = f"{n.name} (this node)" if n.node_id == netmap.self_id else n.name
        path = "-" if n.node_id == netmap.self_id else (n.path or "relay")
        out.append(
            (name, "yes" if n.online else "no", last_seen_text(n, now), services_text(n), path)
        )
    return out


def render_table(netmap: NetMap, now: float | None = None) -> str:
    table = [COLUMNS, *rows(netmap, now)]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table
    ]
    return "\n".join(lines) + "\n"


def to_json(netmap: NetMap, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    return {
        "self_id": netmap.self_id,
        "nodes": [
            {
                "node_id": n.node_id,
                "name": n.name,
                "self": n.node_id == netmap.self_id,
                "online": n.online,
                "last_seen": n.last_seen,
                "last_seen_text": last_seen_text(n, now),
                "services": [{"name": s.name, "port": s.port} for s in n.services],
                "path": "" if n.node_id == netmap.self_id else (n.path or "relay"),
                "fingerprint": n.fingerprint,
            }
            for n in netmap.nodes
        ],
    }
