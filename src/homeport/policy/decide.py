"""The one access decision: may ``src`` open a stream to ``requested`` on a destination?

Called by the coordinator before it relays an OPEN (early refusal) and by the
destination for every INCOMING (authoritative: the destination never trusts
the server's routing alone). Both call this same pure function with the same
inputs, so they cannot disagree except when their views differ (e.g. an ANNOUNCE
in flight), and the answer always says *which rule* decided and why, so the CLI
can explain it and tests can table it.

Rules today (the ACL policy file will add rules in front of the default):

======================  ==========================================================
rule                    effect
======================  ==========================================================
``service-exposed``     allow: the destination exposes the requested service
``not-exposed``         deny: the destination does not expose it (whoever asks)
======================  ==========================================================

Default deny: a request that names no exposed service is refused, and nothing
but an exposed service can ever be reached.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Exposed(Protocol):
    """What a service needs for the decision: the name and port clients ask for."""

    @property
    def name(self) -> str: ...

    @property
    def port(self) -> int: ...


E = TypeVar("E", bound=Exposed)


class Verdict(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class Subject:
    """Who asks: a node, and (with users and tags) who it belongs to."""

    node_id: str
    name: str
    user: str = ""
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision(Generic[E]):
    """A verdict with its machine code, a sentence for the user and the deciding rule."""

    verdict: Verdict
    code: str
    reason: str
    rule: str
    service: E | None = None

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW


#: Rule identifiers (stable: logs, tests and ``policy explain`` name them).
RULE_SERVICE_EXPOSED = "service-exposed"
RULE_NOT_EXPOSED = "not-exposed"


def match_service(services: Sequence[E], requested: str) -> E | None:
    """The exposed service a client means by ``requested`` (a name or a port number)."""
    for svc in services:
        if requested == svc.name or requested == str(svc.port):
            return svc
    return None


def decide(src: Subject, dst_name: str, services: Sequence[E], requested: str) -> Decision[E]:
    """May ``src`` reach ``requested`` (a service name or port) on ``dst_name``? Pure.

    ``services`` is what the destination exposes: its announced list at the
    server, its own configuration at the destination.
    """
    svc = match_service(services, requested)
    if svc is None:
        exposed = ", ".join(f"{s.name}/{s.port}" for s in services) or "none"
        return Decision(
            Verdict.DENY,
            "not-exposed",
            f"{dst_name} does not expose {requested!r} (exposed: {exposed})",
            RULE_NOT_EXPOSED,
        )
    return Decision(
        Verdict.ALLOW,
        "ok",
        f"{dst_name} exposes {svc.name!r} (port {svc.port}) to every node of the network",
        RULE_SERVICE_EXPOSED,
        svc,
    )
