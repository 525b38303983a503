"""What discovery observed, what it means, and which candidates to offer: pure decisions.

``io.netcheck`` gathers :class:`Observations` from the direct port (two whoami
answers, the local interface addresses, a router port mapping); this module
turns them into a :class:`NatVerdict` (the NAT kind with a code and a reason
``status``/``netcheck`` can print) and the ordered candidate list ENDPOINTS
carries. Nothing here touches the network, so the whole decision is tabled in
tests.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from homeport.proto.nat import NatKind
from homeport.wire.probe import format_addr

#: At most this many candidates are offered (ENDPOINTS carries ≤ 16).
MAX_CANDIDATES = 16
#: Dial order: same LAN first (cheapest, works without any NAT cooperation), then a
#: router-made mapping (works against every peer), then the server-observed address.
KIND_ORDER = ("local", "mapped", "public")


@dataclass(frozen=True)
class MappedPort:
    """A port mapping a gateway granted (NAT-PMP / PCP / UPnP)."""

    protocol: str  # "pcp" | "natpmp" | "upnp"
    external_ip: str
    external_port: int
    internal_port: int
    lifetime: int  # seconds granted
    gateway: str

    @property
    def renew_after(self) -> float:
        """Seconds after which to renew (RFC 6886 §3.3 suggests half the lifetime)."""
        return self.lifetime / 2


@dataclass(frozen=True)
class Observations:
    """Everything discovery saw from the direct port ``direct_port``.

    ``main``/``probe`` are the ``(ip, port)`` the server reported on its main and
    probe ports, or None with the error in ``*_error``.
    """

    direct_port: int
    local_addrs: tuple[str, ...] = ()
    main: tuple[str, int] | None = None
    main_error: str = ""
    probe: tuple[str, int] | None = None
    probe_error: str = ""
    mapping: MappedPort | None = None
    mapping_error: str = ""
    rtt_ms: float | None = None


@dataclass(frozen=True)
class NatVerdict:
    """The NAT kind with a stable code and a sentence saying why."""

    kind: NatKind
    code: str
    reason: str


@dataclass(frozen=True, order=True)
class Candidate:
    """An address a peer may dial to reach our direct port."""

    kind: str  # "local" | "mapped" | "public"
    host: str
    port: int

    @property
    def addr(self) -> str:
        return format_addr(self.host, self.port)


def classify_nat(obs: Observations) -> NatVerdict:
    """How the NAT in front of the direct port maps it, from two whoami observations."""
    if obs.main is None:
        return NatVerdict(
            NatKind.UNKNOWN,
            "no-server",
            f"the server is unreachable from the direct port: {obs.main_error or 'no answer'}",
        )
    if obs.probe is None:
        return NatVerdict(
            NatKind.UNKNOWN,
            "no-probe-port",
            "the server's probe port is unreachable: mapping unknown"
            + (f" ({obs.probe_error})" if obs.probe_error else ""),
        )
    (ip1, port1), (ip2, port2) = obs.main, obs.probe
    seen = format_addr(ip1, port1)
    if ip1 != ip2:
        return NatVerdict(
            NatKind.EDM,
            "edm",
            f"the server sees different public addresses ({seen} vs {format_addr(ip2, port2)}):"
            " endpoint-dependent mapping",
        )
    if port1 != port2:
        return NatVerdict(
            NatKind.EDM,
            "edm",
            f"the public port differs by destination ({port1} vs {port2}):"
            " endpoint-dependent (symmetric) NAT",
        )
    if ip1 in obs.local_addrs and port1 == obs.direct_port:
        return NatVerdict(NatKind.NONE, "public", f"no NAT: the server sees our own address {seen}")
    return NatVerdict(
        NatKind.EIM,
        "eim",
        f"the same public address {seen} towards both server ports: endpoint-independent mapping",
    )


def _usable_local(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified)


def candidates(obs: Observations, verdict: NatVerdict) -> list[Candidate]:
    """The candidates to offer peers, in dial order, deduplicated, at most :data:`MAX_CANDIDATES`.

    * ``local``: every usable interface address with the direct port (same-LAN peers).
    * ``mapped``: the router's mapping, if one was granted.
    * ``public``: the observed address when the mapping does not depend on the
      destination; and the observed IP with the direct port itself, which is
      where a static port forward (``--direct-port N``) lands even behind a
      symmetric NAT.
    """
    out: list[Candidate] = []
    public_ip = obs.main[0] if obs.main is not None else None
    for addr in obs.local_addrs:
        # An interface address the server sees us from is public, not LAN-only.
        if _usable_local(addr) and addr != public_ip:
            out.append(Candidate("local", addr, obs.direct_port))
    if obs.mapping is not None:
        out.append(Candidate("mapped", obs.mapping.external_ip, obs.mapping.external_port))
    if obs.main is not None:
        ip, port = obs.main
        if verdict.kind is not NatKind.EDM:
            out.append(Candidate("public", ip, port))
        out.append(Candidate("public", ip, obs.direct_port))
    return order_candidates(out)


def order_candidates(cands: Iterable[Candidate]) -> list[Candidate]:
    """Stable sort by :data:`KIND_ORDER`, first occurrence of each address wins, capped."""
    seen: set[str] = set()
    ranked: list[Candidate] = []
    rank = {kind: i for i, kind in enumerate(KIND_ORDER)}
    for cand in sorted(cands, key=lambda c: rank.get(c.kind, len(KIND_ORDER))):
        if cand.addr in seen:
            continue
        seen.add(cand.addr)
        ranked.append(cand)
    return ranked[:MAX_CANDIDATES]


def path_kind(peer_host: str, cands: Sequence[Candidate]) -> str:
    """The path kind of a connection whose peer address is ``peer_host``.

    A connection we accepted has no candidate of ours behind it: it is ``local``
    when the peer is one of its own ``local`` candidates (same LAN), else ``direct``.
    """
    for cand in cands:
        if cand.host == peer_host and cand.kind == "local":
            return "local"
    return "direct"
