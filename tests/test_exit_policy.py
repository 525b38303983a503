"""Exit nodes, the pure parts: networks, address checks, ACL ``:exit`` grants, decisions."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homeport.client.forward import ForwardSpec, parse_target
from homeport.node import settings as node_settings
from homeport.policy import exitnet
from homeport.policy.acl import PolicyError, Subject, compile_policy, exit_check
from homeport.policy.decide import (
    RULE_EXIT_OWNER_ONLY,
    RULE_EXIT_SAME_OWNER,
    RULE_NOT_EXIT,
    decide,
    decide_exit,
    exit_grant,
)
from homeport.policy.services import Service

LAN = ("192.168.1.0/24",)
ALICE_LAPTOP = Subject("n1", "laptop", "alice@example.com")
ALICE_LAB = Subject("n2", "labpc", "alice@example.com")
BOB = Subject("n3", "bobpc", "bob@example.com")
TAGGED = Subject("n4", "ci", "", ("tag:ci",))


# -- networks and addresses ---------------------------------------------------------------
def test_exit_specs_parse_and_normalise() -> None:
    assert exitnet.parse_exit_spec("192.168.1.0/24") == LAN
    assert exitnet.parse_exit_spec("192.168.1.7/24, 10.0.0.1,2001:db8::/32") == (
        "192.168.1.0/24",
        "10.0.0.1/32",
        "2001:db8::/32",
    )
    assert exitnet.parse_exit_spec("all") == exitnet.ALL_NETS
    assert exitnet.describe(exitnet.ALL_NETS) == "all"
    # 'all' leaves loopback/link-local out; listing them beside it lets them in (the docs' word)
    both = exitnet.parse_exit_spec("all,127.0.0.0/8, fe80::/10")
    assert both == (*exitnet.ALL_NETS, "127.0.0.0/8", "fe80::/10")
    assert exitnet.describe(both) == "all, 127.0.0.0/8, fe80::/10"
    assert exitnet.parse_exit_spec(",".join(both)) == both  # exit.json reloads the same
    assert _check("127.0.0.1", both).allowed
    assert not _check("169.254.169.254", both).allowed  # only what was listed
    for bad, why in [
        ("", "give networks"),
        ("all,10.0.0.0/8", "already includes 10.0.0.0/8"),
        ("all,0.0.0.0/0", "already includes"),
        ("lab", "not a network"),
        ("192.168.1.0/33", "not a network"),
    ]:
        with pytest.raises(ValueError, match=why):
            exitnet.parse_exit_spec(bad)
    with pytest.raises(ValueError, match="at most"):
        exitnet.parse_exit_spec(",".join(f"10.0.{i}.0/24" for i in range(65)))


def _check(addr: str, nets: tuple[str, ...]) -> exitnet.AddressCheck:
    return exitnet.check_address(ipaddress.ip_address(addr), exitnet.nets_untrusted(nets))


@pytest.mark.parametrize(
    ("addr", "nets", "allowed"),
    [
        ("192.168.1.50", LAN, True),
        ("192.168.2.50", LAN, False),
        ("10.0.0.1", exitnet.ALL_NETS, True),
        ("2001:db8::1", exitnet.ALL_NETS, True),
        ("127.0.0.1", exitnet.ALL_NETS, False),  # loopback: never through "all"
        ("::1", exitnet.ALL_NETS, False),
        ("::ffff:127.0.0.1", exitnet.ALL_NETS, False),  # mapped loopback is loopback
        ("169.254.169.254", exitnet.ALL_NETS, False),  # link-local metadata service
        ("fe80::1", exitnet.ALL_NETS, False),
        ("127.0.0.1", ("127.0.0.0/8",), True),  # explicitly advertised
        ("169.254.1.1", ("169.254.0.0/16",), True),
        ("0.0.0.0", exitnet.ALL_NETS, False),
        ("224.0.0.1", exitnet.ALL_NETS, False),
        ("192.168.1.50", (), False),
    ],
)
def test_address_checks(addr: str, nets: tuple[str, ...], allowed: bool) -> None:
    got = _check(addr, nets)
    assert got.allowed is allowed, got.reason
    if not allowed:
        assert got.code == "not-allowed" and got.reason.startswith("not allowed: ")


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses(v=4), st.integers(8, 32))
def test_an_address_is_allowed_only_inside_a_network(
    addr: ipaddress.IPv4Address, plen: int
) -> None:
    net = ipaddress.ip_network(f"192.0.2.0/{max(plen, 24)}", strict=False)
    got = exitnet.check_address(addr, (net,))
    assert got.allowed == (addr in net)


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("192.168.1.50:80", ("192.168.1.50", 80)),
        ("printer.lab:631", ("printer.lab", 631)),
        ("[2001:db8::5]:443", ("2001:db8::5", 443)),
    ],
)
def test_destinations_split(text: str, parts: tuple[str, int]) -> None:
    assert exitnet.split_destination(text) == parts


@pytest.mark.parametrize(
    "bad", ["192.168.1.50", ":80", "host:0", "host:99999", "2001:db8::5:443", "a b:80", "[x]:1"]
)
def test_bad_destinations_say_why(bad: str) -> None:
    with pytest.raises(ValueError, match="destination"):
        exitnet.split_destination(bad)


# -- the policy ---------------------------------------------------------------------------
POLICY = """{
  "groups": {"group:lab": ["alice@example.com"]},
  "tagOwners": {"tag:ci": ["alice@example.com"]},
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["*:22"]},
    {"action": "accept", "src": ["group:lab"], "dst": ["labpc:exit"]},
  ],
  "tests": [
    {"src": "alice@example.com", "accept": ["labpc:exit", "labpc:22"]},
    {"src": "bob@example.com", "accept": ["labpc:22"], "deny": ["labpc:exit"]},
  ],
}"""


def test_exit_grants_are_their_own_destination_form() -> None:
    policy = compile_policy(POLICY)
    assert exit_check(policy, ALICE_LAPTOP, ALICE_LAB).rule == "acls[1]"
    no = exit_check(policy, BOB, ALICE_LAB)
    assert not no.allowed and "no rule lets bob@example.com use labpc as an exit node" in no.reason
    # an exit grant never grants a port, and "*:22" never grants exit use
    ssh = [Service("ssh", 22, "127.0.0.1", 22)]
    assert decide(BOB, ALICE_LAB, ssh, "22", policy).allowed
    web = [Service("web", 80, "127.0.0.1", 80)]
    assert not decide(ALICE_LAPTOP, ALICE_LAB, web, "80", policy).allowed


def test_a_failing_exit_test_refuses_the_policy() -> None:
    broken = POLICY.replace('"deny": ["labpc:exit"]', '"accept": ["labpc:exit"]')
    broken = broken.replace('"accept": ["labpc:22"], "accept"', '"accept"')
    with pytest.raises(PolicyError, match="expected accept, got deny"):
        compile_policy(broken)


@pytest.mark.parametrize(
    ("src", "dst", "rule", "allowed"),
    [
        (ALICE_LAPTOP, ALICE_LAB, RULE_EXIT_SAME_OWNER, True),
        (BOB, ALICE_LAB, RULE_EXIT_OWNER_ONLY, False),
        (TAGGED, ALICE_LAB, RULE_EXIT_OWNER_ONLY, False),
        (Subject("a", "a"), Subject("b", "b"), RULE_EXIT_SAME_OWNER, True),  # no users at all
        (Subject("a", "a"), Subject("b", "b", "", ("tag:ci",)), RULE_EXIT_OWNER_ONLY, False),
    ],
)
def test_without_a_policy_only_the_owner_may_use_an_exit(
    src: Subject, dst: Subject, rule: str, allowed: bool
) -> None:
    d = exit_grant(src, dst, None)
    assert (d.rule, d.allowed) == (rule, allowed)


def test_the_exit_decision_table() -> None:
    policy = compile_policy(POLICY)
    cases = [
        ((), "192.168.1.50:80", None, False, RULE_NOT_EXIT),
        (LAN, "192.168.1.50", None, False, "exit-destination"),
        (LAN, "10.9.9.9:80", None, False, "exit-destination"),
        (LAN, "192.168.1.50:80", None, True, RULE_EXIT_SAME_OWNER),
        (LAN, "anything.lab:80", None, True, RULE_EXIT_SAME_OWNER),  # checked once resolved
        (LAN, "192.168.1.50:80", policy, True, "acls[1]"),
    ]
    for nets, dest, pol, allowed, rule in cases:
        d = decide_exit(ALICE_LAPTOP, ALICE_LAB, nets, dest, pol)
        assert (d.allowed, d.rule) == (allowed, rule), (nets, dest, d.reason)
    d = decide_exit(ALICE_LAPTOP, ALICE_LAB, LAN, "192.168.1.50:80")
    assert d.service is not None and d.service.destination == "192.168.1.50:80"
    d = decide_exit(BOB, ALICE_LAB, LAN, "192.168.1.50:80", policy)
    assert not d.allowed and d.code == "policy"


# -- settings and the forward target -------------------------------------------------------
def test_exit_settings_round_trip(tmp_path: Path) -> None:
    assert node_settings.load_exit(tmp_path) == ()
    node_settings.save_exit(tmp_path, LAN)
    assert node_settings.load_exit(tmp_path) == LAN
    assert (tmp_path / node_settings.EXIT_FILE).stat().st_mode & 0o777 == 0o600
    node_settings.save_exit(tmp_path, ())
    assert node_settings.load_exit(tmp_path) == ()
    (tmp_path / node_settings.EXIT_FILE).write_text('{"exit": ["lab"]}')
    with pytest.raises(node_settings.ExitSettingsError, match="homeport set --advertise-exit"):
        node_settings.load_exit(tmp_path)


def test_forward_targets_through_an_exit() -> None:
    assert parse_target("labpc:192.168.1.50:80") == ForwardSpec("labpc", "", "192.168.1.50:80")
    assert parse_target("labpc:[2001:db8::5]:80").exit == "[2001:db8::5]:80"
    assert parse_target("labpc:printer.lab:631").shown == "labpc:printer.lab:631"
    assert parse_target("labpc:8888") == ForwardSpec("labpc", "8888")
    with pytest.raises(ValueError, match="destination"):
        parse_target("labpc:192.168.1.50:http")
