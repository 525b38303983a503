"""The one exception family that parsers of network bytes may raise.

Every function here that reads bytes from the network ends in ``_untrusted``
and raises only :class:`WireError` (never IndexError, struct.error,
UnicodeDecodeError or json.JSONDecodeError). The I/O layer turns a WireError
into "close this connection with this reason"; it never crashes a process.
"""

from __future__ import annotations


class WireError(Exception):
    """Malformed or unacceptable bytes from the network."""

    code = "malformed"


class TooLarge(WireError):
    """A length field exceeds its named limit."""

    code = "too-large"


class UnknownType(WireError):
    """A frame type this protocol version does not define."""

    code = "unknown-type"


class BadVersion(WireError):
    """A protocol version we do not speak."""

    code = "bad-version"
