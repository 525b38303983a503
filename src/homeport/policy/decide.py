"""The one access decision: may ``src`` open a stream to ``requested`` on a destination?

Called by the coordinator before it relays an OPEN (early refusal) and by the
destination for every INCOMING (authoritative: the destination never trusts
the server's routing alone). Both call this same pure function with the same
inputs, so they cannot disagree except when their views differ (e.g. an ANNOUNCE
in flight), and the answer always says *which rule* decided and why, so the CLI
can explain it and tests can table it.

Rules, in order:

======================  ==========================================================
rule                    effect
======================  ==========================================================
``not-exposed``         deny: the destination does not expose the requested
                        service (whoever asks, policy or not)
``acls[N]``             allow (a policy is set): the first ``acls`` rule that lets
                        the source reach the destination on the service's port
``default-deny``        deny (a policy is set, code ``policy``): no rule grants it
``service-exposed``     allow (no policy): every node may reach every exposed
                        service — the documented default without a policy file
======================  ==========================================================

Default deny: a request that names no exposed service is refused, and nothing
but an exposed service can ever be reached; with a policy, only what a rule
grants (see :mod:`homeport.policy.acl`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from homeport.policy.acl import CompiledPolicy, Subject, acl_check

__all__ = [
    "CODE_POLICY",
    "RULE_DEFAULT_DENY",
    "RULE_NOT_EXPOSED",
    "RULE_SERVICE_EXPOSED",
    "CompiledPolicy",
    "Decision",
    "Exposed",
    "Subject",
    "Verdict",
    "decide",
    "match_service",
]


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
RULE_DEFAULT_DENY = "default-deny"
#: The deny code of a policy refusal (OPEN_FAILED / REJECT code).
CODE_POLICY = "policy"


def match_service(services: Sequence[E], requested: str) -> E | None:
    """The exposed service a client means by ``requested`` (a name or a port number)."""
    for svc in services:
        if requested == svc.name or requested == str(svc.port):
            return svc
    return None


def decide(
    src: Subject,
    dst: Subject,
    services: Sequence[E],
    requested: str,
    policy: CompiledPolicy | None = None,
) -> Decision[E]:
    """May ``src`` reach ``requested`` (a service name or port) on ``dst``? Pure.

    ``services`` is what the destination exposes: its announced list at the
    server, its own configuration at the destination. ``policy``: the ACL
    policy in force (None: no policy file, every node may reach every exposed
    service).
    """
    svc = match_service(services, requested)
    if svc is None:
        exposed = ", ".join(f"{s.name}/{s.port}" for s in services) or "none"
        return Decision(
            Verdict.DENY,
            "not-exposed",
            f"{dst.name} does not expose {requested!r} (exposed: {exposed})",
            RULE_NOT_EXPOSED,
        )
    if policy is not None:
        acl = acl_check(policy, src, dst, svc.port)
        if not acl.allowed:
            return Decision(Verdict.DENY, CODE_POLICY, acl.reason, acl.rule)
        return Decision(Verdict.ALLOW, "ok", acl.reason, acl.rule, svc)
    return Decision(
        Verdict.ALLOW,
        "ok",
        f"{dst.name} exposes {svc.name!r} (port {svc.port}) to every node of the network",
        RULE_SERVICE_EXPOSED,
        svc,
    )
