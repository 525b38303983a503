"""``homeport up``: enroll (first run) and run the agent in the foreground.

Lives in the agent package because it composes the agent runtime; process
packages do not import each other (see tests/test_architecture.py).
"""

from __future__ import annotations

import dataclasses
import json
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
@click.option(
    "--server",
    metavar="HOST:PORT",
    help="server address (first run; later, a new address the node follows, pin kept)",
)
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
    "--ping-interval",
    type=float,
    default=AGENT_PING_INTERVAL,
    show_default=True,
    metavar="S",
    help="keepalive to the server; the link is dead after 3 missed pings",
)
@click.option(
    "--hostkey-refresh",
    type=click.FloatRange(0.1),
    default=60.0,
    show_default=True,
    metavar="S",
    help="re-read the exposed sshd's host keys this often (and after a failed connection)",
)
@click.option(
    "--metrics-listen",
    metavar="[HOST:]PORT",
    help="serve this agent's Prometheus metrics at http://HOST:PORT/metrics (off by default; "
    "HOST defaults to 127.0.0.1; docs/metrics.md)",
)
@click.option(
    "--metrics-allow-remote",
    is_flag=True,
    help="allow --metrics-listen on a non-loopback address (the metrics have no access control)",
)
@click.option(
    "--advertise-exit",
    metavar="NETS",
    help="let permitted nodes leave through this one to these networks "
    "(192.168.1.0/24,… or all; saved; see 'homeport socks')",
)
@click.option(
    "--proxy",
    metavar="URL",
    help="reach the server through this HTTP CONNECT proxy, http://[USER@]HOST:PORT "
    "(saved; 'off': never, 'auto': back to $HTTPS_PROXY/$NO_PROXY, the default). "
    "A password in the URL shows in ps: use --proxy-password-file",
)
@click.option(
    "--proxy-password-file",
    metavar="FILE",
    help="read the password of the --proxy URL's user (or the saved proxy's) from FILE, or "
    "from $HOMEPORT_PROXY_PASSWORD; saved with the proxy in network.json (0600)",
)
@click.option(
    "--tls-data",
    type=click.Choice(["auto", "on", "off"]),
    default=None,
    help="wrap data connections in TLS to the server, for middleboxes that pass only TLS "
    "(saved; auto, the default: when a proxy is used)",
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
    hostkey_refresh: float,
    metrics_listen: str | None,
    metrics_allow_remote: bool,
    advertise_exit: str | None,
    proxy: str | None,
    proxy_password_file: str | None,
    tls_data: str | None,
    verbose: bool,
) -> None:
    """Enroll this machine (first run) and run the agent in the foreground."""
    from homeport.node import state as node_state

    _setup_logging(verbose)
    attach = None
    if metrics_listen is not None:  # prometheus is imported only when asked
        from homeport.agent.metrics import ListenError, attach_metrics, parse_metrics_listen

        try:
            at = parse_metrics_listen(metrics_listen, allow_remote=metrics_allow_remote)
        except ListenError as exc:
            _fail(str(exc), 2)
        attach = attach_metrics(*at)
    log = logging.getLogger("homeport.up")
    authkey = resolve_authkey(authkey, authkey_file)
    services = _services(expose_ssh, expose)
    try:
        state_dir = node_state.resolve_dir(state)
    except node_state.StateError as exc:
        _fail(str(exc), 2)
    password = _proxy_password(proxy_password_file)
    if proxy is not None or tls_data is not None or password is not None:
        _save_network(state_dir, proxy, tls_data, password)
    try:
        st = node_state.load(state_dir)
        st = _moved(st, server, name, authkey)
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
    if services is not None:  # added to the saved ones: `set --unexpose` removes
        from homeport.node.settings import ChangeVerdict, apply_changes

        change = apply_changes(st.services, add=services)
        if change.verdict is ChangeVerdict.CHANGED:
            st = st.with_services(change.services)
            node_state.save(st)
            log.info("%s (saved; remove one with: homeport set --unexpose NAME)", change.reason)
    elif not st.services:
        log.info(
            "exposing nothing (this node can still reach others): add services with "
            "homeport set --ssh or --expose NAME=HOST:PORT"
        )
    _exit_setting(st.dir, advertise_exit, log)
    from homeport.io.dial import DialError, route_of

    lock = _lock_state(st.dir)  # first: a second agent refuses before it logs its route
    try:
        log.info("server %s: %s", st.server, route_of(st).reason)
    except DialError as exc:
        _fail(exc.message, 2)
    _mark_shields(st.dir, shields_up)
    from homeport.agent.runtime import run_agent

    code = run_agent(
        st,
        st.services,
        ping_interval=ping_interval,
        idle_timeout=3 * ping_interval,
        shields_up=shields_up,
        hostkey_refresh=hostkey_refresh,
        direct_port=direct_port,
        relay_only=relay_only,
        portmap=not no_portmap,
        attach=attach,
    )
    os.close(lock)
    sys.exit(code)


def _exit_setting(state_dir: Path, spec: str | None, log: logging.Logger) -> None:
    """Save ``--advertise-exit`` (if given) and check the saved one; one-line errors."""
    from homeport.node import settings
    from homeport.policy import exitnet

    try:
        if spec is not None:
            settings.save_exit(state_dir, exitnet.parse_exit_spec(spec))
        nets = settings.load_exit(state_dir)
    except (ValueError, settings.ExitSettingsError) as exc:
        _fail(str(exc), 2)
    if nets:
        log.info(
            "exit node for %s (saved; stop with: homeport set --no-exit)", exitnet.describe(nets)
        )


def _proxy_password(path: str | None) -> tuple[str, str] | None:
    """(password, where it came from) from ``--proxy-password-file`` or
    ``$HOMEPORT_PROXY_PASSWORD`` (one of them), else None. Only the line break that ends
    the file is taken off: a password may hold spaces."""
    from homeport.node.settings import ENV_PROXY_PASSWORD, MAX_PASSWORD_FILE

    env = os.environ.pop(ENV_PROXY_PASSWORD, None)  # not for the agent's children
    if path and env:
        _fail(
            f"give the proxy password one way only: --proxy-password-file or ${ENV_PROXY_PASSWORD}",
            2,
        )
    if env:
        return env, f"${ENV_PROXY_PASSWORD}"
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PASSWORD_FILE + 1)
    except OSError as exc:
        _fail(f"cannot read the proxy password file {path}: {exc.strerror or exc}", 2)
    if len(data) > MAX_PASSWORD_FILE:
        _fail(f"proxy password file {path} is longer than {MAX_PASSWORD_FILE} bytes", 2)
    text = data.decode("utf-8", "replace").removesuffix("\n").removesuffix("\r")
    if "\n" in text:
        _fail(f"proxy password file {path} must hold one line", 2)
    return text, f"the file {path}"


def _save_network(
    state_dir: Path,
    proxy: str | None,
    tls_data: str | None,
    password: tuple[str, str] | None = None,
) -> None:
    """Save ``--proxy``/``--tls-data`` in the state directory (before enrollment uses them),
    with the password from :func:`_proxy_password` added to the given or saved proxy URL."""
    from dataclasses import replace

    from homeport.node import settings
    from homeport.node.files import UnsafeDirectory, safe_dir
    from homeport.wire.httpconnect import parse_proxy_url

    try:
        safe_dir(state_dir)
        saved = settings.load_network(state_dir)
    except (ValueError, UnsafeDirectory, OSError) as exc:
        _fail(str(exc))
    if proxy is not None:
        value = proxy.strip()
        if value.lower() == "auto" or not value:
            saved = replace(saved, proxy=None)
        elif value.lower() in settings.NO_PROXY_WORDS:
            saved = replace(saved, proxy="off")
        else:
            try:
                saved = replace(saved, proxy=parse_proxy_url(value).url())
            except ValueError as exc:
                _fail(f"--proxy: {exc}", 2)
            if password is None and settings.proxy_has_password(value):
                logging.getLogger("homeport.up").warning(
                    "the proxy password in --proxy is visible to every user in 'ps' while up "
                    "runs; prefer --proxy http://USER@HOST:PORT with --proxy-password-file "
                    "FILE or $%s (docs/proxy.md)",
                    settings.ENV_PROXY_PASSWORD,
                )
    if password is not None:
        if not saved.proxy or saved.proxy == "off":
            _fail(
                f"a proxy password from {password[1]} needs a proxy: --proxy http://USER@HOST:PORT",
                2,
            )
        try:
            url = saved.proxy
            if proxy is None:  # a new password for the saved proxy's user (rotated)
                url = replace(parse_proxy_url(url), password=None).url()
            saved = replace(saved, proxy=settings.proxy_with_password(url, *password))
        except ValueError as exc:
            _fail(f"--proxy: {exc}", 2)
    if tls_data is not None:
        saved = replace(saved, tls_data=settings.TlsData(tls_data))
    try:
        settings.save_network(state_dir, saved)
    except OSError as exc:
        _fail(f"cannot save the network settings in {state_dir}: {exc}")


#: The lock file that keeps a second agent off a state directory.
LOCK_FILE = "agent.lock"


def _lock_state(state_dir: Path) -> int:
    """Hold ``<state>/agent.lock`` for this agent's life (a second one refuses to start).

    Why: two agents with one identity replace each other's session at the
    server in turn (the node flaps online/offline) and fight over agent.sock.
    ``flock`` is released by the kernel when the process dies, so a crash
    leaves no stale lock behind.
    """
    import fcntl

    path = state_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        _fail(f"cannot open {path}: {exc.strerror or exc}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        _fail(
            f"another 'homeport up' (pid {holder}) already runs on {state_dir}; "
            "stop it first, or give this one its own --profile NAME (or --state DIR)"
        )
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _moved(st: Any, server: str | None, name: str | None, authkey: str | None) -> Any:
    """An enrolled node given ``--server``/``--name``: follow a new address, refuse a rename.

    Why not ignore them (as before): a user who corrects a wrong address or moves
    the server to a new host expects the flag to take effect. The server's
    identity is still checked against the pin taken at enrollment, so a new
    address cannot lead the node to another network.
    """

    log = logging.getLogger("homeport.up")
    if name and name != st.name:
        _fail(_rename_hint(st.name, name), 2)
    if server and server != st.server:
        st = _move(st, server)
        log.info("server address changed: %s (same network: the pin is kept)", st.server)
    if authkey:
        log.warning("already enrolled as %s; the auth key is not needed (not used)", st.name)
    return st


def _rename_hint(old: str, new: str) -> str:
    """Why ``--name`` does not rename an enrolled node here, and what does.

    A node's name is the network's (the server checks it is unique and the
    policy may name it), so the server renames it: the admin's ``nodes rename``
    tells the node, which saves its new name at once (or at its next connection).
    """
    from homeport.wire.names import node_name_problem

    problem = node_name_problem(new)
    if problem is not None:
        return problem
    return (
        f"this node is enrolled as {old!r}; the server renames nodes: on the server host run "
        f"'homeport nodes rename {old} {new}' (this node follows by itself)"
    )


def _move(st: Any, server: str) -> Any:
    """``st`` at the new address ``server``, saved only once the server there proved it is
    the same network: its certificate matches the pin taken at enrollment (or a publicly
    valid renewal of it) and it accepts this node's identity (a HELLO/WELCOME and a map).

    Why before saving: a typo or another network's server must not replace an address
    that worked; the node would then retry the wrong one forever.
    """
    from homeport.io.dial import DialError, request_netmap
    from homeport.node import state as node_state

    try:
        node_state.parse_server(server)
    except ValueError as exc:
        _fail(f"--server: {exc}", 2)
    moved = dataclasses.replace(st, server=server)
    try:
        request_netmap(moved, timeout=10.0)
    except DialError as exc:
        if exc.code == "pin-mismatch":
            _fail(
                f"{server} is not this node's network: its server presents another "
                f"certificate than the one pinned when joining ({exc.message}); not saved, "
                f"still {st.server}",
                2,
            )
        _fail(f"cannot verify {server} ({exc.message}); not saved, still {st.server}")
    node_state.save(moved)
    return moved


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


@click.command("ssh-trust")
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option("--print", "print_only", is_flag=True, help="show what would be written")
@click.option("--user", "account", metavar="USER", help="without root: this account [yours]")
def ssh_trust(state: str | None, print_only: bool, account: str | None) -> None:
    """Make the local sshd trust the homeport server's SSH certificates (keyless SSH).

    As root: an sshd drop-in with TrustedUserCAKeys (reload sshd after). Otherwise
    a cert-authority line in your own ~/.ssh/authorized_keys. Needs the CA key the
    agent learnt from the server ('homeport up' once).
    """
    from homeport.agent import sshtrust
    from homeport.node.state import resolve_dir

    path = resolve_dir(state) / sshtrust.CA_STATE_FILE
    try:
        ca = sshtrust.ca_line_untrusted(path.read_text())
    except OSError:
        raise click.ClickException(
            f"no SSH CA key in {path}: run 'homeport up' once (the server sends it)"
        ) from None
    except sshtrust.TrustError as exc:
        raise click.ClickException(str(exc)) from None
    root = os.geteuid() == 0 and account is None
    try:
        if print_only:
            if root:
                click.echo(f"# {sshtrust.CA_COPY}\n{ca} {sshtrust.MARK}\n")
                click.echo(f"# {sshtrust.DROPIN}\n{sshtrust.sshd_dropin()}", nl=False)
            else:
                import pwd

                who = account or pwd.getpwuid(os.getuid()).pw_name
                click.echo(sshtrust.authorized_keys_line(ca, who))
            return
        if root:
            changed = sshtrust.install_root(ca)
            for p in changed:
                click.echo(f"wrote {p}")
            click.echo(
                "reload sshd to apply it (systemctl reload ssh)" if changed else "up to date"
            )
        else:
            written = sshtrust.install_user(ca, account)
            click.echo(f"added the homeport CA to {written}" if written else "up to date")
    except (sshtrust.TrustError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


# -- set ------------------------------------------------------------------------


def _tell_agent(state_dir: Path) -> tuple[bool, str]:
    """Ask the running agent to reload (``True``, what it says) or say why not."""
    import socket

    from homeport.io.localapi import MAX_REPLY, socket_path

    path = socket_path(state_dir)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(20.0)
            sock.connect(str(path))
            sock.sendall(b'{"op":"reload"}\n')
            data = b""
            while b"\n" not in data and len(data) <= MAX_REPLY:
                chunk = sock.recv(MAX_REPLY)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        return False, "no agent runs here now: the change applies at the next 'homeport up'"
    except OSError as exc:
        return False, f"cannot reach the agent ({exc}): restart it to apply the change"
    try:
        reply = json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        return False, "the agent's answer was not understood: restart it to apply the change"
    if not isinstance(reply, dict) or reply.get("ok") is not True:
        why = reply.get("message", "refused") if isinstance(reply, dict) else "refused"
        return False, f"the running agent did not apply it ({why}): restart it"
    return True, "applied to the running agent"


@click.command("set")
@click.option("--ssh", "ssh_flag", flag_value="on", default=None, help="expose the local sshd")
@click.option("--no-ssh", "ssh_flag", flag_value="off", help="stop exposing sshd (needs --force)")
@click.option("--expose", multiple=True, metavar="NAME=HOST:PORT", help="add (or replace) one")
@click.option("--unexpose", multiple=True, metavar="NAME", help="stop exposing a service")
@click.option("--force", is_flag=True, help="allow removing ssh, the way back into this node")
@click.option(
    "--server",
    metavar="HOST:PORT",
    help="the server's new address (checked first: same server identity as when joining)",
)
@click.option("--name", metavar="NAME", help="rename this node (done by the server's admin)")
@click.option(
    "--advertise-exit", metavar="NETS", help="be an exit node for NETS (192.168.1.0/24,… or all)"
)
@click.option("--no-exit", is_flag=True, help="stop being an exit node")
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def set_cmd(  # noqa: PLR0917 - click passes options positionally
    ssh_flag: str | None,
    expose: tuple[str, ...],
    unexpose: tuple[str, ...],
    force: bool,
    advertise_exit: str | None,
    no_exit: bool,
    server: str | None,
    name: str | None,
    state: str | None,
    as_json: bool,
) -> None:
    """Change what this node exposes, whether it is an exit node, or its server's address;
    saved, and applied to the running agent at once.

    Adds and removes by name (unlike a restart with other flags, nothing else
    changes); without options it shows the current settings.
    """
    from homeport.node import state as node_state
    from homeport.node.settings import ChangeVerdict, apply_changes, describe
    from homeport.policy.services import SSH_NAME

    try:
        st = node_state.load(node_state.resolve_dir(state))
    except node_state.StateError as exc:
        _fail(str(exc))
    if name and name != st.name:
        _fail(_rename_hint(st.name, name), 2)
    if server and server != st.server:
        old_server = st.server
        st = _move(st, server)
        applied, how = _tell_agent(st.dir)
        if not as_json:
            click.echo(f"{st.name}: server {old_server} -> {st.server} (same network, saved)")
            click.echo(how if not applied else "the running agent uses it from its next connection")
    add = _services(ssh_flag == "on", expose) or ()
    remove = (*unexpose, *([SSH_NAME] if ssh_flag == "off" else []))
    change = apply_changes(st.services, add=add, remove=remove, force=force)
    applied, how = False, "nothing to apply"
    if change.verdict is ChangeVerdict.REFUSED:
        _fail(change.reason, 2)
    exit_old, exit_new = _exit_change(st.dir, advertise_exit, no_exit)
    if change.verdict is ChangeVerdict.CHANGED:
        st = st.with_services(change.services)
        node_state.save(st)
    if exit_new != exit_old:
        from homeport.node.settings import save_exit

        save_exit(st.dir, exit_new)
    if change.verdict is ChangeVerdict.CHANGED or exit_new != exit_old:
        applied, how = _tell_agent(st.dir)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "verdict": change.verdict.value,
                    "services": [
                        {
                            "name": s.name,
                            "port": s.port,
                            "target": f"{s.target_host}:{s.target_port}",
                        }
                        for s in change.services
                    ],
                    "exit": list(exit_new),
                    "applied": applied,
                    "reason": how,
                }
            )
        )
        return
    click.echo(f"{st.name}: exposing {describe(change.services)}")
    if exit_new:
        from homeport.policy.exitnet import describe as describe_nets

        click.echo(f"{st.name}: exit node for {describe_nets(exit_new)}")
    elif exit_old:
        click.echo(f"{st.name}: no longer an exit node")
    if change.verdict is ChangeVerdict.CHANGED or exit_new != exit_old:
        click.echo(how, err=not applied)


def _exit_change(
    state_dir: Path, spec: str | None, no_exit: bool
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The saved exit networks and what ``set`` makes of them (one-line errors)."""
    from homeport.node import settings
    from homeport.policy import exitnet

    if spec is not None and no_exit:
        _fail("--advertise-exit and --no-exit contradict each other", 2)
    try:
        old = settings.load_exit(state_dir)
        if no_exit:
            return old, ()
        return old, exitnet.parse_exit_spec(spec) if spec is not None else old
    except (ValueError, settings.ExitSettingsError) as exc:
        _fail(str(exc), 2)


def register(cli: click.Group) -> None:
    """Add ``up`` and ``set`` to the top-level ``homeport`` group."""
    cli.add_command(up)
    cli.add_command(ssh_trust)
    cli.add_command(set_cmd)
