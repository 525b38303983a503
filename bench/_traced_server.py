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
import ssl
import sys
import time
import tracemalloc
from types import FrameType


def _tickets(n: int) -> None:
    """Experiment: the control server context sends ``n`` TLS 1.3 tickets again (before
    this branch: OpenSSL's default 2, stateful under OP_NO_TICKET, cached per handshake)."""
    from homeport.crypto import tls
    from homeport.io import tlsctx

    policy = tls.control_server_policy

    def with_tickets() -> ssl.SSLContext:
        ctx = policy()
        ctx.num_tickets = n
        return ctx

    tlsctx.control_server_policy = with_tickets  # type: ignore[attr-defined]


def _trim_probe(out: str) -> None:
    """SIGUSR1: one glibc ``malloc_trim(0)``; its duration (s) goes to ``$out.trim``."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        t0 = time.perf_counter()
        trim(0)
        took = time.perf_counter() - t0
        with open(f"{out}.trim.tmp", "w") as f:
            f.write(f"{took}\n")
        os.replace(f"{out}.trim.tmp", f"{out}.trim")

    signal.signal(signal.SIGUSR1, on_signal)


def main() -> int:
    """Without ``HP_TRACE_OUT``: no tracing (RSS figures). Experiments: ``HP_ENCODED``:
    ``io.control.ENCODED_CHUNK`` and ``ENCODED_HIGH_WATER`` (bytes); ``HP_TICKETS``: TLS 1.3
    tickets the control server context sends; ``HP_TRIM_OUT``: SIGUSR1 runs malloc_trim."""
    encoded = os.environ.get("HP_ENCODED")
    if encoded:
        from homeport.io import control

        control.ENCODED_CHUNK = control.ENCODED_HIGH_WATER = int(encoded)
    tickets = os.environ.get("HP_TICKETS")
    if tickets:
        _tickets(int(tickets))
    trim_out = os.environ.get("HP_TRIM_OUT")
    if trim_out:
        _trim_probe(trim_out)
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
