"""Exit nodes: which destinations a node lets streams leave to, decided on addresses. Pure.

A node opts in with ``homeport up --advertise-exit 192.168.1.0/24[,…]`` (or
``all``). Every exit stream names a destination ``host:port``; the exit node
resolves the name itself and dials only an address inside its advertised
networks. The check runs on the *resolved* address, so a name that resolves
outside (a DNS trick, or simply the wrong name) is refused like the address
itself would be.

Why loopback and link-local are special: ``all`` means "the networks this
machine routes to", not "the services listening on this machine's loopback"
(which would bypass ``--expose``) nor link-local metadata services
(169.254.169.254 on a cloud VM). They are reachable only when a network
that is itself loopback or link-local is listed explicitly. Unspecified and
multicast addresses are never dialed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

#: The ``--advertise-exit`` word for every destination (IPv4 and IPv6).
ALL = "all"
ALL_NETS = ("0.0.0.0/0", "::/0")
#: Most networks one node may advertise (longer lists are refused, or cut on the wire).
MAX_EXIT_NETS = 64
#: Longest destination ``host:port`` text an exit stream may carry.
MAX_DESTINATION = 1 + 253 + 1 + 1 + 5 + 1

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_exit_spec(text: str) -> tuple[str, ...]:
    """``all`` or comma-separated networks (``192.168.1.0/24``, ``2001:db8::/32``, an address);
    ``all`` may come with loopback/link-local networks, the ones it leaves out
    (``all,127.0.0.0/8``: every network and this machine's loopback).

    Returns the normalised network texts (duplicates dropped, order kept).

    Raises:
        ValueError: with a user-facing message.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("--advertise-exit: give networks (192.168.1.0/24,…) or 'all'")
    every = ALL in parts
    if every:  # beside 'all' only what it leaves out: loopback/link-local, listed explicitly
        parts = [*ALL_NETS, *(p for p in parts if p != ALL)]
    if len(parts) > MAX_EXIT_NETS:
        raise ValueError(f"--advertise-exit: at most {MAX_EXIT_NETS} networks")
    out: list[str] = []
    for i, part in enumerate(parts):
        try:
            net = ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise ValueError(
                f"--advertise-exit: {part[:60]!r} is not a network (e.g. 192.168.1.0/24) or 'all'"
            ) from None
        if every and i >= len(ALL_NETS) and not _special(net):
            raise ValueError(
                f"--advertise-exit: 'all' already includes {net}; beside 'all' list only "
                "loopback or link-local networks (which 'all' leaves out)"
            )
        if str(net) not in out:
            out.append(str(net))
    return tuple(out)


def nets_untrusted(texts: tuple[str, ...]) -> tuple[Network, ...]:
    """The networks of an announced list; bad entries dropped (never guessed), at most the limit."""
    out: list[Network] = []
    for t in texts[:MAX_EXIT_NETS]:
        try:
            out.append(ipaddress.ip_network(t, strict=True))
        except ValueError:
            continue
    return tuple(out)


def describe(texts: tuple[str, ...]) -> str:
    """``192.168.1.0/24, 10.0.0.0/8``, ``all`` or ``all, 127.0.0.0/8`` (or ``none``)."""
    if set(ALL_NETS) <= set(texts):
        return ", ".join([ALL, *(t for t in texts if t not in ALL_NETS)])
    return ", ".join(texts) or "none"


def split_destination(text: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` into its parts; a name is kept as text (resolved later).

    Raises:
        ValueError: with a user-facing message (also for untrusted input: callers refuse).
    """
    if len(text) > MAX_DESTINATION:
        raise ValueError(f"destination longer than {MAX_DESTINATION} characters")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad destination {text[:80]!r}: expected [IPV6]:PORT")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad destination {text[:80]!r}: {host[:60]!r} is not IPv6") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad destination {text[:80]!r}: expected HOST:PORT")
        if ":" in host:
            raise ValueError(f"bad destination {text[:80]!r}: write an IPv6 address as [ADDR]:PORT")
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise ValueError(f"bad destination {text[:80]!r}: {port_text[:8]!r} is not a port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"bad destination {text[:80]!r}: port out of range")
    if not _host_ok(host):
        raise ValueError(f"bad destination {text[:80]!r}: {host[:60]!r} is not a host name")
    return host, port


def _host_ok(host: str) -> bool:
    if not 0 < len(host) <= 253:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return True
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    ok = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
    return all(0 < len(lb) <= 63 and set(lb) <= ok for lb in labels)


def literal_address(host: str) -> Address | None:
    """``host`` as an address when it is one (no resolving), else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class AddressCheck:
    """May the exit node dial this address? ``code`` ``ok`` or ``not-allowed``; a sentence."""

    allowed: bool
    code: str
    reason: str


def _special(net: Network) -> bool:
    return net.is_loopback or net.is_link_local


def check_address(addr: Address, nets: tuple[Network, ...]) -> AddressCheck:
    """Whether ``addr`` (a resolved destination) is inside the advertised ``nets``."""
    mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    if mapped is not None:  # ::ffff:127.0.0.1 is 127.0.0.1 to the kernel
        addr = mapped
    if addr.is_unspecified or addr.is_multicast:
        return AddressCheck(False, "not-allowed", f"not allowed: {addr} is not a host address")
    inside = [n for n in nets if n.version == addr.version and addr in n]
    if not inside:
        shown = ", ".join(str(n) for n in nets) or "none"
        return AddressCheck(
            False, "not-allowed", f"not allowed: {addr} is outside the exit's networks ({shown})"
        )
    if (addr.is_loopback or addr.is_link_local) and not any(_special(n) for n in inside):
        kind = "loopback" if addr.is_loopback else "link-local"
        return AddressCheck(
            False,
            "not-allowed",
            f"not allowed: {addr} is {kind}; the exit must advertise such a network explicitly",
        )
    return AddressCheck(True, "ok", f"{addr} is inside {inside[0]}")
