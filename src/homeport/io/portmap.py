"""Ask the default gateway for a TCP port mapping of the direct port: PCP, then NAT-PMP.

Both protocols are one UDP request/answer on the gateway's port 5351 (RFC 6887,
RFC 6886), so a client is a few lines around :mod:`homeport.wire.natpmp`: no
dependency. PCP goes first (newer, and a NAT-PMP-only gateway answers it with a
NAT-PMP "unsupported version" datagram, which switches us over at once);
retries are bounded and short (the RFCs' 3 s / 250 ms initial timeouts would
stall discovery for a minute on a gateway that never answers).

UPnP IGD is not implemented: it needs SSDP multicast discovery, an HTTP fetch
and XML parsing of the device description and a SOAP call — an order of
magnitude more code and attack surface than PCP/NAT-PMP, which miniupnpd (the
IGD most home routers run) answers as well. The ``miniupnpc`` binding is a C
extension without wheels for our targets.

The gateway is read from ``/proc/net/route`` (no traffic is sent to find it).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from homeport.proto.natcheck import MappedPort
from homeport.wire import natpmp
from homeport.wire.errors import WireError

#: Seconds to wait for each try (three tries: ~1.75 s worst case per protocol).
DEFAULT_TIMEOUTS = (0.25, 0.5, 1.0)
#: Lifetime we ask for (seconds); renew at half of what is granted.
DEFAULT_LIFETIME = 7200


@dataclass(frozen=True)
class PortMapFailure:
    """No mapping: ``code`` is stable, ``reason`` printable."""

    code: str  # "no-gateway" | "no-answer" | "refused"
    reason: str


def default_gateway(route_file: str = "/proc/net/route") -> str | None:
    """The IPv4 default gateway of this network namespace, or None."""
    try:
        with open(route_file, encoding="ascii") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[1] == "00000000" and fields[2] != "00000000":
            return str(ipaddress.IPv4Address(bytes.fromhex(fields[2])[::-1]))
    return None


def _exchange(
    sock: socket.socket,
    request: bytes,
    gateway: str,
    timeouts: Sequence[float],
) -> bytes | None:
    """Send ``request`` and return the first datagram from the gateway, with retries."""
    for timeout in timeouts:
        sock.send(request)
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, src = sock.recvfrom(natpmp.MAX_DATAGRAM)
            except TimeoutError:
                break
            except ConnectionRefusedError:
                return None  # ICMP port unreachable: nothing listens on 5351
            if src[0] == gateway:  # connected: the kernel filters sources already
                return data
    return None


def _pcp(
    sock: socket.socket, internal_port: int, gateway: str, lifetime: int, timeouts: Sequence[float]
) -> MappedPort | PortMapFailure | None:
    """PCP MAP; None means "the gateway speaks only NAT-PMP" (or not at all)."""
    client_ip = sock.getsockname()[0]
    nonce = os.urandom(natpmp.PCP_NONCE_LEN)
    req = natpmp.pcp_map_request(
        client_ip=client_ip,
        nonce=nonce,
        internal_port=internal_port,
        lifetime=lifetime,
        suggested_port=internal_port,
    )
    data = _exchange(sock, req, gateway, timeouts)
    if data is None:
        return PortMapFailure("no-answer", f"no PCP/NAT-PMP answer from the gateway {gateway}")
    if natpmp.is_natpmp_answer(data):
        return None
    try:
        resp = natpmp.pcp_parse_map_untrusted(data)
    except WireError as exc:
        return PortMapFailure("refused", f"bad PCP answer from {gateway}: {exc}")
    if resp.result == natpmp.PcpResult.UNSUPP_VERSION:
        return None
    if resp.result != natpmp.PcpResult.SUCCESS:
        text = natpmp.result_text("pcp", resp.result)
        return PortMapFailure("refused", f"the gateway {gateway} refused a PCP mapping: {text}")
    if resp.nonce != nonce or resp.internal_port != internal_port:
        return PortMapFailure("refused", f"PCP answer from {gateway} does not match our request")
    return MappedPort(
        "pcp", resp.external_ip, resp.external_port, internal_port, resp.lifetime, gateway
    )


def _natpmp(
    sock: socket.socket, internal_port: int, gateway: str, lifetime: int, timeouts: Sequence[float]
) -> MappedPort | PortMapFailure:
    try:
        data = _exchange(sock, natpmp.natpmp_public_address_request(), gateway, timeouts)
        if data is None:
            return PortMapFailure("no-answer", f"no NAT-PMP answer from the gateway {gateway}")
        pub = natpmp.natpmp_parse_public_address_untrusted(data)
        if pub.result != natpmp.NatPmpResult.SUCCESS:
            text = natpmp.result_text("natpmp", pub.result)
            return PortMapFailure("refused", f"NAT-PMP public address from {gateway}: {text}")
        req = natpmp.natpmp_map_request(internal_port, internal_port, lifetime)
        data = _exchange(sock, req, gateway, timeouts)
        if data is None:
            return PortMapFailure("no-answer", f"no NAT-PMP map answer from {gateway}")
        resp = natpmp.natpmp_parse_map_untrusted(data)
    except WireError as exc:
        return PortMapFailure("refused", f"bad NAT-PMP answer from {gateway}: {exc}")
    if resp.result != natpmp.NatPmpResult.SUCCESS or resp.lifetime == 0:
        text = natpmp.result_text("natpmp", resp.result)
        return PortMapFailure("refused", f"the gateway {gateway} refused a NAT-PMP mapping: {text}")
    if resp.internal_port != internal_port:
        return PortMapFailure("refused", f"NAT-PMP answer from {gateway} is for another port")
    return MappedPort(
        "natpmp", pub.address, resp.external_port, internal_port, resp.lifetime, gateway
    )


def request_mapping(
    internal_port: int,
    *,
    gateway: str | None = None,
    lifetime: int = DEFAULT_LIFETIME,
    timeouts: Sequence[float] = DEFAULT_TIMEOUTS,
    server_port: int = natpmp.SERVER_PORT,
    protocols: Sequence[str] = ("pcp", "natpmp"),
) -> MappedPort | PortMapFailure:
    """Map TCP ``gateway-public:X -> us:internal_port``; PCP first, then NAT-PMP.

    Blocking, bounded by about ``3 * sum(timeouts)`` seconds at worst (PCP, then
    NAT-PMP's two requests). Call again after ``MappedPort.renew_after`` seconds to
    renew; ``lifetime=0`` deletes. ``protocols`` limits what is tried (tests).
    """
    gw = gateway or default_gateway()
    if gw is None:
        return PortMapFailure("no-gateway", "no IPv4 default gateway")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((gw, server_port))
            result: MappedPort | PortMapFailure | None = None
            if "pcp" in protocols:
                result = _pcp(sock, internal_port, gw, lifetime, timeouts)
            if result is None and "natpmp" in protocols:
                result = _natpmp(sock, internal_port, gw, lifetime, timeouts)
            if result is None:
                result = PortMapFailure("no-answer", f"the gateway {gw} speaks only NAT-PMP")
        except OSError as exc:
            return PortMapFailure("no-answer", f"port mapping via {gw}: {exc}")
    return result
