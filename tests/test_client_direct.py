"""The pure parts of ``homeport ping`` / ``netcheck`` / ``status`` paths and the local API's
query requests (no processes: see tests/test_e2e_direct.py for the real thing)."""

from __future__ import annotations

import json

import pytest

from homeport.client import netcheck, ping, status
from homeport.io.localapi import OpenRequest, QueryRequest, RequestError, parse_any


@pytest.mark.parametrize(
    ("answer", "line"),
    [
        (
            {"ok": True, "via": "relay", "endpoint": "hp.example:8443", "ms": 12.34},
            "pong from labpc via relay hp.example:8443 in 12.3 ms",
        ),
        (
            {"ok": True, "via": "direct", "endpoint": "203.0.113.5:41641", "ms": 3.0},
            "pong from labpc via direct 203.0.113.5:41641 in 3.0 ms",
        ),
        (
            {"ok": True, "via": "local", "endpoint": "10.0.0.7:41641", "ms": 0.25},
            "pong from labpc via local 10.0.0.7:41641 in 0.2 ms",
        ),
        (
            {"ok": False, "code": "offline", "message": "labpc is offline"},
            "no pong from labpc: labpc is offline [offline]",
        ),
    ],
)
def test_ping_lines(answer: dict[str, object], line: str) -> None:
    assert ping.probe_line("labpc", answer) == line


def test_ping_stops_only_on_a_direct_kind() -> None:
    assert ping.is_direct({"ok": True, "via": "mapped"})
    assert ping.is_direct({"ok": True, "via": "local"})
    assert not ping.is_direct({"ok": True, "via": "relay"})
    assert not ping.is_direct({"ok": False, "via": "direct"})


@pytest.mark.parametrize(
    ("detail", "cell"),
    [
        (None, "relay"),
        (
            {"kind": "direct", "endpoint": "203.0.113.5:41641", "rtt_ms": 1.234},
            "direct 203.0.113.5:41641 1.2ms",
        ),
        ({"kind": "local", "endpoint": "10.0.0.7:5000", "rtt_ms": None}, "local 10.0.0.7:5000"),
        ({"kind": "relay", "reason": "punch timed out"}, "relay (punch timed out)"),
        ({"kind": "relay", "reason": ""}, "relay"),
    ],
)
def test_status_path_cell(detail: dict[str, object] | None, cell: str) -> None:
    assert status.path_text(detail, "relay") == cell


def test_netcheck_render_says_mapping_and_reason() -> None:
    report = {
        "server": "hp.example:8443",
        "server_reachable": True,
        "latency_ms": 4.2,
        "seen_main": "198.51.100.7:40001",
        "seen_probe": "198.51.100.7:40002",
        "varies_by_destination": True,
        "nat": "edm",
        "nat_reason": "the public port differs by destination",
        "portmap": "",
        "portmap_error": "no answer from 192.168.1.1",
        "direct_port": 41641,
        "candidates": [{"kind": "local", "addr": "192.168.1.20:41641"}],
    }
    text = netcheck.render(report)
    assert "latency:             4.2 ms" in text
    assert "public address (probe): 198.51.100.7:40002" in text
    assert "mapping varies by destination: yes" in text
    assert "nat:                   edm (the public port differs by destination)" in text
    assert "port mapping:          none (no answer from 192.168.1.1)" in text
    unknown = netcheck.render({**report, "varies_by_destination": None, "seen_probe": ""})
    assert "mapping varies by destination: unknown" in unknown


def test_query_requests_parse_and_open_still_does() -> None:
    q = parse_any(json.dumps({"op": "ping", "dst": "labpc", "timeout": 2}).encode())
    assert q == QueryRequest("ping", "labpc", 2.0)
    assert parse_any(b'{"op": "status"}') == QueryRequest("status", "", 5.0)
    o = parse_any(b'{"op": "open", "dst": "labpc", "service": "22"}')
    assert isinstance(o, OpenRequest)
    for bad in (
        b'{"op": "ping", "dst": "../etc"}',
        b'{"op": "ping", "dst": 3}',
        b'{"op": "status", "timeout": true}',
        b'{"op": "status", "timeout": 1e9}',
        b'{"op": "reboot"}',
        b"[1]",
    ):
        with pytest.raises(RequestError):
            parse_any(bad)
