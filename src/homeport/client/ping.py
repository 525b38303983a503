"""``homeport ping NAME``: which way packets to a peer go, and how long they take.

Like ``tailscale ping``: one line per probe with the path it took and the round
trip; it stops once a probe went direct. The agent (``homeport up``) holds the
paths, so every probe is a query to its local API (``op: ping``): over the
peer's direct mux link when one is up (a mux PING), else a PEER_PING relayed by
the server, which also makes the agent ask for a direct path (the first probes
therefore usually say ``via relay`` and a later one ``via direct``).
"""

from __future__ import annotations

from typing import Any

#: Seconds between two probes (pacing, like ping(8); not a synchronisation).
INTERVAL = 1.0
#: Path kinds that count as direct (``ping`` stops after one).
DIRECT_KINDS = frozenset({"direct", "local", "mapped"})
#: Answers that the next probe would only repeat (no such node, not allowed, an agent
#: without direct paths): ``ping`` says it once and stops, instead of ``--count`` times.
FINAL_CODES = frozenset({"unknown", "not-allowed", "relay-only", "bad-name"})


def self_problem(dst: str, own_name: str) -> str | None:
    """``laptop is this node`` when asked to ping itself (no peer answers: it would time out)."""
    return f"{dst} is this node" if dst == own_name else None


def is_final(answer: dict[str, Any]) -> bool:
    """Whether a failed probe's reason cannot change by probing again (:data:`FINAL_CODES`)."""
    return answer.get("ok") is not True and answer.get("code") in FINAL_CODES


def probe_line(dst: str, answer: dict[str, Any]) -> str:
    """One probe as a line: ``pong from NAME via relay host:port in 3.1 ms`` or the error."""
    if answer.get("ok") is not True:
        code = str(answer.get("code") or "error")
        return f"no pong from {dst}: {answer.get('message') or code} [{code}]"
    via = str(answer.get("via") or "relay")
    endpoint = str(answer.get("endpoint") or "")
    ms = float(answer.get("ms") or 0.0)
    return f"pong from {dst} via {via} {endpoint} in {ms:.1f} ms"


def is_direct(answer: dict[str, Any]) -> bool:
    return answer.get("ok") is True and answer.get("via") in DIRECT_KINDS
