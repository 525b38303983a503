"""The ProxyCommand launcher: ``python -I -S /path/to/homeport/ncfast.py [--state DIR] HOST PORT``.

ssh starts its ProxyCommand once per connection, so interpreter start-up is paid
on every ``ssh``, ``scp`` and ``rsync``. ``homeport nc`` needs only the standard
library, so this launcher lets ``homeport ssh`` and ``homeport ssh-config`` run it
with ``-S`` (no ``site``: no ``.pth`` files, no site-packages scan) and ``-I``
(isolated: ignores PYTHON* variables such as PYTHONDONTWRITEBYTECODE, which would
force a recompile every time). It puts the directory that contains the
``homeport`` package back on ``sys.path`` by hand, and nothing else. When a local
agent answers on ``<state>/agent.sock``, nc loads no module beyond built-in ones
(see :mod:`homeport.client.nc`), so start-up is mostly the interpreter's own.
"""

import os
import sys


def _run() -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from homeport.client.nc import main

    return main(sys.argv[1:])


if __name__ == "__main__":
    code = _run()
    # Skip interpreter finalization (10-25 ms of freeing objects on every ssh):
    # nc owns no resources that need it, and the pump has already closed or
    # flushed everything it wrote.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
