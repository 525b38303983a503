"""``homeport ping``'s loop without an agent: which answers stop it at once."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import click
import pytest
from click.testing import CliRunner

from homeport.client import cli as client_cli
from homeport.client import ping as ping_mod


def _run(
    monkeypatch: pytest.MonkeyPatch, name: str, answers: list[dict[str, Any]]
) -> tuple[click.testing.Result, list[str]]:
    asked: list[str] = []

    def query(_dir: object, op: str, dst: str = "", _timeout: float = 5.0) -> dict[str, Any]:
        asked.append(f"{op} {dst}")
        return answers[min(len(asked), len(answers)) - 1]

    monkeypatch.setattr(client_cli, "_load", lambda _s: SimpleNamespace(name="laptop", dir="/x"))
    monkeypatch.setattr(client_cli, "_agent_query", query)
    monkeypatch.setattr(ping_mod, "INTERVAL", 0.0)
    group = click.Group()
    client_cli.register(group)
    return CliRunner().invoke(group, ["ping", name, "--count", "10"]), asked


def test_ping_an_unknown_node_says_it_once(monkeypatch: pytest.MonkeyPatch) -> None:
    unknown = {"ok": False, "code": "unknown", "message": "no node named 'nosuch'"}
    res, asked = _run(monkeypatch, "nosuch", [unknown])
    assert res.exit_code == 1 and asked == ["ping nosuch"]
    assert res.output.count("no pong") == 1


def test_ping_this_node_refuses_without_asking(monkeypatch: pytest.MonkeyPatch) -> None:
    res, asked = _run(monkeypatch, "laptop", [{"ok": False, "code": "timeout"}])
    assert res.exit_code == 1 and asked == []
    assert res.output.strip() == "homeport: laptop is this node"


def test_ping_keeps_probing_through_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    late = [{"ok": False, "code": "timeout", "message": "no pong in 3 s"}] * 2
    direct = {"ok": True, "via": "direct", "endpoint": "192.0.2.2:1", "ms": 1.0}
    res, asked = _run(monkeypatch, "labpc", [*late, direct])
    assert res.exit_code == 0 and len(asked) == 3  # a timeout may pass: probed again
    assert res.output.splitlines()[-1].startswith("pong from labpc via direct")
