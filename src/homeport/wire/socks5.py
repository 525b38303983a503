"""SOCKS5 (RFC 1928), server side, CONNECT only: a sans-I/O machine for ``homeport socks``.

Why sans-I/O: the bytes come from any local program (a browser, curl, a
script), so the parser is untrusted-input code like every other parser here:
it sees bytes, returns events and bytes to send, and raises only
:class:`~homeport.wire.errors.WireError`. The driver (``client.socks``) owns
the socket and the stream to the exit node.

What is supported, and why no more:

* authentication method ``0x00`` (none) only: the proxy listens on loopback,
  where every local user could reach the node anyway with ``homeport nc``;
* command CONNECT only (BIND and UDP ASSOCIATE are answered with reply
  ``0x07``, "command not supported", as the RFC asks);
* destinations as IPv4, IPv6 or a domain name (``curl --socks5-hostname``):
  names are resolved by the exit node, never here, so names of the lab's LAN
  work and the local resolver learns nothing.

The flow: :meth:`Socks5Server.receive` the client's bytes until it returns a
:class:`ConnectRequest`; open the stream; then :meth:`Socks5Server.reply`
with :data:`REP_SUCCEEDED` (the machine hands over any bytes the client sent
early, in :attr:`Socks5Server.leftover`) or a failure code (the driver closes).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from homeport.wire.errors import TooLarge, WireError

VERSION = 5
#: Authentication methods (RFC 1928 §3).
METHOD_NONE = 0x00
METHOD_NO_ACCEPTABLE = 0xFF
#: Commands (§4).
CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_UDP_ASSOCIATE = 0x03
#: Address types (§4).
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04
#: Reply codes (§6).
REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_NOT_SUPPORTED = 0x08

#: Longest domain name a request may carry (the length byte's maximum).
MAX_DOMAIN = 255
#: Most bytes buffered before the request is complete: a greeting (2 + 255 methods)
#: plus the longest request (4 + 1 + 255 + 2); a client sending more before its
#: answer is pipelining data, which is kept (up to this limit) as ``leftover``.
MAX_BUFFER = 2 + 255 + 4 + 1 + MAX_DOMAIN + 2 + 4096


class Phase(enum.Enum):
    GREETING = "greeting"  # waiting for VER NMETHODS METHODS
    REQUEST = "request"  # method chosen; waiting for the request
    WAITING = "waiting"  # request parsed; the driver decides the reply
    OPEN = "open"  # success sent: the connection carries data now
    CLOSED = "closed"  # a failure was answered (or refused): close the connection


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """The client asks to connect to ``host:port`` (``host``: an address or a name)."""

    host: str
    port: int
    atyp: int

    @property
    def destination(self) -> str:
        """``host:port``, with an IPv6 address in brackets (the exit stream's form)."""
        return (
            f"[{self.host}]:{self.port}" if self.atyp == ATYP_IPV6 else f"{self.host}:{self.port}"
        )


@dataclass(frozen=True, slots=True)
class Refused:
    """The machine answered the client with a failure by itself (``why`` for the log)."""

    rep: int
    why: str


Event = ConnectRequest | Refused


def _reply(rep: int) -> bytes:
    # BND.ADDR 0.0.0.0:0: the client learns nothing about the exit node's sockets
    return bytes((VERSION, rep, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0))


class Socks5Server:
    """One SOCKS5 client connection's protocol state (server side)."""

    def __init__(self) -> None:
        self.phase = Phase.GREETING
        self._buf = bytearray()
        self._out = bytearray()
        self.leftover = b""

    def data_to_send(self) -> bytes:
        """Bytes to write to the client now."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_untrusted(self, data: bytes) -> Event | None:
        """Feed bytes from the client; the request once it is complete, else None.

        Raises:
            WireError: bytes that are not SOCKS5 (the driver closes at once);
                TooLarge when more than :data:`MAX_BUFFER` bytes pile up.
        """
        if self.phase in (Phase.OPEN, Phase.CLOSED):
            raise WireError(f"no SOCKS5 input expected in phase {self.phase.value}")
        if len(self._buf) + len(data) > MAX_BUFFER:
            raise TooLarge(f"more than {MAX_BUFFER} bytes before the SOCKS5 reply")
        self._buf += data
        if self.phase is Phase.GREETING:
            done = self._greeting()
            if done is not None or self.phase is Phase.GREETING:
                return done
        if self.phase is Phase.REQUEST:
            return self._request()
        return None  # WAITING: early data is kept for the handover

    def _greeting(self) -> Event | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        if buf[0] != VERSION:
            raise WireError(f"not SOCKS5 (version byte {buf[0]:#04x})")
        n = buf[1]
        if n == 0:
            raise WireError("SOCKS5 greeting offers no authentication method")
        if len(buf) < 2 + n:
            return None
        methods = bytes(buf[2 : 2 + n])
        del buf[: 2 + n]
        if METHOD_NONE not in methods:
            self._out += bytes((VERSION, METHOD_NO_ACCEPTABLE))
            self.phase = Phase.CLOSED
            return Refused(METHOD_NO_ACCEPTABLE, "the client offers no method without a password")
        self._out += bytes((VERSION, METHOD_NONE))
        self.phase = Phase.REQUEST
        return None

    def _request(self) -> Event | None:
        buf = self._buf
        if len(buf) < 5:
            return None
        ver, cmd, rsv, atyp = buf[0], buf[1], buf[2], buf[3]
        if ver != VERSION:
            raise WireError(f"SOCKS5 request with version byte {ver:#04x}")
        if rsv != 0:
            raise WireError("SOCKS5 request: reserved byte is not zero")
        if atyp == ATYP_IPV4:
            end = 4 + 4
        elif atyp == ATYP_IPV6:
            end = 4 + 16
        elif atyp == ATYP_DOMAIN:
            end = 5 + buf[4]
        else:
            return self._refuse(REP_ADDRESS_NOT_SUPPORTED, f"address type {atyp:#04x}")
        if len(buf) < end + 2:
            return None
        raw = bytes(buf[4:end])
        port = int.from_bytes(buf[end : end + 2], "big")
        del buf[: end + 2]
        if cmd != CMD_CONNECT:
            return self._refuse(REP_COMMAND_NOT_SUPPORTED, f"command {cmd:#04x} (only CONNECT)")
        if port == 0:
            return self._refuse(REP_GENERAL_FAILURE, "destination port 0")
        if atyp == ATYP_IPV4:
            host = str(ipaddress.IPv4Address(raw))
        elif atyp == ATYP_IPV6:
            host = str(ipaddress.IPv6Address(raw))
        else:
            host = _domain(raw[1:])
        self.phase = Phase.WAITING
        return ConnectRequest(host, port, atyp)

    def _refuse(self, rep: int, why: str) -> Refused:
        self._out += _reply(rep)
        self.phase = Phase.CLOSED
        return Refused(rep, why)

    def reply(self, rep: int) -> None:
        """Answer the request: :data:`REP_SUCCEEDED` opens the data phase, anything else closes.

        Raises:
            ValueError: not waiting for a reply (a driver bug, not input).
        """
        if self.phase is not Phase.WAITING:
            raise ValueError(f"reply in phase {self.phase.value}")
        if not 0 <= rep <= 0xFF:
            raise ValueError(f"bad reply code {rep}")
        self._out += _reply(rep)
        if rep == REP_SUCCEEDED:
            self.phase = Phase.OPEN
            self.leftover = bytes(self._buf)
        else:
            self.phase = Phase.CLOSED
        self._buf.clear()


def _domain(raw: bytes) -> str:
    """A domain name from a request: printable ASCII without spaces, or a WireError."""
    if not raw:
        raise WireError("SOCKS5 request: empty domain name")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise WireError("SOCKS5 request: domain name is not ASCII") from None
    if not all(33 <= ord(c) < 127 for c in text) or any(c in "[]/@" for c in text):
        raise WireError("SOCKS5 request: domain name has characters a name cannot have")
    return text


def encode_greeting(methods: bytes = bytes((METHOD_NONE,))) -> bytes:
    """A client greeting (for tests and the e2e client)."""
    return bytes((VERSION, len(methods))) + methods


def encode_request(host: str, port: int, cmd: int = CMD_CONNECT) -> bytes:
    """A client request for ``host:port`` (an IPv4/IPv6 address or a name)."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("ascii")
        if not 0 < len(name) <= MAX_DOMAIN:
            raise ValueError(f"domain name of {len(name)} bytes") from None
        body = bytes((ATYP_DOMAIN, len(name))) + name
    else:
        atyp = ATYP_IPV4 if addr.version == 4 else ATYP_IPV6
        body = bytes((atyp,)) + addr.packed
    return bytes((VERSION, cmd, 0)) + body + port.to_bytes(2, "big")
