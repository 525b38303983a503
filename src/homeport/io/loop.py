"""The one event-loop factory of homeport's asyncio processes (server and agent).

uvloop when it is installed (it is a dependency on Linux; the server's control
connections and the agent's reconnect loop are faster on it), else the standard
loop, so a missing wheel degrades speed and never stops a process from running.
Use it as ``asyncio.Runner(loop_factory=new_event_loop)``.
"""

from __future__ import annotations

import asyncio


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A fresh event loop: uvloop's if importable, else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
