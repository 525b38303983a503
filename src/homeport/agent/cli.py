"""``homeport up``: enroll (first run) and run the agent in the foreground.

Lives in the agent package because it composes the agent runtime; process
packages do not import each other (see tests/test_architecture.py).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click

STATE_HELP = "state directory (env HOMEPORT_STATE, default ~/.local/state/homeport)"


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"homeport: {message}", err=True)
    sys.exit(code)


def _setup_logging(verbose: bool) -> None:
    under_systemd = "INVOCATION_ID" in os.environ  # journald adds its own timestamps
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not under_systemd:
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format=fmt, stream=sys.stderr
    )


# -- up -------------------------------------------------------------------------


def _services(ssh: bool, expose: tuple[str, ...]) -> tuple[Any, ...] | None:
    """Services from the command line (None when none were given: reuse the saved ones)."""
    from homeport.policy.services import parse_expose

    specs = (["ssh=127.0.0.1:22"] if ssh else []) + list(expose)
    if not specs:
        return None
    by_name: dict[str, Any] = {}
    for spec in specs:
        try:
            svc = parse_expose(spec)
        except ValueError as exc:
            _fail(str(exc), 2)
        by_name[svc.name] = svc  # a later --expose of the same name wins
    return tuple(by_name.values())


def _enroll_with_retry(server: str, authkey: str, name: str, state_dir: Path) -> Any:
    """Enroll; auth errors are fatal, network errors are retried (boot before network)."""
    from homeport.io.dial import DialError, enroll
    from homeport.proto.backoff import Backoff

    log = logging.getLogger("homeport.up")
    backoff = Backoff()
    while True:
        try:
            st = enroll(server, authkey, name, state_dir)
        except DialError as exc:
            if not exc.retriable:
                _fail(f"enrollment failed [{exc.code}]: {exc.message}")
            delay = backoff.next_delay()
            log.warning("enrollment: %s; retrying in %.1fs", exc.message, delay)
            time.sleep(delay)
            continue
        log.info("enrolled as %s (%s) with server %s", st.name, st.node_id, server)
        return st


@click.command()
@click.option("--server", metavar="HOST:PORT", help="server address (first run only)")
@click.option(
    "--authkey", metavar="KEY", help="auth key from 'homeport keys create' (first run only)"
)
@click.option("--name", metavar="NAME", help="this node's name (first run only)")
@click.option("--ssh", "expose_ssh", is_flag=True, help="expose the local sshd (ssh=127.0.0.1:22)")
@click.option("--expose", multiple=True, metavar="NAME=HOST:PORT", help="expose a local service")
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option(
    "--shields-up", is_flag=True, help="accept no incoming stream at all (this node can still open)"
)
@click.option("--ping-interval", type=float, default=5.0, show_default=True, metavar="S")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def up(  # noqa: PLR0917 - click passes options positionally
    server: str | None,
    authkey: str | None,
    name: str | None,
    expose_ssh: bool,
    expose: tuple[str, ...],
    state: str | None,
    shields_up: bool,
    ping_interval: float,
    verbose: bool,
) -> None:
    """Enroll this machine (first run) and run the agent in the foreground."""
    from homeport.node import state as node_state

    _setup_logging(verbose)
    log = logging.getLogger("homeport.up")
    services = _services(expose_ssh, expose)
    state_dir = node_state.resolve_dir(state)
    try:
        st = node_state.load(state_dir)
        if authkey:
            log.warning("already enrolled as %s; ignoring --authkey/--server/--name", st.name)
    except node_state.NotEnrolled:
        if not (server and authkey and name):
            _fail(f"not enrolled ({state_dir}): {node_state.ENROLL_HINT}")
        from homeport.wire.names import node_name_problem

        problem = node_name_problem(name)
        if problem is not None:  # the server says the same (bad-name), after a round trip
            _fail(problem, 2)
        st = _enroll_with_retry(server, authkey, name, state_dir)
    except node_state.StateError as exc:
        _fail(str(exc))
    if services is not None:
        st = st.with_services(services)
        node_state.save(st)
    elif not st.services:
        log.warning("exposing nothing: add --ssh or --expose NAME=HOST:PORT")
    _mark_shields(st.dir, shields_up)
    from homeport.agent.runtime import run_agent

    sys.exit(
        run_agent(
            st,
            st.services,
            ping_interval=ping_interval,
            idle_timeout=3 * ping_interval,
            shields_up=shields_up,
        )
    )


def _mark_shields(state_dir: Path, shields_up: bool) -> None:
    """Leave a mark for ``homeport status`` (another process) that shields are up, or not."""
    from homeport.node.files import write_private
    from homeport.proto.node import SHIELDS_UP_FILE

    path = state_dir / SHIELDS_UP_FILE
    try:
        if shields_up:
            write_private(path, b"shields up: this node accepts no incoming streams\n")
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        logging.getLogger("homeport.up").warning("cannot update %s: %s", path, exc)


def register(cli: click.Group) -> None:
    """Add ``up`` to the top-level ``homeport`` group."""
    cli.add_command(up)
