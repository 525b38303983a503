"""Entry point of the ``homeport`` command.

``homeport nc`` runs on every ``ssh`` invocation (it is the ProxyCommand), so it
is dispatched here before anything heavy is imported: no click, no asyncio, no
cryptography — only the standard library modules the relay client needs.
Everything else goes through the click CLI in :mod:`homeport.cli`.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "nc":
        from homeport.client.nc import main as nc_main

        return nc_main(args[1:])
    from homeport.cli import cli

    return int(cli.main(args=args, prog_name="homeport", standalone_mode=True) or 0)


if __name__ == "__main__":
    sys.exit(main())
