"""API tokens for the admin listener's REST API (``homeport apikeys create|list|revoke``).

A token is ``hpk_<id>_<secret>``: ``id`` names the key in lists, logs and
``revoke`` (it is not secret); ``secret`` is 256 random bits. Only
:func:`hash_token` of the whole token is stored, so a copy of the database does
not let anyone call the API. Why a plain SHA-256 and no slow password hash: the
secret is uniformly random and 256 bits long, so there is nothing to brute-force
that a slow hash would protect; a fast hash keeps every request cheap.

Checking a token (:func:`verify_token`) is a pure function of the stored row,
the owning user's existence and ``now``: revoked, expired, or belonging to a
removed user all mean "no principal" (HTTP 401). The stored hash is compared in
constant time (the lookup is by hash too, which leaks nothing: an attacker who
learns a hash prefix still has no preimage).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

#: Prefix of every API token: lets secret scanners (and people) recognise a leaked one.
TOKEN_PREFIX = "hpk_"  # noqa: S105 - a prefix, not a secret
#: Hex characters of a key id (48 bits: unique enough for a handful of keys, short to type).
KEY_ID_HEX = 12  # (also in _TOKEN_RE)
#: Random bytes in a token's secret part.
SECRET_BYTES = 32
#: Longest token we even hash (a header can be long; ours are ~60 characters).
MAX_TOKEN = 256
#: Longest key name (shown in lists and the audit log).
MAX_NAME = 128

_TOKEN_RE = re.compile(r"^hpk_([0-9a-f]{12})_([A-Za-z0-9_-]{20,200})$")


class Scope(enum.Enum):
    """What a token may do: READ may only look (GET); ADMIN may change everything."""

    READ = "read"
    ADMIN = "admin"

    def allows(self, needed: Scope) -> bool:
        """Does a token of this scope satisfy a route that needs ``needed``?"""
        return self is Scope.ADMIN or needed is Scope.READ


@dataclass(frozen=True, slots=True)
class ApiPrincipal:
    """Who is calling: the API key that authenticated the request."""

    key_id: str
    name: str
    scope: Scope
    user: str | None


@dataclass(frozen=True, slots=True)
class NewToken:
    """A freshly made token: shown once, then only ``key_id`` and ``token_hash`` remain."""

    key_id: str
    token: str
    token_hash: str


def hash_token(token: str) -> str:
    """SHA-256 hex of the whole token (what the database stores)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token() -> NewToken:
    """A new random token ``hpk_<id>_<secret>``."""
    key_id = secrets.token_hex(KEY_ID_HEX // 2)
    token = f"{TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
    return NewToken(key_id, token, hash_token(token))


def token_key_id(token: str) -> str | None:
    """The key id inside a well-formed token, else None (never raises)."""
    if len(token) > MAX_TOKEN:
        return None
    mo = _TOKEN_RE.match(token)
    return None if mo is None else mo.group(1)


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an API key, or None."""
    if not name.strip():
        return "an API key needs a name (--name)"
    if len(name) > MAX_NAME:
        return f"API key name longer than {MAX_NAME} characters"
    if not name.isprintable():
        return "API key name must be printable"
    return None


@dataclass(frozen=True, slots=True)
class KeyVerdict:
    """The outcome of checking a presented token: a principal, or why not (for the log)."""

    principal: ApiPrincipal | None
    reason: str


def judge_key(
    *,
    token: str,
    stored_hash: str | None,
    key_id: str,
    name: str,
    scope: str,
    user: str | None,
    user_exists: bool,
    revoked: bool,
    expires_at: float | None,
    now: float,
) -> KeyVerdict:
    """Decide whether the stored row (``stored_hash`` None: no row) admits ``token`` at ``now``."""
    if stored_hash is None or not hmac.compare_digest(stored_hash, hash_token(token)):
        return KeyVerdict(None, "unknown token")
    if revoked:
        return KeyVerdict(None, f"API key {key_id} is revoked")
    if expires_at is not None and now >= expires_at:
        return KeyVerdict(None, f"API key {key_id} expired")
    if user is not None and not user_exists:
        return KeyVerdict(None, f"API key {key_id} belongs to removed user {user!r}")
    try:
        sc = Scope(scope)
    except ValueError:
        return KeyVerdict(None, f"API key {key_id} has unknown scope {scope!r}")
    return KeyVerdict(ApiPrincipal(key_id, name, sc, user), "ok")
