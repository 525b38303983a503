"""Reconnect schedule: exponential backoff with full jitter, pure.

Why jitter: after a server restart every agent reconnects; full jitter
(AWS architecture blog, "Exponential Backoff And Jitter") spreads them out.
Why a reset: a connection that stayed up for ``stable_after`` seconds was a
success, so the next failure starts over from the base delay.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    base: float = 0.5
    cap: float = 30.0
    stable_after: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        """Delay before the next attempt; grows until ``cap``."""
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return self.rng.uniform(ceiling / 2, ceiling)

    def connected_for(self, seconds: float) -> None:
        """Report how long the last connection lasted."""
        if seconds >= self.stable_after:
            self.attempt = 0
