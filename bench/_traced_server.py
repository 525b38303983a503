"""``homeport`` under tracemalloc: SIGUSR2 writes a snapshot (for ``bench.fleet_memory``).

Run as ``python -m bench._traced_server server ...``. Each SIGUSR2 dumps
``$HP_TRACE_OUT.<n>`` and then creates ``$HP_TRACE_OUT.<n>.done``.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import signal
import sys
import tracemalloc
from types import FrameType


def main() -> int:
    """Without ``HP_TRACE_OUT``: no tracing (RSS figures); ``HP_ENCODED``: an experiment's
    ``io.control.ENCODED_CHUNK`` and ``ENCODED_HIGH_WATER`` (bytes)."""
    encoded = os.environ.get("HP_ENCODED")
    if encoded:
        from homeport.io import control

        control.ENCODED_CHUNK = control.ENCODED_HIGH_WATER = int(encoded)
    out = os.environ.get("HP_TRACE_OUT", "")
    if out:
        tracemalloc.start(int(os.environ.get("HP_TRACE_FRAMES", "8")))
    count = 0

    def dump(_signum: int, _frame: FrameType | None) -> None:
        nonlocal count
        count += 1
        gc.collect()
        tracemalloc.take_snapshot().dump(f"{out}.{count}")
        types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        with open(f"{out}.{count}.types", "w") as f:
            json.dump(dict(types), f)
        with open(f"{out}.{count}.done", "w"):
            pass

    if out:
        signal.signal(signal.SIGUSR2, dump)
    from homeport.__main__ import main as homeport_main

    return homeport_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
