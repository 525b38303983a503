"""The agent's core timer under uvloop: a deadline already past must not crash re-arming.

uvloop's ``call_at`` returns a plain ``Handle`` (no ``.when()``) for a time in the past;
the agent once called ``.when()`` on it and crashed its local API, discovery and the
control link's PEERS handler (found by trying the product as a new user).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from homeport.agent.runtime import Agent
from homeport.io.loop import new_event_loop


def test_rearming_a_past_deadline_twice_does_not_crash() -> None:
    loop = new_event_loop()
    fired: list[float] = []

    async def main() -> None:
        past = asyncio.get_running_loop().time() - 1.0
        fake = SimpleNamespace(
            core=SimpleNamespace(get_timer=lambda: past),
            _timer=None,
            _timer_when=None,
            _on_timer=lambda: fired.append(past),
        )
        Agent._arm_timer(fake)  # type: ignore[arg-type]
        Agent._arm_timer(fake)  # type: ignore[arg-type]  # same deadline: kept
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert fired, "a past deadline fires at once"
    if not type(loop).__module__.startswith("uvloop"):
        pytest.skip("uvloop is not installed: the plain asyncio loop never had the bug")
