"""Per-source token buckets, pure (``now`` passed in), with "log once per burst" built in.

Why: enrollment is the one thing an unauthenticated peer can make the server do
(parse a key, compare, write an audit record, log a line). Without a limit one
source guessed ~460 keys per second, each logged. A bucket per source address
allows :data:`ENROLL_BURST` attempts at once and :data:`ENROLL_RATE` per second
after that; the refusals of one burst produce exactly one "limited" verdict with
``first`` set, so the shell logs one line per burst, not one per attempt.

Bounded: at most ``max_keys`` sources are tracked; the least recently seen goes
first (a forgotten source starts with a full bucket, which is only generous).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Enrollment attempts per second one source address may sustain.
ENROLL_RATE = 1.0
#: Attempts one source may make at once (a few nodes behind one NAT enrolling together).
ENROLL_BURST = 10
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

    def take(self, key: str, now: float) -> Verdict:
        """Spend one token of ``key`` if it has one."""
        b = self._buckets.pop(key, None)  # re-inserted below: most recently seen last
        if b is None:
            b = _Bucket(float(self.burst), now)
            while len(self._buckets) >= self.max_keys:
                self._buckets.pop(next(iter(self._buckets)))
        else:  # a clock that went back adds nothing
            b.tokens = min(float(self.burst), b.tokens + max(0.0, now - b.at) * self.rate)
            b.at = now
        self._buckets[key] = b
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            b.limited = False
            return Verdict(True)
        first = not b.limited
        b.limited = True
        return Verdict(
            False,
            first,
            f"more than {self.burst} attempts at once or {self.rate:g}/s from this address",
        )

    def __len__(self) -> int:
        return len(self._buckets)
