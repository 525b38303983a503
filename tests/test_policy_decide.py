"""The one access decision, tabled: same inputs, same verdict at server and destination."""

from __future__ import annotations

import pytest

from homeport.policy.decide import (
    RULE_NOT_EXPOSED,
    RULE_SERVICE_EXPOSED,
    Subject,
    Verdict,
    decide,
)
from homeport.policy.services import Service
from homeport.wire.control import ServiceInfo

SRC = Subject(node_id="n1", name="laptop")
DST = Subject(node_id="n2", name="labpc")
ANNOUNCED = (ServiceInfo("ssh", 22), ServiceInfo("jupyter", 8888))
LOCAL = (
    Service("ssh", 22, "127.0.0.1", 2222),
    Service("jupyter", 8888, "127.0.0.1", 8888),
)


@pytest.mark.parametrize(
    ("requested", "verdict", "code", "rule", "name"),
    [
        ("ssh", Verdict.ALLOW, "ok", RULE_SERVICE_EXPOSED, "ssh"),
        ("22", Verdict.ALLOW, "ok", RULE_SERVICE_EXPOSED, "ssh"),
        ("8888", Verdict.ALLOW, "ok", RULE_SERVICE_EXPOSED, "jupyter"),
        ("2222", Verdict.DENY, "not-exposed", RULE_NOT_EXPOSED, None),  # the target port is not it
        ("web", Verdict.DENY, "not-exposed", RULE_NOT_EXPOSED, None),
        ("", Verdict.DENY, "not-exposed", RULE_NOT_EXPOSED, None),
    ],
)
def test_server_and_destination_agree(
    requested: str, verdict: Verdict, code: str, rule: str, name: str | None
) -> None:
    at_server = decide(SRC, DST, ANNOUNCED, requested)
    at_dest = decide(SRC, DST, LOCAL, requested)
    for d in (at_server, at_dest):
        assert (d.verdict, d.code, d.rule) == (verdict, code, rule)
        assert (d.service.name if d.service else None) == name
        assert d.allowed is (verdict is Verdict.ALLOW)
    assert at_server.reason == at_dest.reason


def test_nothing_exposed_denies_everything_and_says_so() -> None:
    none: tuple[ServiceInfo, ...] = ()
    d = decide(SRC, DST, none, "ssh")
    assert not d.allowed
    assert d.reason == "labpc does not expose 'ssh' (exposed: none)"
