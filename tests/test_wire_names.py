"""The one table of naming rules: valid names pass, every bad one gets one clear line."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from homeport.wire import names

CHECKS = (
    names.node_name_problem,
    names.service_name_problem,
    names.service_ref_problem,
    names.host_name_problem,
    names.target_host_problem,
)


@pytest.mark.parametrize("name", ["a", "0", "labpc", "lab-pc-2", "x" * 63, "a-b"])
def test_good_node_names(name: str) -> None:
    assert names.node_name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "empty"),
        ("x" * 64, "64 characters, the limit is 63"),
        ("LabPC", "lowercase"),
        ("-lab", "not starting or ending"),
        ("lab-", "not starting or ending"),
        ("lab_pc", "lowercase letters, digits and '-'"),
        ("lab.pc", "lowercase letters"),
        ("läb", "lowercase letters"),
        ("lab pc", "lowercase letters"),
    ],
)
def test_bad_node_names(name: str, says: str) -> None:
    problem = names.node_name_problem(name)
    assert problem is not None and says in problem


@pytest.mark.parametrize("name", ["ssh", "jupyter", "web_2", "A-b", "x" * 63, "8080a"])
def test_good_service_names(name: str) -> None:
    assert names.service_name_problem(name) is None


@pytest.mark.parametrize("name", ["", "8080", "a b", "a/b", "x" * 64, "ß", "a.b"])
def test_bad_service_names(name: str) -> None:
    assert names.service_name_problem(name) is not None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("0", "out of range"),
        ("65536", "out of range"),
        ("9" * 400, "out of range"),
        ("a b", "bad PORT"),
        ("x" * 200, "200 characters"),
        ("²", "bad PORT"),  # a Unicode digit is not a port
    ],
)
def test_bad_service_refs(text: str, says: str) -> None:
    problem = names.service_ref_problem(text)
    assert problem is not None and says in problem


@pytest.mark.parametrize("text", ["22", "1", "65535", "ssh", "jupyter"])
def test_good_service_refs(text: str) -> None:
    assert names.service_ref_problem(text) is None


@pytest.mark.parametrize("host", ["labpc", "LabPC", "lab.example.org", "a_b", "x" * 253])
def test_good_host_names(host: str) -> None:
    assert names.host_name_problem(host) is None


@pytest.mark.parametrize("host", ["", ".", "..", ".hidden", "../etc", "a/b", "a b", "x" * 254, "é"])
def test_bad_host_names(host: str) -> None:
    assert names.host_name_problem(host) is not None


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "::1", "fe80::1", "localhost", "db.internal", "example.org.", "x1-2"]
)
def test_good_target_hosts(host: str) -> None:
    assert names.target_host_problem(host) is None


@pytest.mark.parametrize(
    "host", ["", "a..b", "-a", "a-", "a b", "a_b", ":::x", "x" * 254, "ä.example", "a/b"]
)
def test_bad_target_hosts(host: str) -> None:
    assert names.target_host_problem(host) is not None


def test_long_names_get_a_short_message_not_a_traceback() -> None:
    huge = "x" * 100_000
    for check in CHECKS:
        problem = check(huge)
        assert problem is not None and len(problem) < 200 and "100000 characters" in problem


@given(st.text(max_size=300))
def test_every_check_answers_none_or_one_line(text: str) -> None:
    for check in CHECKS:
        problem = check(text)
        assert problem is None or (problem and "\n" not in problem.replace(repr(text), ""))


@given(st.text(max_size=80))
def test_a_node_name_is_also_a_host_name_and_a_safe_file_name(text: str) -> None:
    if names.node_name_problem(text) is None:
        assert names.host_name_problem(text) is None
        assert "/" not in text and text not in (".", "..")


def test_the_module_imports_nothing() -> None:
    """nc's warm path loads it: it must stay free of imports (see test_architecture)."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(names.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert top == []


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("alice", True),
        ("alice@example.com", True),
        ("a.b+ci_x-1@sub.example.org", True),
        ("", False),
        ("Alice", False),
        ("alice@Example.com", False),
        ("group:dev", False),
        ("tag:server", False),
        (".alice", False),
        ("alice@", False),
        ("alice@-bad.com", False),
        ("a" * 129, False),
    ],
)
def test_user_names(name: str, ok: bool) -> None:
    from homeport.wire.names import user_name_problem

    assert (user_name_problem(name) is None) is ok


@pytest.mark.parametrize(
    ("tag", "ok"),
    [
        ("tag:server", True),
        ("tag:db-1", True),
        ("server", False),
        ("tag:", False),
        ("tag:Server", False),
        ("tag:-x", False),
        ("tag:" + "a" * 64, False),
    ],
)
def test_tags(tag: str, ok: bool) -> None:
    from homeport.wire.names import tag_problem

    assert (tag_problem(tag) is None) is ok
