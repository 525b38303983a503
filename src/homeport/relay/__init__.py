"""The relay: pairs two data connections by token and splices them, never seeing plaintext.

``pairing`` (pure tables), ``splice`` (the bounded worker engine), ``link``
(the :class:`Relay` protocol and :class:`InProcessRelay`).
"""

from homeport.relay.link import (
    InProcessRelay,
    Relay,
    RelayEvent,
    RelayStats,
    StreamEnded,
    StreamStarted,
    StreamStats,
)
from homeport.relay.pairing import (
    MAX_STREAMS,
    MAX_UNPAIRED,
    UNPAIRED_TIMEOUT,
    RelayFull,
    StreamState,
    TokenInUse,
)

__all__ = [
    "MAX_STREAMS",
    "MAX_UNPAIRED",
    "UNPAIRED_TIMEOUT",
    "InProcessRelay",
    "Relay",
    "RelayEvent",
    "RelayFull",
    "RelayStats",
    "StreamEnded",
    "StreamStarted",
    "StreamState",
    "StreamStats",
    "TokenInUse",
]
