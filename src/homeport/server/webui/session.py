"""Web UI sessions and one-time login links: pure bookkeeping, the clock passed in.

Why server-side sessions and not a signed cookie: a session must end the moment an
operator logs out, its API token is revoked, or it sits idle — a signed cookie stays
valid until it expires. The cookie holds only a random id (32 bytes, URL-safe); the
server keeps who logged in, with which scope, and the session's CSRF token. Nothing
here is written to disk: a server restart logs everyone out, which is the safe side.

Limits: at most :data:`MAX_SESSIONS` sessions (the oldest is dropped first); a
session ends after :data:`SESSION_IDLE` seconds without a request or
:data:`SESSION_MAX` seconds after login, whichever comes first.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

#: Live web sessions kept; past this the least recently used one is dropped.
MAX_SESSIONS = 256
#: Seconds a session survives without a request.
SESSION_IDLE = 30 * 60.0
#: Seconds a session lives at most after login.
SESSION_MAX = 12 * 3600.0
#: One-time login links (``homeport admin-link``) waiting to be used.
MAX_LINKS = 64
#: Seconds a one-time login link stays valid.
LINK_TTL = 10 * 60.0
#: Bytes of randomness in session ids, CSRF tokens and login links.
TOKEN_BYTES = 32


class Access(Enum):
    """What a session may do: look (``read``) or also change things (``admin``)."""

    READ = "read"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Session:
    """One logged-in browser.

    ``token`` is the API token it logged in with (kept in server memory only, so a revoked
    token ends the session at its next request); "" for a one-time-link login.
    """

    sid: str
    who: str
    access: Access
    csrf: str
    created: float
    last_seen: float
    token: str = ""
    flash: str = ""
    flash_error: bool = False


class SessionStore:
    """Sessions by id, bounded, with idle and absolute expiry."""

    def __init__(
        self,
        *,
        idle: float = SESSION_IDLE,
        lifetime: float = SESSION_MAX,
        limit: int = MAX_SESSIONS,
        random: Callable[[int], str] = secrets.token_urlsafe,
    ) -> None:
        self.idle = idle
        self.lifetime = lifetime
        self.limit = limit
        self._random = random
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, who: str, access: Access, now: float, token: str = "") -> Session:
        """A new session (the oldest is dropped when :attr:`limit` are live)."""
        while len(self._sessions) >= self.limit:
            self._sessions.popitem(last=False)
        sess = Session(
            sid=self._random(TOKEN_BYTES),
            who=who,
            access=access,
            csrf=self._random(TOKEN_BYTES),
            created=now,
            last_seen=now,
            token=token,
        )
        self._sessions[sess.sid] = sess
        return sess

    def get(self, sid: str, now: float) -> Session | None:
        """The live session ``sid`` (its idle timer restarted), or None if unknown or expired."""
        sess = self._sessions.get(sid)
        if sess is None:
            return None
        if now - sess.last_seen > self.idle or now - sess.created > self.lifetime:
            del self._sessions[sid]
            return None
        sess = replace(sess, last_seen=now)
        self._sessions[sid] = sess
        self._sessions.move_to_end(sid)
        return sess

    def update(self, sess: Session) -> None:
        """Store a changed copy (flash message) of a live session."""
        if sess.sid in self._sessions:
            self._sessions[sess.sid] = sess

    def drop(self, sid: str) -> None:
        """Log out."""
        self._sessions.pop(sid, None)


def csrf_ok(sess: Session, sent: str) -> bool:
    """Whether a form carried this session's CSRF token (constant-time comparison)."""
    return bool(sent) and hmac.compare_digest(sess.csrf.encode(), sent.encode())


class LoginLinks:
    """One-time login tokens printed by ``homeport admin-link``; held in server memory.

    A link works once and for :data:`LINK_TTL` seconds; unused ones are forgotten.
    """

    def __init__(
        self,
        *,
        ttl: float = LINK_TTL,
        limit: int = MAX_LINKS,
        random: Callable[[int], str] = secrets.token_urlsafe,
    ) -> None:
        self.ttl = ttl
        self.limit = limit
        self._random = random
        self._links: OrderedDict[str, float] = OrderedDict()

    def create(self, now: float) -> tuple[str, float]:
        """A new token and the time it expires."""
        self._expire(now)
        while len(self._links) >= self.limit:
            self._links.popitem(last=False)
        token = self._random(TOKEN_BYTES)
        self._links[token] = now + self.ttl
        return token, now + self.ttl

    def redeem(self, token: str, now: float) -> bool:
        """Use ``token``: True once if it exists and has not expired."""
        self._expire(now)
        return self._links.pop(token, None) is not None

    def _expire(self, now: float) -> None:
        for token in [t for t, end in self._links.items() if end <= now]:
            del self._links[token]
