"""NAT-PMP (RFC 6886) and PCP (RFC 6887) MAP messages: pure encode/parse.

A home router that speaks either protocol can open a TCP port forward to our
direct port on request, which turns a symmetric NAT (no hole punching) into a
reachable ``mapped`` candidate. Both protocols use UDP port 5351 on the default
gateway; a PCP server that only speaks NAT-PMP answers a PCP request with a
NAT-PMP "unsupported version" result, which is how a client falls back.

Only what homeport needs is here: NAT-PMP public-address and TCP/UDP map
requests, and PCP MAP (no options). Responses come from the network and are
parsed by ``*_untrusted`` functions that raise only :class:`WireError`.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from homeport.wire.errors import WireError

#: The UDP port both protocols use on the gateway (RFC 6886 §3.1, RFC 6887 §19.1).
SERVER_PORT = 5351
NATPMP_VERSION = 0
PCP_VERSION = 2
#: Longest datagram we accept from a gateway (RFC 6887 §7: PCP messages ≤ 1100 bytes).
MAX_DATAGRAM = 1100
#: Length of the nonce in a PCP MAP request/response (RFC 6887 §11.1).
PCP_NONCE_LEN = 12

_OP_PUBLIC = 0
_OP_MAP_UDP = 1
_OP_MAP_TCP = 2
_PCP_OP_MAP = 1
_PCP_HEADER = 24
_PCP_MAP_LEN = 36
PROTO_TCP = 6
PROTO_UDP = 17


class NatPmpResult(enum.IntEnum):
    """NAT-PMP result codes (RFC 6886 §3.5)."""

    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    REFUSED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


class PcpResult(enum.IntEnum):
    """PCP result codes (RFC 6887 §7.4)."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


def result_text(protocol: str, code: int) -> str:
    """A human name for a result code (unknown codes are printed as numbers)."""
    enum_type: type[enum.IntEnum] = NatPmpResult if protocol == "natpmp" else PcpResult
    try:
        return "-".join(enum_type(code).name.lower().split("_"))
    except ValueError:
        return f"result {code}"


# -- NAT-PMP -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NatPmpPublicAddress:
    """Answer to the public-address request."""

    result: int
    epoch: int
    address: str


@dataclass(frozen=True)
class NatPmpMapping:
    """Answer to a map request (``lifetime`` 0 = deleted or refused)."""

    result: int
    epoch: int
    tcp: bool
    internal_port: int
    external_port: int
    lifetime: int


def natpmp_public_address_request() -> bytes:
    return bytes([NATPMP_VERSION, _OP_PUBLIC])


def natpmp_map_request(
    internal_port: int, external_port: int, lifetime: int, *, tcp: bool = True
) -> bytes:
    """A map request; ``external_port`` is a suggestion, ``lifetime`` 0 deletes the mapping."""
    if not (1 <= internal_port <= 65535 and 0 <= external_port <= 65535):
        raise ValueError("port out of range")
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise ValueError("lifetime out of range")
    op = _OP_MAP_TCP if tcp else _OP_MAP_UDP
    return struct.pack("!BBHHHI", NATPMP_VERSION, op, 0, internal_port, external_port, lifetime)


def natpmp_parse_request_untrusted(data: bytes) -> tuple[int, int, int, int] | None:
    """A request as a gateway reads it: ``(op, internal, external, lifetime)``; None = public.

    For the lab's stand-in gateway. Raises WireError.
    """
    if len(data) < 2 or data[0] != NATPMP_VERSION:
        raise WireError("not a NAT-PMP request")
    if data[1] == _OP_PUBLIC:
        if len(data) != 2:
            raise WireError("NAT-PMP public address request must be 2 bytes")
        return None
    if data[1] not in (_OP_MAP_UDP, _OP_MAP_TCP) or len(data) != 12:
        raise WireError(f"NAT-PMP opcode {data[1]} / length {len(data)} not understood")
    _v, op, _r, internal, external, lifetime = struct.unpack("!BBHHHI", data)
    return op, internal, external, lifetime


def natpmp_public_address_response(result: int, epoch: int, address: str) -> bytes:
    ip = ipaddress.IPv4Address(address)
    return struct.pack("!BBHI", NATPMP_VERSION, 128 + _OP_PUBLIC, result, epoch) + ip.packed


def natpmp_map_response(
    result: int, epoch: int, op: int, *, internal: int, external: int, lifetime: int
) -> bytes:
    return struct.pack(
        "!BBHIHHI", NATPMP_VERSION, 128 + op, result, epoch, internal, external, lifetime
    )


def _natpmp_head_untrusted(data: bytes, op: int) -> tuple[int, int]:
    if len(data) < 8:
        raise WireError(f"NAT-PMP response of {len(data)} bytes")
    if data[0] != NATPMP_VERSION:
        raise WireError(f"NAT-PMP response version {data[0]}")
    if data[1] != 128 + op:
        raise WireError(f"NAT-PMP response opcode {data[1]}, expected {128 + op}")
    result, epoch = struct.unpack_from("!HI", data, 2)
    return result, epoch


def natpmp_parse_public_address_untrusted(data: bytes) -> NatPmpPublicAddress:
    """Parse the answer to the public-address request. Raises WireError."""
    result, epoch = _natpmp_head_untrusted(data, _OP_PUBLIC)
    if result != NatPmpResult.SUCCESS:
        # Error answers may be truncated to the header (RFC 6886 §3.5).
        return NatPmpPublicAddress(result, epoch, "")
    if len(data) != 12:
        raise WireError(f"NAT-PMP public address response of {len(data)} bytes")
    return NatPmpPublicAddress(result, epoch, str(ipaddress.IPv4Address(data[8:12])))


def natpmp_parse_map_untrusted(data: bytes, *, tcp: bool = True) -> NatPmpMapping:
    """Parse the answer to a map request. Raises WireError."""
    result, epoch = _natpmp_head_untrusted(data, _OP_MAP_TCP if tcp else _OP_MAP_UDP)
    if result != NatPmpResult.SUCCESS and len(data) < 16:
        return NatPmpMapping(result, epoch, tcp, 0, 0, 0)
    if len(data) != 16:
        raise WireError(f"NAT-PMP map response of {len(data)} bytes")
    internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
    return NatPmpMapping(result, epoch, tcp, internal, external, lifetime)


# -- PCP -----------------------------------------------------------------------------------


def _ip16(address: str) -> bytes:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed).packed
    return ip.packed


def _ip_from16(raw: bytes) -> str:
    ip6 = ipaddress.IPv6Address(raw)
    return str(ip6.ipv4_mapped) if ip6.ipv4_mapped is not None else str(ip6)


@dataclass(frozen=True)
class PcpMapResponse:
    """A PCP MAP answer (``external_*`` are meaningful only on success)."""

    result: int
    lifetime: int
    epoch: int
    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_ip: str


def pcp_map_request(
    *,
    client_ip: str,
    nonce: bytes,
    internal_port: int,
    lifetime: int,
    protocol: int = PROTO_TCP,
    suggested_port: int = 0,
    suggested_ip: str = "0.0.0.0",
) -> bytes:
    """A PCP MAP request without options (RFC 6887 §7.1, §11.1)."""
    if len(nonce) != PCP_NONCE_LEN:
        raise ValueError("PCP nonce must be 12 bytes")
    if not (1 <= internal_port <= 65535 and 0 <= suggested_port <= 65535):
        raise ValueError("port out of range")
    header = struct.pack("!BBHI", PCP_VERSION, _PCP_OP_MAP, 0, lifetime) + _ip16(client_ip)
    body = (
        nonce + struct.pack("!B3xHH", protocol, internal_port, suggested_port) + _ip16(suggested_ip)
    )
    return header + body


def pcp_parse_map_request_untrusted(data: bytes) -> tuple[bytes, int, int, int, int]:
    """``(nonce, protocol, internal, suggested, lifetime)`` of a MAP request. Raises WireError."""
    if len(data) < _PCP_HEADER + _PCP_MAP_LEN or len(data) > MAX_DATAGRAM:
        raise WireError(f"PCP request of {len(data)} bytes")
    if data[0] != PCP_VERSION or data[1] != _PCP_OP_MAP:
        raise WireError("not a PCP MAP request")
    (lifetime,) = struct.unpack_from("!I", data, 4)
    nonce = bytes(data[_PCP_HEADER : _PCP_HEADER + PCP_NONCE_LEN])
    protocol, internal, suggested = struct.unpack_from("!B3xHH", data, _PCP_HEADER + 12)
    return nonce, protocol, internal, suggested, lifetime


def pcp_map_response(
    *,
    result: int,
    lifetime: int,
    epoch: int,
    nonce: bytes,
    protocol: int,
    internal_port: int,
    external_port: int,
    external_ip: str,
) -> bytes:
    header = struct.pack("!BBBBII", PCP_VERSION, 0x80 | _PCP_OP_MAP, 0, result, lifetime, epoch)
    body = (
        nonce + struct.pack("!B3xHH", protocol, internal_port, external_port) + _ip16(external_ip)
    )
    return header + b"\x00" * 12 + body


def is_natpmp_answer(data: bytes) -> bool:
    """Whether a datagram on the PCP socket is a NAT-PMP answer (a NAT-PMP-only gateway)."""
    return len(data) >= 2 and data[0] == NATPMP_VERSION


def pcp_parse_map_untrusted(data: bytes) -> PcpMapResponse:
    """Parse a PCP MAP answer (options, if any, are ignored). Raises WireError."""
    if len(data) < _PCP_HEADER or len(data) > MAX_DATAGRAM or len(data) % 4:
        raise WireError(f"PCP response of {len(data)} bytes")
    version, op, _r, result, lifetime, epoch = struct.unpack_from("!BBBBII", data, 0)
    if version != PCP_VERSION:
        raise WireError(f"PCP response version {version}")
    if op != 0x80 | _PCP_OP_MAP:
        raise WireError(f"PCP response opcode {op:#x}, expected MAP response")
    if len(data) < _PCP_HEADER + _PCP_MAP_LEN:
        if result == PcpResult.SUCCESS:
            raise WireError("PCP MAP success without a MAP body")
        return PcpMapResponse(result, lifetime, epoch, b"", 0, 0, 0, "")
    off = _PCP_HEADER
    nonce = bytes(data[off : off + PCP_NONCE_LEN])
    protocol, internal, external = struct.unpack_from("!B3xHH", data, off + 12)
    ext_ip = _ip_from16(bytes(data[off + 20 : off + 36]))
    return PcpMapResponse(result, lifetime, epoch, nonce, protocol, internal, external, ext_ip)
