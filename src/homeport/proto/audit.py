"""Audit events: what the coordinator records in the append-only audit log.

The coordinator core emits :class:`Audit` commands (it never writes a file);
the server shell hands each one to the audit sink. One event = one line of the
log, so ``homeport audit`` can print, filter and follow them.

Why a fixed vocabulary of kinds: an audit log is read by people and scripts
long after the code changed, so kinds are stable strings, never reworded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Event kinds (stable strings: logs, tests and ``homeport audit --json`` readers name them).
ENROLL = "enroll"  # a node enrolled with an auth key
ENROLL_REFUSED = "enroll-refused"
APPROVE = "approve"  # an admin approved a node
NODE_REMOVE = "node-remove"
NODE_RENAME = "node-rename"  # an admin renamed a node
NODE_EXPIRY = "node-expiry"  # expire / extend / disable-expiry / renewed
KEY_CREATE = "key-create"
KEY_REVOKE = "key-revoke"
USER = "user"  # user created / removed
POLICY_SET = "policy-set"
POLICY_REFUSED = "policy-refused"
CERT_ISSUE = "cert-issue"  # node certificate renewed, or an ssh certificate issued
STREAM = "stream"  # a stream open: src, dst, service, allowed or denied, rule
PATH = "path"  # a direct path came up or was lost
API_KEY = "api-key"  # an admin API key created or revoked


@dataclass(frozen=True, slots=True)
class Audit:
    """One audit record: ``kind`` plus string fields (who, what, verdict, rule …).

    ``now`` is the core's clock when the event happened, so the log's order is
    the decision order even though the sink writes it later.
    """

    kind: str
    now: float
    fields: tuple[tuple[str, str], ...] = field(default=())

    def as_dict(self) -> dict[str, str]:
        return dict(self.fields)
