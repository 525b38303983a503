"""``homeport status --watch``: a live view of the network, redrawn every second.

Pure rendering (:func:`build_rows`, :func:`render`, :func:`screen`): data in, text
out, ``now`` passed in — the command in :mod:`homeport.client.cli` only fetches
and prints. Every string that came from the server or the agent (node names,
path reasons, endpoints) goes through :func:`homeport.wire.logtext.esc`, so a
hostile name cannot move the cursor or clear the screen.

Why ANSI "home + clear to end" instead of curses: no dependency, no alternate
screen that hides the last frame after Ctrl-C, and no flicker — each frame
overwrites the previous one in place (cursor home, every line ends with
clear-to-end-of-line, then clear-to-end-of-screen), the screen is never blanked.
When stdout is not a terminal, frames are plain text blocks, one per interval.

Traffic: the agent counts streams per peer (opened direct / via the relay), not
bytes, so the rate shown is streams opened per minute over the last interval.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from homeport.client.status import last_seen_text, path_text, services_text
from homeport.wire.control import NetMap
from homeport.wire.logtext import esc

#: Cursor home; clear to end of line; clear to end of screen; hide / show the cursor.
HOME = "\x1b[H"
CLEAR_EOL = "\x1b[K"
CLEAR_EOS = "\x1b[J"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"
#: Longest name / path cell shown (the rest is cut by esc, marked ``...(+N)``).
MAX_CELL = 48
#: WHY last: on a narrow terminal it is what gets cut.
COLUMNS = ("NAME", "ONLINE", "LAST SEEN", "SERVICES", "PATH", "STREAMS/MIN", "WHY")


@dataclass(frozen=True, slots=True)
class WatchRow:
    """One node in a frame (cells already escaped)."""

    node_id: str
    name: str
    online: str
    last_seen: str
    services: str
    path: str
    why: str
    rate: str


def _streams(detail: Mapping[str, Any] | None) -> int:
    if not detail:
        return 0
    total = 0
    for key in ("streams_direct", "streams_relay"):
        v = detail.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            total += v
    return total


def build_rows(
    netmap: NetMap,
    agent: Mapping[str, Any] | None,
    prev: Mapping[str, int],
    dt: float,
    now: float,
) -> tuple[list[WatchRow], dict[str, int]]:
    """The rows of one frame and the stream counts to pass as ``prev`` next time.

    ``agent``: the local agent's ``status`` answer (None: not running; paths then
    come from the server's map and there are no rates). The agent's peer map is
    fresher than ``netmap`` for ``online``.
    """
    details: dict[str, Mapping[str, Any]] = {}
    if agent:
        for p in agent.get("peers") or []:
            if isinstance(p, Mapping) and isinstance(p.get("node_id"), str):
                details[p["node_id"]] = p
    counts: dict[str, int] = {}
    rows: list[WatchRow] = []
    nodes = sorted(netmap.nodes, key=lambda n: (n.node_id != netmap.self_id, n.name))
    for n in nodes:
        me = n.node_id == netmap.self_id
        d = details.get(n.node_id)
        online = n.online if d is None or "online" not in d else d.get("online") is True
        online = online or me
        count = _streams(d)
        counts[n.node_id] = count
        rate = "-"
        if d is not None and dt > 0 and n.node_id in prev:
            rate = f"{max(0, count - prev[n.node_id]) * 60.0 / dt:.0f}"
        if me or not online:
            path, why = "-", ""
        else:
            path = path_text({**d, "reason": ""} if d else None, n.path or "relay")
            why = str(d.get("reason") or "") if d else ""
        seen = "now" if online else last_seen_text(n, now)
        rows.append(
            WatchRow(
                node_id=n.node_id,
                name=esc(n.name, MAX_CELL) + (" (this node)" if me else ""),
                online="yes" if online else "no",
                last_seen=seen,
                services=esc(services_text(n), MAX_CELL),
                path=esc(path, MAX_CELL),
                why=esc(why, MAX_CELL * 2),
                rate=rate,
            )
        )
    return rows, counts


def render(rows: list[WatchRow], *, header: str, now: float, width: int = 0) -> list[str]:
    """The frame's lines: a header (``header`` escaped), the table; cut to ``width`` if > 0."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    online = sum(1 for r in rows if r.online == "yes")
    lines = [f"{esc(header, 200)}  {online}/{len(rows)} online  {stamp}  (Ctrl-C quits)", ""]
    table = [
        COLUMNS,
        *[(r.name, r.online, r.last_seen, r.services, r.path, r.rate, r.why) for r in rows],
    ]
    widths = [max(len(t[i]) for t in table) for i in range(len(COLUMNS))]
    for t in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip())
    if width > 0:
        lines = [ln[:width] for ln in lines]
    return lines


def screen(lines: list[str], *, tty: bool) -> str:
    """What to write for one frame: in place on a terminal, a plain block otherwise."""
    if not tty:
        return "\n".join(lines) + "\n\n"
    return HOME + "".join(ln + CLEAR_EOL + "\n" for ln in lines) + CLEAR_EOS
