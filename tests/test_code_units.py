"""``homeport code``'s pure parts: target parsing, the URI VS Code opens, ``ssh -G`` reading."""

from __future__ import annotations

import pytest

from homeport.client.code import CodeTarget, code_argv, folder_uri, parse_target, routed


def test_targets_and_uris() -> None:
    assert parse_target("labpc") == CodeTarget("labpc", "")
    assert parse_target("labpc.work:/home/me") == CodeTarget("labpc.work", "/home/me")
    assert folder_uri(CodeTarget("labpc", "/srv/a b#c")) == (
        "vscode-remote://ssh-remote+labpc/srv/a%20b%23c"
    )
    assert code_argv("code", CodeTarget("labpc", "")) == ["code", "--remote", "ssh-remote+labpc"]
    assert code_argv("/x/code", CodeTarget("labpc", "/p"))[1:] == [
        "--folder-uri",
        "vscode-remote://ssh-remote+labpc/p",
    ]


@pytest.mark.parametrize("bad", ["labpc:rel/path", "-oProxyCommand=x", "a b:/x", "lab:/x\n"])
def test_bad_targets_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_target(bad)


def test_routed_reads_ssh_g() -> None:
    assert routed("hostname labpc\nproxycommand /py -I -S /h/ncfast.py --state s %h %p\n")
    assert not routed("hostname labpc\nport 22\n")
    assert not routed("proxycommand ssh -W %h:%p jump\n")
