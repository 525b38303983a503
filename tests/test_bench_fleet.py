"""The fleet benchmark's harness at small scale: it must run, and the server must stay usable.

200 simulated agents (real TLS, real certificates, the node core) against a real server
process, with churn and concurrent streams, plus a real agent and real ``homeport nc``
round trips during the churn. Keeps ``bench/fleet.py`` from rotting; the 5,000-agent
figures come from running it by hand (docs/reliability.md, "Load").
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench import fleet
from homeport.io.loop import new_event_loop

pytestmark = pytest.mark.integration


def test_fleet_of_200_agents_with_churn_and_streams(tmp_path: Path) -> None:
    fleet.raise_nofile()
    opts = fleet.Options(
        agents=200,
        streams=40,
        churn_rate=20.0,
        churn_seconds=3.0,
        idle_seconds=1.0,
        observers=4,
        root=tmp_path,
        settle=0.5,
        nc_runs=1,
        compare_full=True,
    )
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        fig = runner.run(fleet.run_fleet(opts, lambda _text: None))
    assert fig["server_alive"]
    assert fig["online"] == 200 and fig["online_end"] == 200
    assert fig["lost"] == 0, fig["lost_reasons"]
    assert fig["streams_ok"] == 40, fig["streams_errors"]
    assert fig["churn_started"] >= 40 and fig["churn_failed"] == 0
    # the legitimate node answered during the churn, not only before it
    assert fig["nc_churn"] and not fig["nc_fail"]
    # every observer's decoded map has every online node online (pushed deltas applied)
    assert fig["observer_maps"] == [fig["expected_online"]] * len(fig["observer_maps"])
    assert 0 < fig["delta_join"] < 2048  # one entry, not a full map
    assert fig["rss_per_agent"] > 0
    # cap mapdelta end to end (real server, real TLS): one reconnect on the quiet fleet gets
    # a delta of a few entries, the same reconnect without the map it held the 200-node map
    # (deflated as PEERS_Z, cap zpeers: ~16 KB on the wire, ~55 KB of JSON)
    assert fig["quiet_reconnect_full"] > 10_000
    assert fig["quiet_reconnect_delta"] < 2048
    # under churn the delta holds every agent that changed meanwhile, still below a full map
    assert fig["reconnect_map_bytes"] < fig["full"]["map_bytes"]
    table = fleet.render(fleet.rows(fig, opts), opts, 1.0)
    assert "server RSS per idle agent" in table
