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

from homeport.proto.control import AGENT_PING_INTERVAL

STATE_HELP = "state directory (env HOMEPORT_STATE, default ~/.local/state/homeport)"
#: Environment variable an auth key may come from (removed from our environment once read).
AUTHKEY_ENV = "HOMEPORT_AUTHKEY"
#: Longest auth-key file or standard-input line we read (a key is ~100 bytes).
MAX_AUTHKEY_INPUT = 4096


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


# -- the auth key: never left in the command line -------------------------------------
#
# Why: /proc/PID/cmdline is readable by every local user, so ``homeport up
# --authkey KEY`` used to show a (possibly reusable) key in ``ps`` for the
# agent's whole life. The safe ways are a file (``--authkey-file``), the
# environment (``HOMEPORT_AUTHKEY``; /proc/PID/environ is readable only by
# the same user and root, and we drop it from our environment so children do
# not inherit it) or standard input (``--authkey -``). A key given literally
# still works, so existing scripts keep working, but the agent re-executes
# itself at once without it: the key travels to the new image through an
# inherited pipe (``--authkey-file /dev/fd/N``, same PID, so supervisors see no
# difference). A key from the environment is re-executed away the same way, as
# /proc/PID/environ keeps the environment the process was started with. The key
# is then visible only for the few milliseconds before that exec, not for
# weeks. Refusing a literal key instead would break every documented command
# line and push people toward worse workarounds; it does remain in the shell
# history, so we say so in a warning.


def _scrub_argv(args: list[str]) -> list[str] | None:
    """``args`` without a literal ``--authkey VALUE``; None if there is none."""
    out: list[str] = []
    found = False
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            out.extend(args[i:])
            break
        if a == "--authkey" and i + 1 < len(args) and args[i + 1] != "-":
            found = True
            i += 2
            continue
        if a.startswith("--authkey=") and a != "--authkey=-":
            found = True
            i += 1
            continue
        out.append(a)
        i += 1
    return out if found else None


def _we_are_the_program() -> bool:
    """Whether this process is ``homeport`` itself (not a test runner invoking the command)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", "") or ""
    return name.startswith("homeport") or Path(sys.argv[0]).name == "homeport"


def _reexec_without_key(key: str, *, from_env: bool = False) -> None:
    """Replace this process with one whose command line and environment hold no key.

    Returns only when there is nothing to hide or the exec failed.
    """
    args = sys.argv[1:]
    scrubbed = args if from_env else _scrub_argv(args)
    orig = list(getattr(sys, "orig_argv", []))
    if (
        scrubbed is None
        or not _we_are_the_program()
        or not orig
        or orig[len(orig) - len(args) :] != args
    ):
        return  # not from our real command line (a test runner): nothing to hide
    prefix = [sys.executable, *orig[1 : len(orig) - len(args)]]
    rfd, wfd = os.pipe()
    try:
        os.write(wfd, key.encode())  # far below the pipe buffer: never blocks
    finally:
        os.close(wfd)
    os.set_inheritable(rfd, True)
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    try:
        # same interpreter and arguments, minus the key: no shell, nothing parsed
        os.execve(  # noqa: S606
            sys.executable,
            [*prefix, *scrubbed, "--authkey-file", f"/dev/fd/{rfd}"],
            {k: v for k, v in os.environ.items() if k != AUTHKEY_ENV},
        )
    except OSError as exc:
        os.close(rfd)
        logging.getLogger("homeport.up").warning(
            "could not re-execute to hide the auth key from ps (%s)", exc
        )


def _read_limited(stream: Any, what: str) -> str:
    data = stream.read(MAX_AUTHKEY_INPUT + 1)
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    if len(data) > MAX_AUTHKEY_INPUT:
        _fail(f"{what} is longer than {MAX_AUTHKEY_INPUT} bytes: not an auth key", 2)
    lines = [str(ln).strip() for ln in data.splitlines() if ln.strip()]
    if len(lines) != 1:
        _fail(f"{what} must hold exactly one auth key line", 2)
    return lines[0]


def resolve_authkey(literal: str | None, key_file: str | None) -> str | None:
    """The auth key from exactly one of ``--authkey``, ``--authkey-file``, ``$HOMEPORT_AUTHKEY``."""
    env_key = os.environ.pop(AUTHKEY_ENV, None) or None
    given = [x for x in (literal, key_file, env_key) if x]
    if len(given) > 1:
        _fail(f"give the auth key one way only: --authkey, --authkey-file or ${AUTHKEY_ENV}", 2)
    if key_file:
        try:
            with open(key_file, "rb") as f:
                return _read_limited(f, f"auth key file {key_file}")
        except OSError as exc:
            _fail(f"cannot read auth key file {key_file}: {exc.strerror or exc}", 2)
    if literal == "-":
        if sys.stdin is None or sys.stdin.isatty():
            click.echo("auth key: ", err=True, nl=False)
        return _read_limited(sys.stdin, "standard input")
    if literal:
        logging.getLogger("homeport.up").warning(
            "an auth key on the command line stays in your shell history; prefer "
            "--authkey-file FILE, $%s or --authkey - (standard input)",
            AUTHKEY_ENV,
        )
        _reexec_without_key(literal)
        return literal
    if env_key:
        # /proc/PID/environ keeps the exec-time environment whatever we pop: re-exec it away
        _reexec_without_key(env_key, from_env=True)
    return env_key


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
    "--authkey",
    metavar="KEY",
    help="auth key from 'homeport keys create' (first run only); '-' reads it from standard "
    "input. Safer: --authkey-file or $HOMEPORT_AUTHKEY (a key given here is hidden from ps "
    "by re-executing without it)",
)
@click.option(
    "--authkey-file",
    metavar="FILE",
    help="read the auth key from FILE (first run only)",
)
@click.option("--name", metavar="NAME", help="this node's name (first run only)")
@click.option("--ssh", "expose_ssh", is_flag=True, help="expose the local sshd (ssh=127.0.0.1:22)")
@click.option("--expose", multiple=True, metavar="NAME=HOST:PORT", help="expose a local service")
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option(
    "--shields-up", is_flag=True, help="accept no incoming stream at all (this node can still open)"
)
@click.option(
    "--direct-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    metavar="N",
    help="TCP port for direct paths to other nodes (0: ephemeral; fix it for a port forward)",
)
@click.option(
    "--relay-only", is_flag=True, help="never try direct paths: every stream via the relay"
)
@click.option(
    "--no-portmap", is_flag=True, help="do not ask the router for a port mapping (NAT-PMP/PCP)"
)
@click.option(
    "--ping-interval", type=float, default=AGENT_PING_INTERVAL, show_default=True, metavar="S"
)
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def up(  # noqa: PLR0917 - click passes options positionally
    server: str | None,
    authkey: str | None,
    authkey_file: str | None,
    name: str | None,
    expose_ssh: bool,
    expose: tuple[str, ...],
    state: str | None,
    shields_up: bool,
    direct_port: int,
    relay_only: bool,
    no_portmap: bool,
    ping_interval: float,
    verbose: bool,
) -> None:
    """Enroll this machine (first run) and run the agent in the foreground."""
    from homeport.node import state as node_state

    _setup_logging(verbose)
    log = logging.getLogger("homeport.up")
    authkey = resolve_authkey(authkey, authkey_file)
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
            direct_port=direct_port,
            relay_only=relay_only,
            portmap=not no_portmap,
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
