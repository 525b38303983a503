"""``homeport netcheck``: what this node's network allows, as the agent measures it now.

The agent runs a fresh discovery from its direct port (whoami on the server's
main and probe ports, local addresses, a router port mapping) and answers with
the observations and the NAT verdict (:mod:`homeport.proto.natcheck`); this
module only renders that answer.
"""

from __future__ import annotations

from typing import Any


def _yes_no(value: object) -> str:
    if value is None:
        return "unknown"
    return "yes" if value else "no"


def render(report: dict[str, Any]) -> str:
    """The report as ``key: value`` lines (stable labels; tests and docs quote them)."""
    latency = report.get("latency_ms")
    lines = [
        f"server:                {report.get('server', '')}",
        "  reachable:           "
        + ("yes" if report.get("server_reachable") else f"no ({report.get('server_error', '')})"),
        "  latency:             " + (f"{latency:.1f} ms" if latency is not None else "-"),
        f"public address (main): {report.get('seen_main') or '-'}",
        "public address (probe): "
        + (
            report.get("seen_probe")
            or f"- ({report.get('probe_error') or 'probe port ' + str(report.get('probe_port'))})"
        ),
        f"mapping varies by destination: {_yes_no(report.get('varies_by_destination'))}",
        f"nat:                   {report.get('nat', 'unknown')} ({report.get('nat_reason', '')})",
        "port mapping:          "
        + (
            f"{report['portmap']} {report.get('portmap_mapping', '')}"
            if report.get("portmap")
            else f"none ({report.get('portmap_error') or 'not asked'})"
        ),
        f"direct port:           {report.get('direct_port', 0)}",
        "candidates:            "
        + (", ".join(f"{c['kind']} {c['addr']}" for c in report.get("candidates", [])) or "none"),
    ]
    return "\n".join(lines) + "\n"
