"""The ACL policy: parsing with positions, every selector, tests/sshTests, SSH rules, properties."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homeport.policy.acl import (
    NONROOT,
    AclRule,
    CompiledPolicy,
    DstEntry,
    PolicyError,
    PortRange,
    Sel,
    SelKind,
    SelSet,
    SshGrant,
    SshVerdict,
    Subject,
    acl_check,
    check_ssh,
    compile_policy,
    may_see,
    parse_duration,
    reach_set,
    rules_for_destination,
    ssh_access,
)
from homeport.policy.decide import CODE_POLICY, RULE_NOT_EXPOSED, decide
from homeport.policy.hujson import HujsonError, parse
from homeport.wire.control import ServiceInfo

ALICE = Subject("n1", "alice-laptop", "alice@example.com")
BOB = Subject("n2", "bob-laptop", "bob@example.com")
ALICE_PC = Subject("n3", "alice-pc", "alice@example.com")
DB = Subject("n4", "db1", "", ("tag:db",))
WEB = Subject("n5", "web1", "", ("tag:web",))
LABPC = Subject("n6", "labpc")

BASE = """{
  // who is who
  "groups": {"group:dev": ["bob@example.com"], "group:admin": ["alice@example.com"]},
  "tagOwners": {"tag:db": ["group:admin"], "tag:web": ["autogroup:admin"]},
  "hosts": {"lab": "labpc"},
  "acls": [
    RULES
  ],
}"""


def policy(rules: str) -> CompiledPolicy:
    return compile_policy(BASE.replace("RULES", rules))


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        compile_policy(text)
    return [str(p) for p in info.value.problems]


# -- HuJSON ----------------------------------------------------------------------------------


def test_hujson_comments_and_trailing_commas() -> None:
    node = parse('/* head */ {"a": [1, 2,], // c\n "b": {"c": "x",},}')
    assert node.plain() == {"a": [1, 2], "b": {"c": "x"}}
    assert node.value["b"].line == 2  # type: ignore[index]
    assert node.key_pos["b"] == (2, 2)


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        ('{"a": 1', 1, 8, "expected ',' or '}'"),
        ('{\n  "a": [1 2]\n}', 2, 11, "expected ',' or ']'"),
        ('{"a": "x\n"}', 1, 7, "newline inside a string"),
        ("{/* open", 1, 2, "unterminated /* comment"),
        ('{"a": 1, "a": 2}', 1, 10, "duplicate field 'a'"),
        ('{"a": tru}', 1, 7, "unexpected 't'"),
        ("{} x", 1, 4, "unexpected text after the end"),
        ('{"a": 01x}', 1, 7, "bad number"),
        ("", 1, 1, "unexpected end of input"),
    ],
)
def test_hujson_syntax_errors_have_positions(
    text: str, line: int, column: int, message: str
) -> None:
    with pytest.raises(HujsonError) as info:
        parse(text)
    assert (info.value.line, info.value.column) == (line, column)
    assert message in info.value.message


def test_hujson_depth_is_bounded() -> None:
    with pytest.raises(HujsonError, match="nesting deeper"):
        parse("[" * 100 + "]" * 100)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**9), 10**9) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
@settings(max_examples=200, deadline=None)
def test_hujson_reads_plain_json_like_json(value: object) -> None:
    for text in (json.dumps(value), json.dumps(value, indent=2)):
        assert parse(text).plain() == json.loads(text)


# -- compile errors: positions, JSON paths, unknown fields ----------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"], "users": []}]}',
            "1:62: acls[0].users: unknown field 'users'",
        ),
        ('{"acl": []}', "1:2: acl: unknown field 'acl'"),
        ('{"nodeAttrs": []}', "1:2: nodeAttrs: 'nodeAttrs' is a Tailscale field homeport"),
        (
            '{"acls": [{"action": "drop", "src": ["*"], "dst": ["*:*"]}]}',
            '1:22: acls[0].action: only "accept"',
        ),
        ('{"acls": [{"action": "accept", "src": ["*"]}]}', "1:11: acls[0]: missing field 'dst'"),
        (
            '{"acls": [{"action": "accept", "src": ["group:nope"], "dst": ["*:*"]}]}',
            "1:40: acls[0].src[0]: 'group:nope' is not defined in groups",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["tag:x"], "dst": ["*:*"]}]}',
            "1:40: acls[0].src[0]: 'tag:x' is not defined in tagOwners",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["*"], "dst": ["100.64.0.1:22"]}]}',
            "acls[0].dst[0]: '100.64.0.1' is an IP address: homeport has no overlay IP",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["*"], "dst": ["labpc:99999"]}]}',
            "acls[0].dst[0]: bad port range '99999'",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["*"], "dst": ["labpc"]}]}',
            "acls[0].dst[0]: 'labpc': expected selector:ports",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["autogroup:self"], "dst": ["*:*"]}]}',
            "acls[0].src[0]: autogroup:self is allowed only in dst",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["autogroup:internet"], "dst": ["*:*"]}]}',
            "acls[0].src[0]: 'autogroup:internet' is not supported",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["Bad Name"], "dst": ["*:*"]}]}',
            "acls[0].src[0]: 'Bad Name' is not a selector",
        ),
        (
            '{"acls": [{"action": "accept", "proto": "udp", "src": ["*"], "dst": ["*:*"]}]}',
            "acls[0].proto: homeport carries only tcp",
        ),
        ('{"hosts": {"db": "10.0.0.0/24"}}', "hosts.db: '10.0.0.0/24' is an IP address"),
        ('{"groups": {"group:x": ["tag:a"]}}', "groups.group:x[0]: 'tag:a' is not a user"),
        (
            '{"ssh": [{"action": "check", "src": ["*"], "dst": ["*"], "users": ["r o"]}]}',
            "ssh[0].users[0]: 'r o' is not a local account name",
        ),
        (
            '{"ssh": [{"action": "check", "src": ["*"], "dst": ["*"], "users": ["u"], '
            '"checkPeriod": "soon"}]}',
            "ssh[0].checkPeriod: bad duration 'soon'",
        ),
        (
            '{"ssh": [{"action": "accept", "src": ["*"], "dst": ["*"], "users": ["u"], '
            '"checkPeriod": "1h"}]}',
            'ssh[0].checkPeriod: checkPeriod needs action "check"',
        ),
        ('{"tests": [{"src": "x@y", "allow": []}]}', "tests[0].allow: unknown field 'allow'"),
        ("[]", "1:1: the policy must be a JSON object"),
        ('{"acls": [,]}', "1:11: unexpected ','"),
    ],
)
def test_compile_errors_name_line_column_and_path(text: str, expected: str) -> None:
    found = problems(text)
    assert any(expected in p for p in found), found


def test_every_problem_is_reported_in_file_order() -> None:
    text = (
        '{\n "acls": [\n  {"action": "accept", "src": ["group:a"], "dst": ["*:*"]},\n'
        '  {"action": "accept", "src": ["*"], "dst": ["*:*"], "x": 1},\n ],\n "y": 2,\n}'
    )
    assert problems(text) == [
        "3:32: acls[0].src[0]: 'group:a' is not defined in groups",
        "4:54: acls[1].x: unknown field 'x' (allowed: action, src, dst, proto)",
        "6:2: y: unknown field 'y' (allowed: groups, tagOwners, hosts, acls, ssh, tests, sshTests)",
    ]


# -- every selector kind ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src_sel", "dst_sel", "src", "dst", "port", "allowed"),
    [
        ("*", "*:*", BOB, DB, 5432, True),
        ("bob@example.com", "tag:db:5432", BOB, DB, 5432, True),
        ("bob@example.com", "tag:db:5432", ALICE, DB, 5432, False),
        ("user:bob@example.com", "tag:db:5432", BOB, DB, 5432, True),
        ("group:dev", "tag:db:5432", BOB, DB, 5432, True),
        ("group:dev", "tag:db:5432", BOB, DB, 5433, False),
        ("group:dev", "tag:db:5432", BOB, WEB, 5432, False),
        ("tag:web", "tag:db:5000-6000", WEB, DB, 5432, True),
        ("tag:web", "tag:db:5000-6000", DB, DB, 5432, False),
        ("lab", "tag:db:22,5432", LABPC, DB, 5432, True),  # a host alias
        ("labpc", "tag:db:22,5432", LABPC, DB, 22, True),  # a node name
        ("labpc", "tag:db:22,5432", LABPC, DB, 80, False),
        ("autogroup:member", "labpc:22", ALICE, LABPC, 22, True),
        ("autogroup:member", "labpc:22", DB, LABPC, 22, False),
        ("autogroup:tagged", "labpc:22", DB, LABPC, 22, True),
        ("autogroup:tagged", "labpc:22", ALICE, LABPC, 22, False),
        ("autogroup:member", "autogroup:self:*", ALICE, ALICE_PC, 22, True),
        ("autogroup:member", "autogroup:self:*", BOB, ALICE_PC, 22, False),
        ("autogroup:member", "autogroup:self:*", ALICE, DB, 22, False),
        ("*", "group:admin:22", BOB, ALICE_PC, 22, True),  # a group as destination
        ("*", "autogroup:tagged:22", BOB, DB, 22, True),
        ("*", "autogroup:member:22", BOB, DB, 22, False),
    ],
)
def test_selectors(
    src_sel: str, dst_sel: str, src: Subject, dst: Subject, port: int, allowed: bool
) -> None:
    p = policy(f'{{"action": "accept", "src": ["{src_sel}"], "dst": ["{dst_sel}"]}}')
    verdict = acl_check(p, src, dst, port)
    assert verdict.allowed is allowed
    assert verdict.rule == ("acls[0]" if allowed else "default-deny")


def test_an_empty_policy_denies_everything_and_says_who_and_what() -> None:
    p = policy("")
    d = decide(BOB, DB, (ServiceInfo("postgres", 5432),), "5432", p)
    assert (d.allowed, d.code, d.rule) == (False, CODE_POLICY, "default-deny")
    assert d.reason == "denied by policy: no rule lets group:dev reach tag:db:5432"


def test_exposure_is_checked_before_the_policy() -> None:
    p = policy('{"action": "accept", "src": ["*"], "dst": ["*:*"]}')
    d = decide(BOB, DB, (ServiceInfo("postgres", 5432),), "ssh", p)
    assert (d.allowed, d.rule) == (False, RULE_NOT_EXPOSED)
    ok = decide(BOB, DB, (ServiceInfo("postgres", 5432),), "postgres", p)
    assert (ok.allowed, ok.rule, ok.reason) == (
        True,
        "acls[0]",
        "allowed by acls[0]: group:dev may reach tag:db:5432",
    )


def test_the_destination_copy_keeps_only_what_can_match_it() -> None:
    p = policy(
        '{"action": "accept", "src": ["group:dev"], "dst": ["tag:db:5432", "labpc:22"]},'
        '{"action": "accept", "src": ["*"], "dst": ["tag:web:80"]},'
        '{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}'
    )
    mine = rules_for_destination(p, DB)
    assert [(r.name, [str(d.ports[0]) for d in r.dst]) for r in mine] == [("acls[0]", ["5432"])]
    owned = rules_for_destination(p, ALICE_PC)
    assert [r.name for r in owned] == ["acls[2]"]
    assert may_see(p, BOB, DB) and may_see(p, BOB, LABPC) and not may_see(p, DB, BOB)


# -- tests and sshTests run at compile time ------------------------------------------------------


GOOD = Path(__file__).with_name("data") / "policy-example.hujson"


def test_the_worked_example_compiles_and_its_tests_pass() -> None:
    p = compile_policy(GOOD.read_text())
    assert [r.name for r in p.acls] == ["acls[0]", "acls[1]"]
    assert [(r.name, r.action.value) for r in p.ssh] == [("ssh[0]", "accept"), ("ssh[1]", "check")]


@pytest.mark.parametrize(
    ("test", "expected"),
    [
        (
            '"tests": [{"src": "bob@example.com", "accept": ["tag:db:22"]}]',
            "tests[0].accept[0]: test failed: bob@example.com -> tag:db:22: expected accept, "
            "got deny",
        ),
        (
            '"tests": [{"src": "bob@example.com", "deny": ["tag:db:5432"]}]',
            "tests[0].deny[0]: test failed: bob@example.com -> tag:db:5432: expected deny, "
            "got accept (acls[0])",
        ),
        (
            '"tests": [{"src": "tag:nope", "accept": ["tag:db:5432"]}]',
            "tests[0].src: 'tag:nope' is not defined in tagOwners",
        ),
        (
            '"sshTests": [{"src": "bob@example.com", "dst": ["tag:db"], "accept": ["ubuntu"]}]',
            "sshTests[0].accept[0]: test failed: bob@example.com -> tag:db as ubuntu: expected "
            "accept, got check (ssh[0])",
        ),
        (
            '"sshTests": [{"src": "bob@example.com", "dst": ["tag:db"], "check": ["root"]}]',
            "sshTests[0].check[0]: test failed: bob@example.com -> tag:db as root: expected "
            "check, got deny (default-deny)",
        ),
    ],
)
def test_failing_tests_refuse_the_policy(test: str, expected: str) -> None:
    text = (
        '{"groups": {"group:dev": ["bob@example.com"]}, "tagOwners": {"tag:db": []},\n'
        '"acls": [{"action": "accept", "src": ["group:dev"], "dst": ["tag:db:5432"]}],\n'
        '"ssh": [{"action": "check", "src": ["group:dev"], "dst": ["tag:db"], '
        '"users": ["ubuntu"]}],\n' + test + "}"
    )
    found = problems(text)
    assert len(found) == 1 and found[0].startswith("4:") and expected in found[0], found


# -- SSH rules (the certificate wave's API) ----------------------------------------------------


SEED = Path(__file__).with_name("data") / "policy-seed.hujson"


def test_the_seed_acl_users_bring() -> None:
    p = compile_policy(SEED.read_text())
    admin = Subject("a", "kirby-pc", "kirakirabushi@hoge.com")
    dev = Subject("d", "dedede-pc", "dedede@daioh.com")
    server = Subject("s", "pupupu", "", ("tag:pupupuserver",))
    assert ssh_access(p, admin, server) == SshGrant((NONROOT, "root"), (), 0.0, ("ssh[0]",))
    assert ssh_access(p, dev, server) == SshGrant((), ("ubuntu-daioh",), 12 * 3600.0, ("ssh[1]",))
    assert ssh_access(p, dev, admin) == SshGrant()
    assert check_ssh(p, admin, server, "anyone").verdict is SshVerdict.ACCEPT
    assert check_ssh(p, admin, server, "root").verdict is SshVerdict.ACCEPT
    d = check_ssh(p, dev, server, "ubuntu-daioh")
    assert (d.verdict, d.rule, d.check_period) == (SshVerdict.CHECK, "ssh[1]", 43200.0)
    refused = check_ssh(p, dev, server, "root")
    assert refused.verdict is SshVerdict.DENY and not refused.allowed
    assert refused.reason == (
        "denied by policy: no ssh rule lets group:dev log in to tag:pupupuserver as root"
    )
    assert check_ssh(None, dev, server, "root").verdict is SshVerdict.DENY


def test_accept_beats_check_whatever_the_order() -> None:
    rules = (
        '{"action": "check", "src": ["*"], "dst": ["*"], "users": ["ubuntu"], "checkPeriod": "1h"}',
        '{"action": "accept", "src": ["group:admin"], "dst": ["*"], '
        '"users": ["autogroup:nonroot"]}',
    )
    for order in (rules, rules[::-1]):
        p = compile_policy(
            '{"groups": {"group:admin": ["alice@example.com"]}, "ssh": [' + ",".join(order) + "]}"
        )
        assert check_ssh(p, ALICE, LABPC, "ubuntu").verdict is SshVerdict.ACCEPT
        assert check_ssh(p, BOB, LABPC, "ubuntu").check_period == 3600.0
        assert ssh_access(p, ALICE, LABPC).check_users == ()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("12h", 43200.0),
        ("1h30m", 5400.0),
        ("90s", 90.0),
        ("always", 0.0),
        ("", None),
        ("h", None),
        ("1d", None),
        ("5m5", None),
    ],
)
def test_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


# -- properties: default deny, order independence ------------------------------------------------

SUBJECTS = [ALICE, BOB, ALICE_PC, DB, WEB, LABPC]
SRC_SELS = [
    Sel(SelKind.ANY),
    Sel(SelKind.USER, "alice@example.com"),
    Sel(SelKind.USER, "bob@example.com"),
    Sel(SelKind.TAG, "tag:db"),
    Sel(SelKind.TAG, "tag:web"),
    Sel(SelKind.NODE, "labpc"),
    Sel(SelKind.MEMBER),
    Sel(SelKind.TAGGED),
]
DST_SELS = [*SRC_SELS, Sel(SelKind.SELF)]
ports = st.sampled_from(
    [PortRange(22, 22), PortRange(5432, 5432), PortRange(1, 65535), PortRange(20, 80)]
)
rules_st = st.lists(
    st.builds(
        lambda src, dst: (src, dst),
        st.lists(st.sampled_from(SRC_SELS), min_size=1, max_size=3),
        st.lists(
            st.builds(DstEntry, st.sampled_from(DST_SELS), st.tuples(ports)), min_size=1, max_size=3
        ),
    ),
    max_size=6,
)


def _compiled(rules: list[tuple[list[Sel], list[DstEntry]]]) -> CompiledPolicy:
    return CompiledPolicy(
        acls=tuple(AclRule(f"acls[{i}]", tuple(s), tuple(d)) for i, (s, d) in enumerate(rules))
    )


def _grants(p: CompiledPolicy) -> set[tuple[str, str, int]]:
    return {
        (a.node_id, b.node_id, port)
        for a in SUBJECTS
        for b in SUBJECTS
        for port in (22, 80, 5432, 8080)
        if acl_check(p, a, b, port).allowed
    }


@given(rules_st, st.data())
@settings(max_examples=150, deadline=None)
def test_removing_a_rule_never_grants_more(
    rules: list[tuple[list[Sel], list[DstEntry]]], data: st.DataObject
) -> None:
    full = _grants(_compiled(rules))
    if rules:
        i = data.draw(st.integers(0, len(rules) - 1))
        assert _grants(_compiled(rules[:i] + rules[i + 1 :])) <= full
    assert _grants(_compiled([])) == set()  # default deny


@given(rules_st, st.randoms(use_true_random=False))
@settings(max_examples=150, deadline=None)
def test_rule_order_never_changes_a_verdict(
    rules: list[tuple[list[Sel], list[DstEntry]]], rnd: object
) -> None:
    shuffled = list(rules)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert _grants(_compiled(shuffled)) == _grants(_compiled(rules))


subjects_st = st.builds(
    Subject,
    st.just("n"),
    st.sampled_from(["labpc", "db1", "x"]),
    st.sampled_from(["", "alice@example.com", "bob@example.com"]),
    st.lists(st.sampled_from(["tag:db", "tag:web"]), max_size=2, unique=True).map(tuple),
)


@given(st.lists(st.sampled_from(DST_SELS), max_size=5), subjects_st, subjects_st)
@settings(max_examples=300, deadline=None)
def test_selector_sets_match_exactly_like_their_selectors(
    sels: list[Sel], subj: Subject, src: Subject
) -> None:
    assert SelSet.of(sels).matches(subj, src) == any(s.matches(subj, src) for s in sels)


@given(rules_st)
@settings(max_examples=150, deadline=None)
def test_visibility_is_reaching_some_port_by_some_rule(
    rules: list[tuple[list[Sel], list[DstEntry]]],
) -> None:
    p = _compiled(rules)
    for viewer in SUBJECTS:
        for peer in SUBJECTS:
            by_definition = any(
                any(s.matches(viewer) for s in src)
                and any(d.sel.matches(peer, viewer) for d in dst)
                for src, dst in rules
            )
            assert may_see(p, viewer, peer) == by_definition
            assert reach_set(p, viewer).matches(peer, viewer) == by_definition
