"""``homeport code NAME[:PATH]``: open a VS Code Remote-SSH window on a node.

VS Code's Remote-SSH extension runs the system ``ssh`` with the user's
``~/.ssh/config`` (its ``remote.SSH.configFile`` default), so the node must be a
host there: the command checks with ``ssh -G NAME`` that ssh would route NAME
through homeport, installs the homeport Include when it would not (the same as
``homeport ssh-config --install``), and then runs
``code --folder-uri vscode-remote://ssh-remote+NAME/PATH`` (or ``code --remote
ssh-remote+NAME`` without a PATH). The pure parts live here; the command is in
:mod:`homeport.client.cli`.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from homeport.wire.names import host_name_problem

#: What marks a homeport ProxyCommand in ``ssh -G`` output (client.ssh.proxy_command).
PROXY_MARK = "ncfast.py"


@dataclass(frozen=True, slots=True)
class CodeTarget:
    """``NAME[:PATH]`` parsed: the ssh host as VS Code will name it, and an absolute path."""

    host: str
    path: str = ""


def parse_target(text: str) -> CodeTarget:
    """Parse ``labpc``, ``labpc:/srv/project`` or ``labpc.work:/home/me``.

    Raises:
        ValueError: with a user-facing message (a relative PATH: VS Code needs it absolute).
    """
    host, sep, path = text.partition(":")
    problem = host_name_problem(host)
    if problem is not None:
        raise ValueError(problem)
    if sep and not path.startswith("/"):
        raise ValueError(
            f"{path!r}: give an absolute path on {host} (e.g. {host}:/home/you/project); "
            "VS Code cannot resolve a relative one"
        )
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise ValueError("the path holds control characters")
    return CodeTarget(host, path)


def remote_authority(target: CodeTarget) -> str:
    return f"ssh-remote+{target.host}"


def folder_uri(target: CodeTarget) -> str:
    """``vscode-remote://ssh-remote+NAME/PATH`` (the path percent-encoded, ``/`` kept)."""
    return f"vscode-remote://{remote_authority(target)}{quote(target.path, safe='/')}"


def code_argv(code: str, target: CodeTarget) -> list[str]:
    """The ``code`` command line: a folder when PATH was given, else just the remote window."""
    if target.path:
        return [code, "--folder-uri", folder_uri(target)]
    return [code, "--remote", remote_authority(target)]


def routed(ssh_g_output: str) -> bool:
    """Whether ``ssh -G NAME`` output shows homeport's ProxyCommand for NAME."""
    for line in ssh_g_output.splitlines():
        key, _, value = line.partition(" ")
        if key.lower() == "proxycommand":
            return PROXY_MARK in value
    return False
