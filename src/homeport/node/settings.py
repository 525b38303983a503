"""Changing what a node exposes: ``homeport set`` and ``homeport up --ssh/--expose``.

Why a pure decision: the first version of ``up --expose web=…`` *replaced* the
saved services, so a user adding Jupyter to a remote lab PC silently stopped
exposing ssh and locked themselves out. Changes now add and remove by name, and
a change that would leave no ssh on a node that had it (the way back in) is
refused unless the user asked for exactly that with ``--force``.

The exit-node setting (``--advertise-exit``) is kept here too, in its own file
(:data:`EXIT_FILE`); see docs/exit-nodes.md.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path

from homeport.node.files import write_private
from homeport.policy import exitnet
from homeport.policy.services import SSH_NAME, Service


class ChangeVerdict(enum.Enum):
    """What :func:`apply_changes` decided (stable strings for ``--json``)."""

    CHANGED = "changed"
    UNCHANGED = "unchanged"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class ServiceChange:
    """The outcome: the new service list (the old one when refused) and why."""

    verdict: ChangeVerdict
    services: tuple[Service, ...]
    reason: str


def describe(services: tuple[Service, ...]) -> str:
    """``ssh=127.0.0.1:22, web=127.0.0.1:8888`` (or ``nothing``)."""
    return ", ".join(f"{s.name}={s.target_host}:{s.target_port}" for s in services) or "nothing"


def apply_changes(
    current: tuple[Service, ...],
    *,
    add: tuple[Service, ...] = (),
    remove: tuple[str, ...] = (),
    force: bool = False,
) -> ServiceChange:
    """``current`` with ``remove`` (names) taken out and ``add`` put in (same name: replaced).

    Refused: removing a name that is not exposed (a typo must not pass for
    success), and dropping ssh without ``force``.
    """
    names_now = {s.name for s in current}
    unknown = [n for n in remove if n not in names_now and n not in {s.name for s in add}]
    if unknown:
        return ServiceChange(
            ChangeVerdict.REFUSED,
            current,
            f"not exposed: {', '.join(unknown)} (exposed now: {describe(current)})",
        )
    by_name = {s.name: s for s in current if s.name not in remove}
    for svc in add:
        by_name[svc.name] = svc
    new = tuple(by_name.values())
    if SSH_NAME in names_now and SSH_NAME not in by_name and not force:
        return ServiceChange(
            ChangeVerdict.REFUSED,
            current,
            "this would stop exposing ssh, the way back into this node; "
            "add --force if that is what you want",
        )
    if new == current:
        return ServiceChange(ChangeVerdict.UNCHANGED, current, f"exposing {describe(current)}")
    return ServiceChange(ChangeVerdict.CHANGED, new, f"exposing {describe(new)}")


# -- exit node settings (``--advertise-exit``) ----------------------------------------------

#: The file (in the state directory) that keeps ``--advertise-exit``; absent = not an exit.
EXIT_FILE = "exit.json"
#: exit.json is tiny; anything bigger is not ours.
MAX_EXIT_FILE = 64 * 1024


class ExitSettingsError(Exception):
    """exit.json is unreadable or malformed (the message is user-facing)."""


def load_exit(state_dir: Path) -> tuple[str, ...]:
    """The exit networks saved for this node (``()``: not an exit node).

    Why a file of its own rather than node.json: ``homeport nc`` reads node.json
    on every ssh connection, and the exit setting is the agent's business only.

    Raises:
        ExitSettingsError: the file exists but is not a list of networks.
    """
    path = state_dir / EXIT_FILE
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_EXIT_FILE + 1)
    except FileNotFoundError:
        return ()
    except OSError as exc:
        raise ExitSettingsError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if len(raw) > MAX_EXIT_FILE:
            raise ValueError("file too large")
        obj = json.loads(raw)
        nets = obj.get("exit") if isinstance(obj, dict) else None
        if not isinstance(nets, list) or not all(isinstance(n, str) for n in nets):
            raise ValueError("'exit' is not a list of networks")
        if not nets:
            return ()
        return exitnet.parse_exit_spec(",".join(nets))
    except ValueError as exc:
        raise ExitSettingsError(
            f"{path}: {exc}; fix it with homeport set --advertise-exit"
        ) from None


def save_exit(state_dir: Path, nets: tuple[str, ...]) -> None:
    """Keep ``nets`` as this node's exit networks (``()``: stop being an exit node)."""
    data = json.dumps({"exit": list(nets)}, indent=2).encode() + b"\n"
    write_private(state_dir / EXIT_FILE, data)
