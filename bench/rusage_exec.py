"""Run a command and record its CPU time: ``python rusage_exec.py OUT.json -- CMD ...``.

Used as a wrapper around ``homeport nc`` inside ssh's ``ProxyCommand`` during
the bulk runs of :mod:`bench.ssh_paths`, because ssh (not the benchmark) is the
parent of the proxy process and nothing else could reap it to read its
rusage.  The command inherits stdin and stdout unchanged (the data path is the
command's own); the wrapper only forks, forwards SIGHUP/SIGTERM/SIGINT (ssh
SIGHUPs its proxy when it exits), reaps the child with ``wait4`` and writes
``{"user": s, "sys": s, "status": n}`` to OUT.json (atomically, via rename).

Standard library only; run by file path, so it needs no ``sys.path`` set-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from types import FrameType


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: rusage_exec.py OUT.json -- CMD [ARG...]\n")
        return 2
    out, cmd = argv[0], argv[2:]
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    _, status, usage = os.wait4(pid, 0)
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"user": usage.ru_utime, "sys": usage.ru_stime, "status": status}, fh)
    os.replace(tmp, out)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
