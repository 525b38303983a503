"""The ACL policy on the wire: what the server sends a node (POLICY) and what the node rebuilds.

Why per node: a node needs only the rules that can grant something *on it*
(:func:`homeport.policy.acl.rules_for_destination`), with sources kept
symbolic (users, tags, node names; groups already expanded), so a node that
joins elsewhere changes nobody's copy and a node never learns the rest of the
policy. The node checks every INCOMING against this copy (authoritative at the
destination); the server checks the same rules first (early refusal).
"""

from __future__ import annotations

from homeport.policy.acl import (
    EXIT_PORTS,
    AclRule,
    CompiledPolicy,
    DstEntry,
    PortRange,
    Sel,
    SelKind,
    Subject,
    rules_for_destination,
)
from homeport.wire import control as m
from homeport.wire.errors import WireError


def policy_message(
    policy: CompiledPolicy | None, node: Subject, version: int, *, exit_entries: bool = True
) -> m.Policy:
    """The POLICY for ``node`` (``active`` false when no policy is set).

    ``exit_entries`` false (a node without cap ``exit``): ``:exit`` destinations
    are left out, because such a node cannot read them (it would refuse every
    stream over an unreadable policy) and is never sent an exit stream anyway.
    """
    if policy is None:
        return m.Policy(version=version, active=False, user=node.user, tags=node.tags)
    rules = tuple(
        m.PolicyRule(
            name=r.name,
            src=tuple(m.PolicySel(s.kind.value, s.value, s.text) for s in r.src),
            dst=dst,
        )
        for r in rules_for_destination(policy, node)
        if (
            dst := tuple(
                m.PolicySel(d.sel.kind.value, d.sel.value, d.sel.text, d.ports_shown)
                for d in r.dst
                if exit_entries or not d.exit
            )
        )
    )
    return m.Policy(
        version=version,
        active=True,
        rules=rules,
        user=node.user,
        tags=node.tags,
        digest=policy.digest,
    )


def _sel(ps: m.PolicySel) -> Sel:
    try:
        kind = SelKind(ps.kind)
    except ValueError:
        raise WireError(f"POLICY: unknown selector kind {ps.kind[:32]!r}") from None
    return Sel(kind, ps.value, ps.text)


def _ports(text: str) -> tuple[PortRange, ...]:
    if text == "*":
        return (PortRange(1, 65535),)
    out = []
    for part in text.split(","):
        lo_s, dash, hi_s = part.partition("-")
        if not lo_s.isdigit() or (dash and not hi_s.isdigit()) or len(part) > 11:
            raise WireError(f"POLICY: bad ports {text[:32]!r}")
        lo, hi = int(lo_s), int(hi_s) if dash else int(lo_s)
        if not 1 <= lo <= hi <= 65535:
            raise WireError(f"POLICY: bad port range {part[:16]!r}")
        out.append(PortRange(lo, hi))
    return tuple(out)


def policy_from_message(msg: m.Policy) -> CompiledPolicy | None:
    """The node's copy of the rules (None: no policy set). Untrusted input.

    Raises:
        WireError: a selector kind or port list this node cannot read (the
            node then keeps refusing, never guesses).
    """
    if not msg.active:
        return None
    rules = tuple(
        AclRule(
            r.name[:64],
            tuple(_sel(s) for s in r.src),
            tuple(
                DstEntry(_sel(d), (), exit=True)
                if d.ports == EXIT_PORTS
                else DstEntry(_sel(d), _ports(d.ports))
                for d in r.dst
            ),
        )
        for r in msg.rules
    )
    return CompiledPolicy(acls=rules, text=msg.digest)
