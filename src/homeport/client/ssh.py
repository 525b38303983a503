"""``homeport ssh NAME [ssh args…]`` and ``homeport ssh-config``: plain OpenSSH, routed.

Both produce the same five options:

* ``ProxyCommand <python> -I -S <homeport>/ncfast.py --state <abs state> --fdpass %h %p``
  — the current interpreter, so a virtualenv install works without ``homeport`` on
  PATH, started without ``site`` because nc needs only the standard library (see
  :mod:`homeport.ncfast`; it saves the ``.pth``/site-packages scan on every ssh);
* ``ProxyUseFdpass yes`` (OpenSSH ≥ 6.5) — nc hands ssh a connected socket and
  exits instead of relaying every byte through itself: with a local agent
  running, ssh then talks straight to the agent's pump, and nc's life is a few
  milliseconds of start-up. ``--fdpass`` tells nc to expect this (see
  :mod:`homeport.client.nc`; without ProxyUseFdpass it just copies, as before);
* ``UserKnownHostsFile <state>/known_hosts/%h`` — ``nc`` writes the peer's host
  keys (vouched for by the server, checked end to end) to exactly this file
  before ssh reads a byte. ``%h`` rather than ``%n``: it is the name ``nc`` is
  given, so the file ssh reads is always the one ``nc`` wrote, even when a
  ``HostName`` line rewrites the name (OpenSSH 9.2 expands both tokens here);
* ``StrictHostKeyChecking yes`` — no trust-on-first-use prompt, no silent change;
* ``UpdateHostKeys no`` — ssh must not add keys to a file ``nc`` owns.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from homeport.node.state import KNOWN_HOSTS_DIR


def package_root() -> str:
    """The directory that contains the ``homeport`` package (for PYTHONPATH)."""
    return str(Path(__file__).resolve().parents[2])


def needs_pythonpath() -> bool:
    """True when homeport is importable only thanks to $PYTHONPATH (a source checkout)."""
    root = package_root()
    return root in os.environ.get("PYTHONPATH", "").split(os.pathsep)


def proxy_command(state_dir: Path, python: str | None = None, *, fdpass: bool = True) -> str:
    """The ProxyCommand: works from an install, a venv or a source checkout alike.

    ``fdpass`` adds ``--fdpass``, which goes with ``ProxyUseFdpass yes``; it is
    harmless without it (nc sees a pipe on stdout and copies).
    """
    exe = python or sys.executable
    launcher = Path(package_root()) / "homeport" / "ncfast.py"
    words = [shlex.quote(exe), "-I", "-S", shlex.quote(str(launcher))]
    words += ["--state", shlex.quote(str(state_dir))]
    if fdpass:
        words.append("--fdpass")
    return " ".join([*words, "%h", "%p"])


def ssh_options(state_dir: Path, python: str | None = None) -> list[tuple[str, str]]:
    """The (keyword, value) pairs that route ssh through homeport."""
    kh = state_dir / KNOWN_HOSTS_DIR / "%h"
    return [
        ("ProxyCommand", proxy_command(state_dir, python)),
        ("ProxyUseFdpass", "yes"),
        ("UserKnownHostsFile", str(kh)),
        ("StrictHostKeyChecking", "yes"),
        ("UpdateHostKeys", "no"),
    ]


def ssh_argv(
    name: str, args: list[str], state_dir: Path, *, python: str | None = None, ssh: str = "ssh"
) -> list[str]:
    """The argv ``homeport ssh`` execs: options first, then NAME, then the user's args."""
    argv = [ssh]
    for key, value in ssh_options(state_dir, python):
        argv += ["-o", f"{key}={value}"]
    return [*argv, name, *args]


def exec_ssh(name: str, args: list[str], state_dir: Path) -> None:
    """Replace this process with ssh (never returns on success)."""
    argv = ssh_argv(name, args, state_dir)
    os.execvp(argv[0], argv)  # noqa: S606 - exec ssh, no shell


def _quote_config(value: str) -> str:
    return f'"{value}"' if any(c.isspace() for c in value) and '"' not in value else value


def ssh_config_block(names: list[str], state_dir: Path, *, python: str | None = None) -> str:
    """A ``Host`` block for ~/.ssh/config covering ``names`` (the network's nodes)."""
    if not names:
        return "# no nodes in this homeport network yet\n"
    lines = [f"# homeport: nodes of this network (state {state_dir})", "Host " + " ".join(names)]
    for key, value in ssh_options(state_dir, python):
        lines.append(f"    {key} {_quote_config(value) if key != 'ProxyCommand' else value}")
    return "\n".join(lines) + "\n"


def ssh_config_json(names: list[str], state_dir: Path, *, python: str | None = None) -> str:
    return json.dumps(
        {
            "hosts": names,
            "options": dict(ssh_options(state_dir, python)),
        },
        indent=2,
    )
