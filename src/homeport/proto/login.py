"""Login checks for ``check`` SSH rules: who approved which device, and when (pure).

A ``check`` rule (docs/policy.md) admits a device only if its user completed a
check within the rule's ``checkPeriod``. How a check is completed is a
*provider* (:class:`ApprovalProvider`), so a browser-based OpenID Connect
provider can plug in later without touching the coordinator: a provider starts
a challenge for a device and later says which challenge was completed. This
release has one provider, :class:`CodeProvider`, which works without a browser:
``homeport login`` prints a short code, and an admin approves it on the server
host (``homeport login approve CODE``) or the same user approves it from another
device whose own check is fresh.

An OIDC provider would: ``start`` → a code plus an authorization URL (``url`` in
:class:`Challenge`); its callback (an HTTP handler in the server, outside this
module) verifies the ID token and calls :meth:`Approvals.complete` with the
code, the provider name and the verified user. Nothing else changes.

Approvals live in server memory only: a restart asks for a new check (the
safe direction). Times are passed in; nothing here sleeps or reads a clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

#: How long a started check waits for its approval (seconds).
CODE_TTL = 600.0
#: Checks waiting at once (the oldest is dropped beyond this).
MAX_PENDING = 1024
#: Devices whose last approval is remembered (the oldest is dropped beyond this).
MAX_APPROVALS = 65536
#: A device approves another one of its user only if its own check is this fresh.
APPROVER_MAX_AGE = 12 * 3600.0
#: Characters of a code: no 0/O, 1/I/L (read aloud, typed on a phone).
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
#: Code length (two groups of four: 31^8 ≈ 8.5e11, short-lived, per-request).
CODE_LEN = 8


@dataclass(frozen=True, slots=True)
class Challenge:
    """What the device shows its user: a code, and (for a browser provider) a URL."""

    code: str
    provider: str
    node_id: str
    user: str
    created_at: float
    expires_at: float
    url: str = ""
    approved_at: float | None = None

    def instructions(self) -> str:
        """One sentence for ``homeport login``'s output."""
        if self.url:
            return f"open {self.url} to approve this device (code {self.code})"
        return (
            f"login code {self.code}: an admin approves it on the server with "
            f"'homeport login approve {self.code}', or you do from another approved device"
        )


class ApprovalProvider(Protocol):
    """How a device's login check is completed (code now; OpenID Connect later)."""

    name: str

    def challenge(self, node_id: str, user: str, now: float) -> Challenge:
        """A new challenge for ``node_id`` (owned by ``user``)."""
        ...


class CodeProvider:
    """Short codes approved out of band (admin on the server host, or a sibling device)."""

    name = "code"

    def __init__(self, random_bytes: Callable[[int], bytes], ttl: float = CODE_TTL) -> None:
        self._random = random_bytes
        self.ttl = ttl

    def challenge(self, node_id: str, user: str, now: float) -> Challenge:
        raw = self._random(CODE_LEN)
        chars = "".join(CODE_ALPHABET[b % len(CODE_ALPHABET)] for b in raw)
        code = f"{chars[:4]}-{chars[4:]}"
        return Challenge(code, self.name, node_id, user, now, now + self.ttl)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer to an approval attempt: ok, and one sentence (for the caller and logs)."""

    ok: bool
    message: str
    challenge: Challenge | None = None


class Approvals:
    """Pending challenges and each device's last completed check (pure state)."""

    def __init__(self, provider: ApprovalProvider) -> None:
        self.provider = provider
        self._pending: dict[str, Challenge] = {}
        self._approved: dict[str, float] = {}  # node id -> when its check completed

    def approved_at(self, node_id: str) -> float | None:
        """When ``node_id`` last completed a check (None: never, since the server started)."""
        return self._approved.get(node_id)

    def start(self, node_id: str, user: str, now: float) -> Challenge:
        """Start a check for a device; any earlier pending one of the device is replaced."""
        self._expire(now)
        for code in [c for c, ch in self._pending.items() if ch.node_id == node_id]:
            del self._pending[code]
        ch = self.provider.challenge(node_id, user, now)
        while ch.code in self._pending:  # a collision: draw again
            ch = self.provider.challenge(node_id, user, now)
        if len(self._pending) >= MAX_PENDING:
            del self._pending[next(iter(self._pending))]
        self._pending[ch.code] = ch
        return ch

    def pending(self, code: str, now: float) -> Challenge | None:
        """The challenge ``code`` if it is still waiting (or was just approved)."""
        self._expire(now)
        return self._pending.get(code)

    def complete(self, code: str, now: float, *, approver_user: str | None = None) -> Outcome:
        """Approve ``code``. ``approver_user`` None: an admin; else that user's device.

        A device may approve only its own user's devices (checked by the caller for
        freshness, :meth:`may_approve`).
        """
        self._expire(now)
        ch = self._pending.get(code)
        if ch is None:
            return Outcome(False, f"no pending login with code {code!r} (expired or mistyped)")
        if approver_user is not None and (not ch.user or approver_user != ch.user):
            return Outcome(False, "a device may approve only logins of its own user")
        done = Challenge(
            ch.code,
            ch.provider,
            ch.node_id,
            ch.user,
            ch.created_at,
            ch.expires_at,
            ch.url,
            approved_at=now,
        )
        self._pending[code] = done  # kept until it expires, so the device's poll sees it
        if ch.node_id not in self._approved and len(self._approved) >= MAX_APPROVALS:
            del self._approved[next(iter(self._approved))]
        self._approved.pop(ch.node_id, None)
        self._approved[ch.node_id] = now
        return Outcome(True, f"approved the login of {ch.user or 'a device'} ({ch.node_id})", done)

    def may_approve(self, node_id: str, now: float) -> bool:
        """True if ``node_id``'s own check is fresh enough to approve a sibling device."""
        at = self._approved.get(node_id)
        return at is not None and now - at < APPROVER_MAX_AGE

    def _expire(self, now: float) -> None:
        for code in [c for c, ch in self._pending.items() if ch.expires_at <= now]:
            del self._pending[code]
