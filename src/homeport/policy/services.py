"""The destination's allow-list: which local services a stream may reach.

Until the ACL policy lands, the rule is: any node of the network may reach a
service that the destination node exposed, and nothing else. The check runs
at the destination (the agent), for every stream, even though the server
checks first — the destination must not trust the server's routing alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from homeport.wire import names

#: The ssh service always answers on port 22, whatever its local target.
SSH_NAME = "ssh"
SSH_PORT = 22
#: How much of a bad ``--expose`` spec an error message repeats.
MAX_SHOWN_SPEC = 80


@dataclass(frozen=True, slots=True)
class Service:
    """A local service an agent exposes: clients say ``name`` or ``port``."""

    name: str
    port: int
    target_host: str
    target_port: int


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    reason: str
    service: Service | None = None


def parse_expose(spec: str) -> Service:
    """Parse ``NAME=HOST:PORT`` (the CLI's ``--expose``).

    The service's port (what clients ask for) is the target port, except for
    ``ssh``, which is always port 22 so ``ssh labpc`` works unchanged.

    Raises:
        ValueError: with a message fit for the user.
    """
    shown = spec if len(spec) <= MAX_SHOWN_SPEC else spec[:MAX_SHOWN_SPEC] + "…"
    name, sep, target = spec.partition("=")
    host, sep2, port_text = target.rpartition(":")
    if not sep or not sep2 or not name or not host:
        raise ValueError(
            f"--expose {shown!r}: expected NAME=HOST:PORT, e.g. jupyter=127.0.0.1:8888"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise ValueError(f"--expose {shown!r}: {port_text[:16]!r} is not a port number")
    port = int(port_text)
    problem = (
        names.service_name_problem(name)
        or names.target_host_problem(host)
        or names.port_problem(port)
    )
    if problem is not None:
        raise ValueError(f"--expose {shown!r}: {problem}")
    return Service(
        name=name, port=SSH_PORT if name == SSH_NAME else port, target_host=host, target_port=port
    )


def resolve(services: tuple[Service, ...] | list[Service], requested: str) -> Verdict:
    """Decide whether a stream for ``requested`` (a name or a port) may proceed."""
    for svc in services:
        if requested == svc.name or requested == str(svc.port):
            return Verdict(True, f"service {svc.name!r} (port {svc.port}) is exposed", svc)
    exposed = ", ".join(f"{s.name}/{s.port}" for s in services) or "none"
    return Verdict(False, f"service {requested!r} is not exposed on this node (exposed: {exposed})")
