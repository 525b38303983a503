"""classify_nat and candidate ordering, tabled (pure)."""

from __future__ import annotations

import pytest

from homeport.proto.nat import NatKind
from homeport.proto.natcheck import (
    MAX_CANDIDATES,
    Candidate,
    MappedPort,
    Observations,
    candidates,
    classify_nat,
    order_candidates,
    path_kind,
)

P = 41641
LAN = ("10.0.0.7",)
PUB = "203.0.113.5"

CASES = [
    # (name, observations, kind, code, reason fragment)
    ("no server", Observations(P, LAN, main_error="refused"), NatKind.UNKNOWN, "no-server",
     "refused"),
    ("no probe", Observations(P, LAN, main=(PUB, P), probe_error="timed out"), NatKind.UNKNOWN,
     "no-probe-port", "probe port is unreachable"),
    ("eim", Observations(P, LAN, main=(PUB, P), probe=(PUB, P)), NatKind.EIM, "eim",
     "203.0.113.5:41641"),
    ("eim, port changed", Observations(P, LAN, main=(PUB, 999), probe=(PUB, 999)), NatKind.EIM,
     "eim", "endpoint-independent"),
    ("edm port", Observations(P, LAN, main=(PUB, 1000), probe=(PUB, 2000)), NatKind.EDM, "edm",
     "1000 vs 2000"),
    ("edm address", Observations(P, LAN, main=(PUB, P), probe=("203.0.113.6", P)), NatKind.EDM,
     "edm", "different public addresses"),
    ("public", Observations(P, (PUB,), main=(PUB, P), probe=(PUB, P)), NatKind.NONE, "public",
     "no NAT"),
    ("own address, other port", Observations(P, (PUB,), main=(PUB, 5), probe=(PUB, 5)),
     NatKind.EIM, "eim", "endpoint-independent"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "obs", "kind", "code", "frag"), CASES, ids=[c[0] for c in CASES])
def test_classify_nat(name: str, obs: Observations, kind: NatKind, code: str, frag: str) -> None:
    verdict = classify_nat(obs)
    assert (verdict.kind, verdict.code) == (kind, code)
    assert frag in verdict.reason


MAP = MappedPort("natpmp", "203.0.113.9", 50000, P, 7200, "10.0.0.1")

CAND_CASES = [
    ("eim", Observations(P, LAN, main=(PUB, P), probe=(PUB, P)),
     ["local 10.0.0.7:41641", "public 203.0.113.5:41641"]),
    ("eim remapped", Observations(P, LAN, main=(PUB, 7), probe=(PUB, 7)),
     ["local 10.0.0.7:41641", "public 203.0.113.5:7", "public 203.0.113.5:41641"]),
    ("edm: only the direct port (a static forward)",
     Observations(P, LAN, main=(PUB, 1), probe=(PUB, 2)),
     ["local 10.0.0.7:41641", "public 203.0.113.5:41641"]),
    ("mapped before public", Observations(P, LAN, main=(PUB, 1), probe=(PUB, 2), mapping=MAP),
     ["local 10.0.0.7:41641", "mapped 203.0.113.9:50000", "public 203.0.113.5:41641"]),
    ("public host: its address is public", Observations(P, (PUB, "fe80::1", "127.0.0.1"),
     main=(PUB, P), probe=(PUB, P)), ["public 203.0.113.5:41641"]),
    ("no server: LAN only", Observations(P, LAN), ["local 10.0.0.7:41641"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "obs", "want"), CAND_CASES, ids=[c[0] for c in CAND_CASES])
def test_candidates(name: str, obs: Observations, want: list[str]) -> None:
    got = candidates(obs, classify_nat(obs))
    assert [f"{c.kind} {c.addr}" for c in got] == want


def test_order_dedups_caps_and_keeps_kind_order() -> None:
    many = [Candidate("public", "203.0.113.1", p) for p in range(1, 30)]
    many += [Candidate("local", "10.0.0.1", 1), Candidate("mapped", "203.0.113.1", 1)]
    got = order_candidates(many)
    assert len(got) == MAX_CANDIDATES
    assert [c.kind for c in got[:2]] == ["local", "mapped"]
    # mapped 203.0.113.1:1 outranks the public duplicate of the same address
    assert sum(1 for c in got if c.addr == "203.0.113.1:1") == 1
    assert MAP.renew_after == 3600


def test_path_kind_of_accepted() -> None:
    cands = [Candidate("local", "10.0.0.8", P), Candidate("public", PUB, P)]
    assert path_kind("10.0.0.8", cands) == "local"
    assert path_kind(PUB, cands) == "direct"
    assert path_kind("198.51.100.1", cands) == "direct"
