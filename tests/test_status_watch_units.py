"""``status --watch``'s renderer as pure functions: rows, rates, escaping, screen control;
and its options without ``--watch`` (a usage error)."""

from __future__ import annotations

from pathlib import Path

import pytest

from homeport.client import watch as w
from homeport.wire.control import NetMap, NodeInfo, ServiceInfo

NOW = 1_800_000_000.0


def _map(*nodes: NodeInfo) -> NetMap:
    return NetMap(nodes=nodes, self_id="me")


ME = NodeInfo("me", "laptop", True, NOW, "fp")
LAB = NodeInfo("lab", "labpc", True, NOW, "fp", services=(ServiceInfo("ssh", 22),))
OFF = NodeInfo("off", "pi", False, NOW - 600, "fp")


def _agent(streams: int, online: bool = True) -> dict[str, object]:
    return {
        "peers": [
            {
                "node_id": "lab",
                "online": online,
                "kind": "direct",
                "endpoint": "203.0.113.5:41641",
                "rtt_ms": 1.25,
                "reason": "direct path up",
                "streams_direct": streams,
                "streams_relay": 1,
            }
        ]
    }


def test_rows_show_path_reason_and_stream_rate() -> None:
    rows, counts = w.build_rows(_map(ME, LAB, OFF), _agent(4), {}, 0.0, NOW)
    assert [r.name for r in rows] == ["laptop (this node)", "labpc", "pi"]
    lab = rows[1]
    assert lab.path == "direct 203.0.113.5:41641 1.2ms" and lab.why == "direct path up"
    assert lab.rate == "-" and counts["lab"] == 5  # no previous frame: no rate yet
    rows, _ = w.build_rows(_map(ME, LAB, OFF), _agent(7), counts, 2.0, NOW + 2)
    assert rows[1].rate == "90"  # 3 streams in 2 s
    assert rows[2].path == "-" and rows[2].last_seen == "10m ago" and rows[2].online == "no"


def test_the_agents_fresher_online_flag_wins() -> None:
    rows, _ = w.build_rows(_map(ME, LAB), _agent(0, online=False), {}, 0.0, NOW)
    assert rows[1].online == "no" and rows[1].path == "-"


def test_hostile_strings_cannot_reach_the_terminal() -> None:
    evil = NodeInfo("x", "a\x1b[2Jb\nc", True, NOW, "fp")
    agent = {"peers": [{"node_id": "x", "kind": "relay", "reason": "r\x1b]0;pwn\x07"}]}
    rows, _ = w.build_rows(_map(ME, evil), agent, {}, 0.0, NOW)
    text = "\n".join(w.render(rows, header="hp \x1b[31m", now=NOW))
    assert "\x1b" not in text and "\x07" not in text
    assert "a\\x1b[2Jb\\nc" in text and "r\\x1b]0;pwn\\x07" in text


def test_screen_redraws_in_place_on_a_tty_and_plainly_otherwise() -> None:
    lines = w.render(w.build_rows(_map(ME, LAB), None, {}, 0.0, NOW)[0], header="hp", now=NOW)
    frame = w.screen(lines, tty=True)
    assert frame.startswith(w.HOME) and frame.endswith(w.CLEAR_EOS)
    assert frame.count(w.CLEAR_EOL) == len(lines) and "\x1b[2J" not in frame
    plain = w.screen(lines, tty=False)
    assert "\x1b" not in plain and plain.endswith("\n\n")
    assert all(len(ln) <= 20 for ln in w.render([], header="x" * 50, now=NOW, width=20))


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--count", "2"], "--count only go"),
        (["--interval", "5"], "--interval only go"),
        (["--interval", "5", "--count", "2"], "--interval and --count"),
    ],
)
def test_watch_options_without_watch_are_a_usage_error(
    tmp_path: Path, args: list[str], says: str
) -> None:
    import click
    from click.testing import CliRunner

    from homeport.client.cli import register

    group = click.Group()
    register(group)
    res = CliRunner().invoke(group, ["status", "--state", str(tmp_path), *args])
    assert res.exit_code == 2 and says in res.output
    assert len(res.output.strip().splitlines()) == 1  # before "not enrolled": checked first
