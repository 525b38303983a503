"""``homeport service install``: a systemd unit that keeps the agent (or server) running.

``Restart=always`` with a short ``RestartSec`` because the agent exits only
when it must, and ``network-online.target`` only orders the start: the agent
itself survives booting before the network. One exit is final: a node an admin
removed exits with :data:`NODE_REMOVED_EXIT`, and ``RestartPreventExitStatus``
keeps systemd from re-running it every two seconds forever; ``systemctl status``
then shows the agent's last words ("removed by an admin; enroll again").
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from homeport.node.files import write_public

AGENT_UNIT = "homeport-agent.service"
SERVER_UNIT = "homeport-server.service"
#: The agent's exit status when the server says this node was removed
#: (``homeport.agent.runtime.ExitCode.NODE_REMOVED``; a test keeps them equal).
NODE_REMOVED_EXIT = 3
SYSTEM_DIR = Path("/etc/systemd/system")
DEFAULT_LISTEN = "0.0.0.0:8443"


@dataclass(frozen=True, slots=True)
class UnitPlan:
    """Where a unit goes, what it says, and how to turn it on."""

    name: str
    path: Path
    text: str
    enable_command: str
    system: bool


def homeport_command() -> list[str]:
    """Absolute command that runs homeport: the ``homeport`` script, else ``python -m``."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "homeport" and argv0.exists():
        return [str(argv0.resolve())]
    found = shutil.which("homeport")
    if found:
        return [str(Path(found).resolve())]
    return [sys.executable, "-m", "homeport"]


def unit_text(
    *,
    server: bool,
    command: list[str],
    directory: Path,
    listen: str = DEFAULT_LISTEN,
    user: str | None = None,
    system: bool = True,
    pythonpath: str | None = None,
) -> str:
    """The unit file text (pure: tests check it)."""
    if server:
        args = [*command, "server", "--data", str(directory), "--listen", listen]
        description = "homeport server (coordinator and relay)"
    else:
        args = [*command, "up", "--state", str(directory)]
        description = "homeport agent"
    lines = [
        "[Unit]",
        f"Description={description}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={shlex.join(args)}",
        "Restart=always",
        "RestartSec=2",
    ]
    if not server:
        lines.append(f"RestartPreventExitStatus={NODE_REMOVED_EXIT}")
    if user and system:
        lines.append(f"User={user}")
    if server and system and _port_of(listen) < PRIVILEGED_PORTS:
        # A non-root User= cannot bind below 1024 (443 is the usual public port) without it
        # (harmless for root). A user unit cannot be granted it: its manager runs as the user.
        lines.append("AmbientCapabilities=CAP_NET_BIND_SERVICE")
    if pythonpath:
        lines.append(f"Environment={shlex.quote('PYTHONPATH=' + pythonpath)}")
    lines += [
        "",
        "[Install]",
        f"WantedBy={'multi-user.target' if system else 'default.target'}",
        "",
    ]
    return "\n".join(lines)


#: Ports below this need CAP_NET_BIND_SERVICE (or root) to bind.
PRIVILEGED_PORTS = 1024


def _port_of(listen: str) -> int:
    """The port of ``ADDR:PORT`` (65535 when unreadable: no capability is asked for)."""
    _, _, port = listen.rpartition(":")
    return int(port) if port.isdigit() else 65535


def _login_name() -> str:
    """This user's login name, from the password database (``$USER`` may be unset)."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or str(os.getuid())


def plan(
    *,
    server: bool,
    directory: Path,
    listen: str = DEFAULT_LISTEN,
    user: str | None = None,
    system: bool | None = None,
    command: list[str] | None = None,
    pythonpath: str | None = None,
) -> UnitPlan:
    """Decide unit name, location (system when root, else user) and enable command."""
    system = os.geteuid() == 0 if system is None else system
    name = SERVER_UNIT if server else AGENT_UNIT
    if system:
        path = SYSTEM_DIR / name
        enable = f"systemctl daemon-reload && systemctl enable --now {name}"
    else:
        config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        path = config / "systemd" / "user" / name
        enable = (
            f"systemctl --user daemon-reload && systemctl --user enable --now {name}"
            f" && loginctl enable-linger {shlex.quote(_login_name())}"
        )
    text = unit_text(
        server=server,
        command=command or homeport_command(),
        directory=directory,
        listen=listen,
        user=user,
        system=system,
        pythonpath=pythonpath,
    )
    return UnitPlan(name=name, path=path, text=text, enable_command=enable, system=system)


def install(p: UnitPlan) -> None:
    """Write the unit file (0644), creating its directory."""
    p.path.parent.mkdir(parents=True, exist_ok=True)
    write_public(p.path, p.text.encode())
