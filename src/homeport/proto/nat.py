"""NAT behaviour as homeport names it (shared by discovery, path choice and the wire).

The values are the strings ENDPOINTS carries (``nat``) and ``status`` prints.
"""

from __future__ import annotations

import enum


class NatKind(enum.Enum):
    """How this node's direct port is mapped, as seen from the server."""

    NONE = "none"  # the server sees one of our own interface addresses: no NAT
    EIM = "eim"  # endpoint-independent mapping: the same public port towards every destination
    EDM = "edm"  # endpoint-dependent ("symmetric"): a new public port per destination
    UNKNOWN = "unknown"  # not measured (probe port unreachable, relay-only, older peer)
