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
    name: str,
    args: list[str],
    state_dir: Path,
    *,
    python: str | None = None,
    ssh: str = "ssh",
    extra: list[tuple[str, str]] | None = None,
) -> list[str]:
    """The argv ``homeport ssh`` execs: options first, then NAME, then the user's args.

    ``extra``: more options (the certificate's IdentityFile/CertificateFile).
    """
    argv = [ssh]
    for key, value in [*ssh_options(state_dir, python), *(extra or [])]:
        argv += ["-o", f"{key}={value}"]
    return [*argv, name, *args]


def exec_ssh(
    name: str, args: list[str], state_dir: Path, extra: list[tuple[str, str]] | None = None
) -> None:
    """Replace this process with ssh (never returns on success)."""
    argv = ssh_argv(name, args, state_dir, extra=extra)
    os.execvp(argv[0], argv)  # noqa: S606 - exec ssh, no shell


def _quote_config(value: str) -> str:
    return f'"{value}"' if any(c.isspace() for c in value) and '"' not in value else value


def ssh_config_block(
    names: list[str], state_dir: Path, *, python: str | None = None, certs: bool = False
) -> str:
    """A ``Host`` block for ~/.ssh/config covering ``names`` (the network's nodes).

    ``certs``: add a ``Match … exec`` block that fetches a fresh key and SSH
    certificate (``homeport ssh-cert``) before every login and points ssh at
    them; if the server refuses, the exec fails and ssh uses the user's own keys.
    """
    if not names:
        return "# no nodes in this homeport network yet\n"
    lines = [f"# homeport: nodes of this network (state {state_dir})", "Host " + " ".join(names)]
    for key, value in ssh_options(state_dir, python):
        lines.append(f"    {key} {_quote_config(value) if key != 'ProxyCommand' else value}")
    if certs:
        lines += cert_match_block(names, state_dir, python)
    return "\n".join(lines) + "\n"


def cert_match_block(names: list[str], state_dir: Path, python: str | None = None) -> list[str]:
    """``Match host … exec "homeport ssh-cert …"`` + IdentityFile/CertificateFile lines.

    The exec runs while ssh reads its config, before authentication: it writes
    the key and certificate to fixed per-(node, account) paths
    (``homeport.client.login.key_paths``), which the two lines then name.
    """
    from homeport.client.login import SSH_KEYS_DIR

    exe = python or sys.executable
    cmd = " ".join(
        [
            shlex.quote(exe),
            "-m",
            "homeport",
            "ssh-cert",
            "--quiet",
            "--state",
            shlex.quote(str(state_dir)),
            "--user",
            "%r",
            "%n",
        ]
    )
    base = state_dir / SSH_KEYS_DIR
    return [
        "Match host " + ",".join(names) + f' exec "{cmd}"',
        f"    IdentityFile {_quote_config(str(base / '%n_%r'))}",
        f"    CertificateFile {_quote_config(str(base / '%n_%r-cert.pub'))}",
    ]


def ssh_config_json(names: list[str], state_dir: Path, *, python: str | None = None) -> str:
    return json.dumps(
        {
            "hosts": names,
            "options": dict(ssh_options(state_dir, python)),
        },
        indent=2,
    )
