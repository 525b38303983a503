"""``homeport status``: the network map as a table (or JSON), seen from this node."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from homeport.client.term import printable
from homeport.proto.node import SHIELDS_UP_FILE
from homeport.wire.control import NetMap, NodeInfo, Welcome

#: Warn about this node's own key expiry this far ahead (the server's NOTICE days: 14/3/1).
EXPIRY_WARN_AHEAD = 14 * 86400.0

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


def no_path(netmap: NetMap, node: NodeInfo) -> bool:
    """This node and offline nodes have no path (shown as ``-``)."""
    return node.node_id == netmap.self_id or not node.online


def path_text(detail: Mapping[str, Any] | None, fallback: str) -> str:
    """The PATH cell from the agent's view of a peer: ``direct 203.0.113.5:41641 1.2ms`` or
    ``relay (punch timed out)``; ``fallback`` (the server's view) without an agent."""
    if not detail:
        return fallback
    kind = str(detail.get("kind") or "relay")
    if kind != "relay":
        rtt = detail.get("rtt_ms")
        text = f"{kind} {detail.get('endpoint') or ''}".rstrip()
        return f"{text} {rtt:.1f}ms" if isinstance(rtt, int | float) else text
    reason = str(detail.get("reason") or "")
    return f"relay ({reason})" if reason else "relay"


def rows(
    netmap: NetMap,
    now: float | None = None,
    paths: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[tuple[str, ...]]:
    """One row per node, this node first, then by name (``paths``: the agent's per-peer view)."""
    now = time.time() if now is None else now
    paths = paths or {}
    nodes = sorted(netmap.nodes, key=lambda n: (n.node_id != netmap.self_id, n.name))
    out: list[tuple[str, ...]] = []
    for n in nodes:
        name = printable(n.name) + (" (this node)" if n.node_id == netmap.self_id else "")
        path = (
            "-"
            if no_path(netmap, n)
            else printable(path_text(paths.get(n.node_id), n.path or "relay"))
        )
        out.append(
            (
                name,
                "yes" if n.online else "no",
                last_seen_text(n, now),
                printable(services_text(n)),
                path,
            )
        )
    return out


def render_table(
    netmap: NetMap,
    now: float | None = None,
    paths: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    table = [COLUMNS, *rows(netmap, now, paths)]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table
    ]
    return "\n".join(lines) + "\n"


def to_json(
    netmap: NetMap,
    now: float | None = None,
    paths: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The map as JSON; ``path`` is the kind the text table shows (the agent's view when it
    runs, else the server's), so scripts reading ``.path`` see the path streams take."""
    now = time.time() if now is None else now
    paths = paths or {}
    out: list[dict[str, Any]] = []
    for n in netmap.nodes:
        mine = n.node_id == netmap.self_id
        detail = None if mine else paths.get(n.node_id)  # the agent has no path to itself
        kind = str(detail.get("kind") or "") if detail else ""
        out.append(
            {
                "node_id": n.node_id,
                "name": n.name,
                "self": mine,
                "online": n.online,
                "last_seen": n.last_seen,
                "last_seen_text": last_seen_text(n, now),
                "services": [{"name": s.name, "port": s.port} for s in n.services],
                "path": "" if no_path(netmap, n) else (kind or n.path or "relay"),
                "fingerprint": n.fingerprint,
                "path_detail": dict(detail) if detail is not None else None,
            }
        )
    return {"self_id": netmap.self_id, "nodes": out}


@dataclass(frozen=True, slots=True)
class SelfStatus:
    """This node's own standing with the server: approval and node-key expiry."""

    approved: bool = True
    expires_at: float = 0.0  # unix time; 0 = never
    warnings: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "approved": self.approved,
            "key_expires_at": self.expires_at or None,
            "warnings": list(self.warnings),
        }


def self_status(welcome: Welcome | None, now: float | None = None) -> SelfStatus:
    """What ``status`` says about this node itself (from the server's WELCOME).

    Why here and not only in the agent's log: a node that waits for approval,
    or whose key is about to expire while it is offline, is the one thing its
    owner must act on, and ``status`` is where they look.
    """
    if welcome is None:
        return SelfStatus()
    now = time.time() if now is None else now
    warnings: list[str] = []
    if not welcome.approved:
        warnings.append(
            f"{welcome.name} waits for an admin's approval: it sees no other node and no one "
            f"can reach it until 'homeport nodes approve {welcome.name}' runs on the server"
        )
    exp = welcome.expires_at
    if exp > 0 and exp - now <= EXPIRY_WARN_AHEAD:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(exp))
        left = exp - now
        days = f"{left / 86400:.0f} days" if left >= 86400 else f"{max(1, left // 3600):.0f} h"
        warnings.append(
            f"the key of {welcome.name} expires {when} (in {days}); a running 'homeport up' "
            f"renews it by itself, or an admin can run 'homeport nodes extend {welcome.name}'"
        )
    return SelfStatus(approved=welcome.approved, expires_at=exp, warnings=tuple(warnings))
