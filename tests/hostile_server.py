"""``python -m tests.hostile_server DATA CONFIG_JSON``: a real server process with test limits.

The hostile-input tests measure a *separate* server process (its RSS, its sockets) and need
timeouts the ``homeport server`` CLI does not expose (a handshake timeout longer than the
flood, so the attacker's sockets stay while we measure). Prints one JSON line
``{"port": ..., "pin": ..., "pid": ...}`` once it listens; SIGTERM stops it like the CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from homeport.io.loop import new_event_loop
from homeport.server.app import Running, serve, setup_logging
from homeport.server.service import ServiceConfig


def main() -> None:
    data = Path(sys.argv[1])
    cfg = ServiceConfig(**json.loads(sys.argv[2]))
    setup_logging()

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

        def started(r: Running) -> None:
            print(json.dumps({"port": r.port, "pin": r.pin, "pid": os.getpid()}), flush=True)

        await serve(data, "127.0.0.1:0", stop, config=cfg, started=started)

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(run())


if __name__ == "__main__":
    main()
