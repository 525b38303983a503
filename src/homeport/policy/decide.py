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

Exit streams (``homeport socks --via NODE``, docs/exit-nodes.md) are decided by
:func:`decide_exit`, in this order:

======================  ==========================================================
``not-exit``            deny: the node advertises no exit networks
``exit-destination``    deny: the destination is malformed, or an address outside
                        the advertised networks (names are checked by the exit
                        node after it resolves them)
``acls[N]``             allow (a policy is set): the first rule with a
                        ``NODE:exit`` destination that selects the exit node
``default-deny``        deny (a policy is set): no rule grants exit use
``exit-same-owner``     allow (no policy): the source and the exit node belong to
                        the same owner (same user, both untagged; in a network
                        without users, every untagged node)
``exit-owner-only``     deny (no policy): any other source — a tagged node or
                        another user's node needs an explicit rule
======================  ==========================================================

Why owner-only without a policy: an exit reaches a whole LAN, far more than
one exposed port, so the default never lends it to another user's machines.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from homeport.policy import exitnet
from homeport.policy.acl import CompiledPolicy, Subject, acl_check, exit_check
from homeport.wire.control import EXIT_SERVICE

__all__ = [
    "CODE_NOT_EXIT",
    "CODE_POLICY",
    "EXIT_SERVICE",
    "RULE_DEFAULT_DENY",
    "RULE_EXIT_DESTINATION",
    "RULE_EXIT_OWNER_ONLY",
    "RULE_EXIT_SAME_OWNER",
    "RULE_NOT_EXIT",
    "RULE_NOT_EXPOSED",
    "RULE_SERVICE_EXPOSED",
    "CompiledPolicy",
    "Decision",
    "ExitTarget",
    "Exposed",
    "Subject",
    "Verdict",
    "decide",
    "decide_exit",
    "exit_grant",
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
#: Exit-stream rules and codes (see the module docstring).
RULE_NOT_EXIT = "not-exit"
RULE_EXIT_DESTINATION = "exit-destination"
RULE_EXIT_SAME_OWNER = "exit-same-owner"
RULE_EXIT_OWNER_ONLY = "exit-owner-only"
CODE_NOT_EXIT = "not-exit"


@dataclass(frozen=True, slots=True)
class ExitTarget:
    """An allowed exit stream's destination (``name`` is :data:`EXIT_SERVICE`)."""

    host: str
    port: int
    name: str = EXIT_SERVICE

    @property
    def destination(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


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


def _same_owner(src: Subject, dst: Subject) -> bool:
    return not src.tags and not dst.tags and src.user == dst.user


def exit_grant(src: Subject, dst: Subject, policy: CompiledPolicy | None) -> Decision[ExitTarget]:
    """May ``src`` use ``dst`` as an exit node at all (policy only; ``policy explain``)?"""
    if policy is not None:
        acl = exit_check(policy, src, dst)
        if not acl.allowed:
            return Decision(Verdict.DENY, CODE_POLICY, acl.reason, acl.rule)
        return Decision(Verdict.ALLOW, "ok", acl.reason, acl.rule)
    if _same_owner(src, dst):
        who = f"{dst.user}'s" if dst.user else "this network's"
        return Decision(
            Verdict.ALLOW,
            "ok",
            f"no policy: {src.name} and {dst.name} are both {who} nodes, so {src.name} may "
            f"use {dst.name} as an exit node",
            RULE_EXIT_SAME_OWNER,
        )
    return Decision(
        Verdict.DENY,
        CODE_POLICY,
        f"no policy: only nodes of {dst.name}'s own owner may use it as an exit node; "
        f"grant others with a rule whose dst is {dst.name}:exit",
        RULE_EXIT_OWNER_ONLY,
    )


def decide_exit(
    src: Subject,
    dst: Subject,
    nets: Sequence[str],
    destination: str,
    policy: CompiledPolicy | None = None,
) -> Decision[ExitTarget]:
    """May ``src`` open a stream leaving ``dst`` (an exit node) to ``destination``? Pure.

    ``nets``: the networks ``dst`` advertises (its own settings at the exit
    node, its ANNOUNCE at the server). A name is allowed here and checked by
    the exit node once resolved (:func:`homeport.policy.exitnet.check_address`).
    """
    if not nets:
        return Decision(
            Verdict.DENY,
            CODE_NOT_EXIT,
            f"{dst.name} is not an exit node (on {dst.name} run: "
            "homeport set --advertise-exit NETWORK,… or all)",
            RULE_NOT_EXIT,
        )
    try:
        host, port = exitnet.split_destination(destination)
    except ValueError as exc:
        return Decision(Verdict.DENY, "bad-request", str(exc), RULE_EXIT_DESTINATION)
    addr = exitnet.literal_address(host)
    if addr is not None:
        check = exitnet.check_address(addr, exitnet.nets_untrusted(tuple(nets)))
        if not check.allowed:
            return Decision(Verdict.DENY, check.code, check.reason, RULE_EXIT_DESTINATION)
    grant = exit_grant(src, dst, policy)
    if not grant.allowed:
        return grant
    return Decision(Verdict.ALLOW, "ok", grant.reason, grant.rule, ExitTarget(host, port))
