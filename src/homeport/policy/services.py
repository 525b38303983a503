"""The destination's allow-list: which local services a stream may reach.

Until the ACL policy lands, the rule is: any node of the network may reach a
service that the destination node exposed, and nothing else. The check runs
at the destination (the agent), for every stream, even though the server
checks first — the destination must not trust the server's routing alone.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The ssh service always answers on port 22, whatever its local target.
SSH_NAME = "ssh"
SSH_PORT = 22


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
    name, sep, target = spec.partition("=")
    host, sep2, port_text = target.rpartition(":")
    if not sep or not sep2 or not name or not host:
        raise ValueError(f"--expose {spec!r}: expected NAME=HOST:PORT, e.g. jupyter=127.0.0.1:8888")
    if not name.replace("-", "").replace("_", "").isalnum() or name.isdigit():
        raise ValueError(f"--expose {spec!r}: service name must be letters, digits, - or _")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"--expose {spec!r}: {port_text!r} is not a port number") from None
    if not 0 < port < 65536:
        raise ValueError(f"--expose {spec!r}: port {port} out of range")
    host = host.strip("[]")
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
