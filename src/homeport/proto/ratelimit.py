"""Per-source token buckets, pure (``now`` passed in), with "log once per burst" built in.

Why: enrollment is the one thing an unauthenticated peer can make the server do
(parse a key, compare, write an audit record, log a line). Without a limit one
source guessed ~460 keys per second, each logged. A bucket per source address
allows :data:`ENROLL_BURST` failed attempts at once and :data:`ENROLL_RATE` per
second after that (a successful enrollment spends nothing: provisioning fifty
nodes from one address is not guessing); the refusals of one burst produce
exactly one "limited" verdict with ``first`` set, so the shell logs one line per
burst, not one per attempt.

Bounded: at most ``max_keys`` sources are tracked; the least recently seen goes
first (a forgotten source starts with a full bucket, which is only generous).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Failed enrollment attempts per second one source address may sustain.
ENROLL_RATE = 1.0
#: Failed attempts one source may make at once (typos, a script with an old key).
ENROLL_BURST = 20
#: Sources whose buckets are remembered (least recently seen are dropped beyond this).
MAX_RATE_SOURCES = 16384


@dataclass(frozen=True, slots=True)
class Verdict:
    """``allowed``; else ``first`` says whether this refusal starts a burst (log it), and
    ``reason`` is the one line for the peer."""

    allowed: bool
    first: bool = False
    reason: str = ""


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    limited: bool = False  # refusing since the last allowed attempt


class TokenBuckets:
    """One bucket per key (a source address)."""

    def __init__(
        self, rate: float = ENROLL_RATE, burst: int = ENROLL_BURST, max_keys: int = MAX_RATE_SOURCES
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    def check(self, key: str, now: float) -> Verdict:
        """Whether ``key`` has a token, without spending it (spend with :meth:`spend` when
        the attempt turns out to count, e.g. a failed guess)."""
        b = self._refill(key, now)
        if b.tokens >= 1.0:
            b.limited = False
            return Verdict(True)
        first = not b.limited
        b.limited = True
        return Verdict(False, first, self._reason())

    def spend(self, key: str, now: float) -> None:
        """Take one token of ``key`` (may go below one; never below zero)."""
        b = self._refill(key, now)
        b.tokens = max(0.0, b.tokens - 1.0)

    def take(self, key: str, now: float) -> Verdict:
        """Spend one token of ``key`` if it has one."""
        verdict = self.check(key, now)
        if verdict.allowed:
            self.spend(key, now)
        return verdict

    def _reason(self) -> str:
        return (
            f"more than {self.burst} failed attempts at once or {self.rate:g}/s from this address"
        )

    def _refill(self, key: str, now: float) -> _Bucket:
        b = self._buckets.pop(key, None)  # re-inserted below: most recently seen last
        if b is None:
            b = _Bucket(float(self.burst), now)
            while len(self._buckets) >= self.max_keys:
                self._buckets.pop(next(iter(self._buckets)))
        else:  # a clock that went back adds nothing
            b.tokens = min(float(self.burst), b.tokens + max(0.0, now - b.at) * self.rate)
            b.at = max(b.at, now)
        self._buckets[key] = b
        return b

    def __len__(self) -> int:
        return len(self._buckets)
